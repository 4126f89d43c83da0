//! Where one rank sits in the job.

/// The rank properties Lightning exposes: `global_rank = node_rank * local_world_size +
/// local_rank`, numbered node-major.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RankInfo {
    /// Index among all ranks of the job.
    pub global_rank: usize,
    /// Index among the ranks of this node.
    pub local_rank: usize,
    /// Index of this node.
    pub node_rank: usize,
    /// Ranks in the whole job.
    pub world_size: usize,
    /// Ranks on this node.
    pub local_world_size: usize,
}

impl RankInfo {
    /// The only rank of a one-device job.
    pub const SINGLE: RankInfo = RankInfo {
        global_rank: 0,
        local_rank: 0,
        node_rank: 0,
        world_size: 1,
        local_world_size: 1,
    };

    /// Rank `local_rank` of `local_world_size` on node `node_rank` of `num_nodes`.
    pub fn new(
        node_rank: usize,
        num_nodes: usize,
        local_rank: usize,
        local_world_size: usize,
    ) -> Self {
        Self {
            global_rank: node_rank * local_world_size + local_rank,
            local_rank,
            node_rank,
            world_size: num_nodes * local_world_size,
            local_world_size,
        }
    }

    /// Whether this is global rank 0.
    pub fn is_global_zero(&self) -> bool {
        self.global_rank == 0
    }
}
