//! Ranks in several processes: threads inside a process, MPI between processes. Every operation
//! goes in three stages — combine among the process's threads, one MPI operation by the
//! process's local rank 0, share the result with the threads — so each process sends one
//! buffer per operation whatever its number of ranks. Ranks are numbered node-major:
//! `global = process * ranks_per_process + local`.
//!
//! So the ranks of one process hold one contiguous block of a `reduce_scatter`'s result: the
//! process's threads reduce onto local rank 0, which takes part in `MPI_Reduce_scatter_block`
//! for the process's block and hands each thread its part. `all_gather_flat` gathers the
//! threads' buffers on local rank 0, which `MPI_Allgather`s them with the other processes.

use crate::collective::flat_len;
use crate::host::slice_flat;
use crate::mpi::MpiProcesses;
use crate::reduce::{check_supported_in, divide};
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
        self.local.broadcast_many_within(data, 0, self.patience())
    }

    /// How long the other local ranks wait for local rank 0 while it is in MPI: past the MPI
    /// watchdog's deadline.
    fn patience(&self) -> std::time::Duration {
        self.local.timeout() * 2 + std::time::Duration::from_secs(2)
    }
}

impl Collective for HierarchicalCollective {
    fn within_process(&self) -> Option<&dyn Collective> {
        Some(&self.local)
    }

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

    fn reduce_scatter(
        &self,
        data: TensorData,
        op: ReduceOp,
    ) -> Result<TensorData, CollectiveError> {
        let (rank, world, local) = (self.rank(), self.world_size(), self.local_size());
        let numel = flat_len(&data, "reduce_scatter", rank, Some(world))?;
        check_supported_in(&data, op, "reduce_scatter")?;
        let partial = if op == ReduceOp::Mean {
            ReduceOp::Sum
        } else {
            op
        };
        // The process's threads combine onto local rank 0 (the others' buffers are freed).
        let combined = if local > 1 {
            self.local
                .reduce_many(vec![data], partial, 0)?
                .and_then(|mut reduced| reduced.pop())
        } else {
            Some(data)
        };
        let missing = |what: &str| CollectiveError::Mismatch {
            rank,
            detail: format!("`reduce_scatter` lost {what}"),
        };
        // Local rank 0: this process's block of `numel / processes` elements, cut into one part
        // of `numel / world` per local rank.
        let parts = if self.leads() {
            let combined = combined.ok_or_else(|| missing("the process's combined buffer"))?;
            let mut block = self.processes.reduce_scatter(rank, combined, partial)?;
            if op == ReduceOp::Mean {
                divide(&mut block, world);
            }
            if local == 1 {
                return Ok(block);
            }
            let part = numel / world;
            (0..local)
                .map(|l| slice_flat(&block, l * part..(l + 1) * part))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| missing("part of the process's block"))?
        } else {
            Vec::new()
        };
        self.local.scatter_within(parts, 0, self.patience())
    }

    fn all_gather_flat(&self, data: TensorData) -> Result<TensorData, CollectiveError> {
        let rank = self.rank();
        flat_len(&data, "all_gather_flat", rank, None)?;
        // The process's threads' buffers, back to back on local rank 0.
        let mine = if self.local_size() > 1 {
            self.local.gather_flat(data, Some(0))?
        } else {
            Some(data)
        };
        let mut out = self.lead_and_share(mine.into_iter().collect(), |mut mine| {
            let packed = mine.pop().ok_or_else(|| CollectiveError::Mismatch {
                rank,
                detail: "`all_gather_flat` lost the process's gathered buffer".into(),
            })?;
            Ok(vec![self.processes.all_gather_flat(rank, packed)?])
        })?;
        out.pop().ok_or_else(|| CollectiveError::Mismatch {
            rank,
            detail: "all_gather_flat returned no buffer".into(),
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
