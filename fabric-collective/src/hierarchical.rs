//! Ranks in several processes: threads inside a process, MPI between processes. Every operation
//! goes in three stages — combine among the process's threads, one MPI operation by the
//! process's local rank 0, share the result with the threads — so each process sends one
//! buffer per operation whatever its number of ranks. Ranks are numbered node-major:
//! `global = process * ranks_per_process + local`.

use crate::mpi::MpiProcesses;
use crate::reduce::divide;
use crate::{Collective, ReduceOp, ThreadCollective, check_rank, pack, split};
use burn::tensor::TensorData;
use fabric_core::CollectiveError;
use std::sync::Arc;

/// One rank's collective in a multi-process job.
pub struct HierarchicalCollective {
    local: ThreadCollective,
    processes: Arc<MpiProcesses>,
}

impl HierarchicalCollective {
    /// Rank `local.rank()` of this process, joined to the others through `processes`.
    pub fn new(local: ThreadCollective, processes: Arc<MpiProcesses>) -> Self {
        Self { local, processes }
    }

    fn local_size(&self) -> usize {
        self.local.world_size()
    }

    fn leads(&self) -> bool {
        self.local.rank() == 0
    }

    /// Runs `across` on local rank 0 and gives its result to every local rank. The others wait
    /// past the MPI watchdog's deadline: if the leader is stuck in MPI, the watchdog (or the
    /// process holding the late rank) ends the job and names the rank.
    fn lead_and_share(
        &self,
        data: Vec<TensorData>,
        across: impl FnOnce(Vec<TensorData>) -> Result<Vec<TensorData>, CollectiveError>,
    ) -> Result<Vec<TensorData>, CollectiveError> {
        let data = if self.leads() {
            across(data)?
        } else {
            Vec::new()
        };
        if self.local_size() == 1 {
            return Ok(data);
        }
        let patience = self.local.timeout() * 2 + std::time::Duration::from_secs(2);
        self.local.broadcast_many_within(data, 0, patience)
    }
}

impl Collective for HierarchicalCollective {
    fn rank(&self) -> usize {
        self.processes.rank() * self.local_size() + self.local.rank()
    }

    fn world_size(&self) -> usize {
        self.processes.size() * self.local_size()
    }

    fn all_reduce(&self, data: TensorData, op: ReduceOp) -> Result<TensorData, CollectiveError> {
        let mut out = self.all_reduce_many(vec![data], op)?;
        out.pop().ok_or_else(|| CollectiveError::Mismatch {
            rank: self.rank(),
            detail: "all_reduce returned no buffer".into(),
        })
    }

    fn all_reduce_many(
        &self,
        data: Vec<TensorData>,
        op: ReduceOp,
    ) -> Result<Vec<TensorData>, CollectiveError> {
        for buffer in &data {
            super::reduce::check_supported(buffer, op)?;
        }
        let partial = if op == ReduceOp::Mean {
            ReduceOp::Sum
        } else {
            op
        };
        let data = if self.local_size() > 1 {
            self.local.all_reduce_many(data, partial)?
        } else {
            data
        };
        let (rank, world) = (self.rank(), self.world_size());
        self.lead_and_share(data, |data| {
            let mut reduced = self.processes.all_reduce_many(rank, data, partial)?;
            if op == ReduceOp::Mean {
                for buffer in &mut reduced {
                    divide(buffer, world);
                }
            }
            Ok(reduced)
        })
    }

    fn broadcast(&self, data: TensorData, src: usize) -> Result<TensorData, CollectiveError> {
        check_rank(src, self.world_size())?;
        let (process, local) = (src / self.local_size(), src % self.local_size());
        // Bring the source's buffer to local rank 0 of every process (only the source's
        // process carries meaning), then across processes, then to every thread.
        let data = if self.local_size() > 1 {
            self.local.broadcast(data, local)?
        } else {
            data
        };
        let rank = self.rank();
        let mut out = self.lead_and_share(vec![data], |data| {
            self.processes.broadcast_many(rank, data, process)
        })?;
        out.pop().ok_or_else(|| CollectiveError::Mismatch {
            rank,
            detail: "broadcast returned no buffer".into(),
        })
    }

    fn all_gather(&self, data: TensorData) -> Result<Vec<TensorData>, CollectiveError> {
        let shape = data.shape.to_vec();
        let dtype = data.dtype;
        let mine = if self.local_size() > 1 {
            self.local.all_gather(data)?
        } else {
            vec![data]
        };
        let local = self.local_size();
        let rank = self.rank();
        self.lead_and_share(mine, |mine| {
            // One buffer per process holding its ranks' buffers back to back.
            let per_process = self.processes.all_gather(rank, pack(mine, dtype))?;
            let shapes = vec![shape.clone(); local];
            Ok(per_process
                .iter()
                .flat_map(|packed| split(packed, &shapes))
                .collect())
        })
    }

    fn barrier(&self) -> Result<(), CollectiveError> {
        if self.local_size() > 1 {
            self.local.barrier()?;
        }
        if self.leads() {
            self.processes.barrier(self.rank())?;
        }
        if self.local_size() > 1 {
            self.local.barrier()?;
        }
        Ok(())
    }
}
