//! The in-process engine: ranks are threads of one process and exchange tensors through shared
//! memory, with no copy for the reduction itself.
//!
//! Every operation is a rendezvous of all ranks. Each rank moves its buffer into the group's
//! shared state; the last rank to arrive checks that everyone called the same operation with
//! compatible data. For `all_reduce` every rank then reduces its own chunk of the elements across
//! all buffers (see `reduce.rs`), and a second rendezvous ends the operation before each rank
//! takes its buffer back. `reduce_scatter` is the same with each rank writing its chunk into its
//! own buffer only and keeping just that chunk; `all_gather_flat` copies every deposited buffer
//! once, straight into the rank's output. Because the buffers live in the shared state, not on a
//! rank's stack, a rank that gives up (timeout, peer failure) never leaves another rank writing
//! into freed memory.
//!
//! A failure anywhere (a rank's error or panic reported by the launcher, a timeout, a mismatch, a
//! rank that returned while others wait for it) is recorded once and wakes every waiter, so no
//! rank blocks for longer than the timeout, and usually not at all.

use crate::collective::flat_len;
use crate::host::{concat, slice_flat};
use crate::reduce::{aligned, check_supported, check_supported_in, chunk, reduce_range};
use crate::{Collective, ReduceOp, check_rank};
use burn::tensor::{DType, TensorData};
use fabric_core::CollectiveError;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// A group of `world_size` thread ranks. Create it once, hand [`ThreadGroup::member`] to each
/// rank's thread, and report each rank's end with [`ThreadGroup::fail`] or [`ThreadGroup::exit`].
#[derive(Clone)]
pub struct ThreadGroup {
    shared: Arc<Shared>,
}

/// One rank's handle on a [`ThreadGroup`]; implements [`Collective`].
pub struct ThreadCollective {
    shared: Arc<Shared>,
    rank: usize,
}

struct Shared {
    world: usize,
    /// Global rank of local rank 0 (non-zero when other processes hold lower ranks); every
    /// rank this group reports is global.
    first_rank: usize,
    timeout: Duration,
    state: Mutex<State>,
    wake: Condvar,
}

struct State {
    /// Rendezvous generation; advances when the last rank arrives.
    generation: u64,
    arrived: Vec<bool>,
    count: usize,
    /// Each rank's published operation and buffer for the operation in progress.
    slots: Vec<Option<Slot>>,
    /// Ranks whose function has returned.
    exited: Vec<bool>,
    /// The first failure; once set, every call fails fast.
    failure: Option<Failure>,
}

struct Slot {
    op: Op,
    data: Vec<TensorData>,
}

/// What a rank asked for, compared across ranks at the rendezvous.
#[derive(Debug, Clone, PartialEq)]
enum Op {
    AllReduce(ReduceOp),
    Reduce(ReduceOp, usize),
    Broadcast(usize),
    AllGather,
    ReduceScatter(ReduceOp),
    /// `all_gather_flat` (`None`) or its gather to one rank.
    GatherFlat(Option<usize>),
    Scatter(usize),
    Barrier,
}

impl Op {
    fn name(&self) -> &'static str {
        match self {
            Op::AllReduce(_) => "all_reduce",
            Op::Reduce(..) => "reduce",
            Op::Broadcast(_) => "broadcast",
            Op::AllGather => "all_gather",
            Op::ReduceScatter(_) => "reduce_scatter",
            Op::GatherFlat(None) => "all_gather_flat",
            Op::GatherFlat(Some(_)) => "gather_flat",
            Op::Scatter(_) => "scatter",
            Op::Barrier => "barrier",
        }
    }
}

/// The rank held responsible and what happened.
#[derive(Debug, Clone)]
struct Failure {
    rank: usize,
    reason: String,
}

impl ThreadGroup {
    /// A group of `world_size` ranks whose blocking calls give up after `timeout`.
    pub fn new(world_size: usize, timeout: Duration) -> Self {
        Self::starting_at(world_size, timeout, 0)
    }

    /// As [`new`](Self::new), for the ranks `first_rank..first_rank + world_size` of a larger
    /// job: errors and failures name global ranks.
    pub fn starting_at(world_size: usize, timeout: Duration, first_rank: usize) -> Self {
        let world = world_size.max(1);
        Self {
            shared: Arc::new(Shared {
                world,
                first_rank,
                timeout,
                state: Mutex::new(State {
                    generation: 0,
                    arrived: vec![false; world],
                    count: 0,
                    slots: (0..world).map(|_| None).collect(),
                    exited: vec![false; world],
                    failure: None,
                }),
                wake: Condvar::new(),
            }),
        }
    }

    /// The handle of rank `rank`.
    pub fn member(&self, rank: usize) -> ThreadCollective {
        ThreadCollective {
            shared: Arc::clone(&self.shared),
            rank,
        }
    }

    /// Records that local rank `rank` failed (returned an error or panicked) and releases every
    /// waiter. Only the first failure is kept.
    pub fn fail(&self, rank: usize, reason: impl Into<String>) {
        let mut state = self.shared.lock();
        let global = self.shared.first_rank + rank;
        self.shared.fail_locked(&mut state, global, reason.into());
    }

    /// Records that `rank` returned normally: a rank still waiting for it fails at once.
    pub fn exit(&self, rank: usize) {
        let mut state = self.shared.lock();
        if let Some(exited) = state.exited.get_mut(rank) {
            *exited = true;
        }
        self.shared.wake.notify_all();
    }

    /// The first failure recorded: the (global) rank held responsible and why.
    pub fn failure(&self) -> Option<(usize, String)> {
        self.shared
            .lock()
            .failure
            .as_ref()
            .map(|f| (f.rank, f.reason.clone()))
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // No code panics while holding the lock; recover the state regardless.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records the first failure (`rank` is global) and wakes every waiter.
    fn fail_locked(&self, state: &mut State, rank: usize, reason: String) {
        if state.failure.is_none() {
            state.failure = Some(Failure { rank, reason });
        }
        self.wake.notify_all();
    }
}

fn aborted(rank: usize, op: &'static str, failure: &Failure) -> CollectiveError {
    CollectiveError::Aborted {
        rank,
        operation: op,
        failed_rank: failure.rank,
        reason: failure.reason.clone(),
    }
}

impl ThreadCollective {
    /// This rank's global index.
    fn global(&self) -> usize {
        self.shared.first_rank + self.rank
    }

    /// Waits until every rank has arrived at this rendezvous, for at most `timeout`. The last
    /// rank to arrive runs `check` on the published slots; a mismatch fails the whole group.
    fn rendezvous<'a>(
        &'a self,
        mut state: MutexGuard<'a, State>,
        op: &'static str,
        check: impl Fn(&State) -> Option<(usize, String)>,
        timeout: Duration,
    ) -> Result<MutexGuard<'a, State>, CollectiveError> {
        let shared = &*self.shared;
        let me = self.global();
        if let Some(failure) = &state.failure {
            return Err(aborted(me, op, failure));
        }
        let generation = state.generation;
        state.arrived[self.rank] = true;
        state.count += 1;
        if state.count == shared.world {
            if let Some((culprit, detail)) = check(&state) {
                shared.fail_locked(&mut state, shared.first_rank + culprit, detail.clone());
                return Err(CollectiveError::Mismatch { rank: me, detail });
            }
            state.generation += 1;
            state.count = 0;
            state.arrived.fill(false);
            shared.wake.notify_all();
            return Ok(state);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if state.generation != generation {
                return Ok(state);
            }
            if let Some(failure) = &state.failure {
                return Err(aborted(me, op, failure));
            }
            if let Some(peer) = (0..shared.world).find(|&r| state.exited[r] && !state.arrived[r]) {
                let peer = shared.first_rank + peer;
                let reason =
                    format!("returned from its function while rank {me} waited for it in `{op}`");
                shared.fail_locked(&mut state, peer, reason);
                return Err(CollectiveError::PeerExited {
                    rank: me,
                    operation: op,
                    peer,
                });
            }
            let now = Instant::now();
            if now >= deadline {
                let missing: Vec<usize> = (0..shared.world)
                    .filter(|&r| !state.arrived[r])
                    .map(|r| shared.first_rank + r)
                    .collect();
                let culprit = missing.first().copied().unwrap_or(me);
                let reason = format!(
                    "did not reach `{op}` within the collective timeout of {timeout:?} (rank {me} waited)"
                );
                shared.fail_locked(&mut state, culprit, reason);
                return Err(CollectiveError::Timeout {
                    rank: me,
                    operation: op,
                    timeout,
                    missing,
                });
            }
            state = shared
                .wake
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Publishes this rank's operation and buffer, then waits for everyone (first rendezvous).
    fn publish(
        &self,
        op: Op,
        data: Vec<TensorData>,
        check: impl Fn(&State) -> Option<(usize, String)>,
        timeout: Duration,
    ) -> Result<MutexGuard<'_, State>, CollectiveError> {
        let name = op.name();
        let mut state = self.shared.lock();
        if let Some(failure) = &state.failure {
            return Err(aborted(self.global(), name, failure));
        }
        state.slots[self.rank] = Some(Slot { op, data });
        self.rendezvous(state, name, check, timeout)
    }

    /// Second rendezvous, then takes this rank's buffers back.
    fn finish(
        &self,
        op: &'static str,
        timeout: Duration,
    ) -> Result<Vec<TensorData>, CollectiveError> {
        let state = self.shared.lock();
        let mut state = self.rendezvous(state, op, |_| None, timeout)?;
        state.slots[self.rank]
            .take()
            .map(|slot| slot.data)
            .ok_or_else(|| CollectiveError::Mismatch {
                rank: self.global(),
                detail: format!("rank {}'s buffer vanished during `{op}`", self.global()),
            })
    }
}

/// Checks that every rank published the same operation, and buffers that agree on what `same`
/// compares; names the first rank that differs from rank 0.
fn same_op(
    state: &State,
    first_rank: usize,
    same: impl Fn(&[TensorData], &[TensorData]) -> bool,
) -> Option<(usize, String)> {
    let first = state.slots[0].as_ref()?;
    let r0 = first_rank;
    let describe = |data: &[TensorData]| -> String {
        data.iter()
            .map(|d| format!("{:?} {:?}", d.dtype, d.shape))
            .collect::<Vec<_>>()
            .join(", ")
    };
    state
        .slots
        .iter()
        .enumerate()
        .skip(1)
        .find_map(|(rank, slot)| {
            let slot = slot.as_ref()?;
            if slot.op != first.op {
                return Some((
                    rank,
                    format!(
                        "rank {r0} called `{:?}` but rank {} called `{:?}`",
                        first.op,
                        first_rank + rank,
                        slot.op
                    ),
                ));
            }
            if !same(&first.data, &slot.data) {
                return Some((
                    rank,
                    format!(
                        "in `{}` rank {r0} has [{}] but rank {} has [{}]",
                        first.op.name(),
                        describe(&first.data),
                        first_rank + rank,
                        describe(&slot.data)
                    ),
                ));
            }
            None
        })
}

/// `same` for buffer lists that must agree entry by entry on `entry`.
fn pairwise(
    entry: impl Fn(&TensorData, &TensorData) -> bool,
) -> impl Fn(&[TensorData], &[TensorData]) -> bool {
    move |a, b| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| entry(x, y))
}

/// Takes the single buffer out of a one-buffer operation.
fn single(
    mut data: Vec<TensorData>,
    rank: usize,
    op: &'static str,
) -> Result<TensorData, CollectiveError> {
    match (data.pop(), data.is_empty()) {
        (Some(only), true) => Ok(only),
        _ => Err(CollectiveError::Mismatch {
            rank,
            detail: format!("`{op}` expected exactly one buffer back"),
        }),
    }
}

impl ThreadCollective {
    /// Rank `src`'s buffers on every rank (`src` local); the other ranks' `data` is ignored
    /// (it may be empty).
    pub fn broadcast_many(
        &self,
        data: Vec<TensorData>,
        src: usize,
    ) -> Result<Vec<TensorData>, CollectiveError> {
        self.broadcast_many_within(data, src, self.shared.timeout)
    }

    /// [`broadcast_many`](Self::broadcast_many) waiting up to `timeout` instead of the group's:
    /// for ranks that wait while `src` is busy in a longer operation (an MPI call watched by its
    /// own, later, deadline).
    pub fn broadcast_many_within(
        &self,
        data: Vec<TensorData>,
        src: usize,
        timeout: Duration,
    ) -> Result<Vec<TensorData>, CollectiveError> {
        check_rank(src, self.shared.world)?;
        let first_rank = self.shared.first_rank;
        let state = self.publish(
            Op::Broadcast(src),
            data,
            |state| same_op(state, first_rank, |_, _| true),
            timeout,
        )?;
        let copy = (self.rank != src)
            .then(|| state.slots[src].as_ref().map(|slot| slot.data.clone()))
            .flatten();
        drop(state);
        let own = self.finish("broadcast", timeout)?;
        Ok(copy.unwrap_or(own))
    }

    /// Gives each rank `r` the buffer `parts[r]` of rank `src` (`src` local, passing one buffer
    /// per rank; the others pass none), waiting up to `timeout` instead of the group's. The
    /// buffers move to their ranks: nothing is copied.
    #[cfg_attr(not(feature = "mpi"), allow(dead_code))]
    pub(crate) fn scatter_within(
        &self,
        parts: Vec<TensorData>,
        src: usize,
        timeout: Duration,
    ) -> Result<TensorData, CollectiveError> {
        let world = self.shared.world;
        check_rank(src, world)?;
        let first_rank = self.shared.first_rank;
        let mut state = self.publish(
            Op::Scatter(src),
            parts,
            move |state| {
                same_op(state, first_rank, |_, _| true).or_else(|| {
                    let count = state.slots[src].as_ref().map_or(0, |slot| slot.data.len());
                    (count != world).then(|| {
                        (
                            src,
                            format!(
                                "in `scatter` rank {} passed {count} buffer(s) for {world} ranks",
                                first_rank + src
                            ),
                        )
                    })
                })
            },
            timeout,
        )?;
        // Each rank takes its own part out of the source's slot; the source keeps its own.
        let part = (self.rank != src)
            .then(|| {
                state.slots[src]
                    .as_mut()
                    .and_then(|slot| slot.data.get_mut(self.rank))
                    .map(|part| std::mem::replace(part, TensorData::new(Vec::<u8>::new(), [0])))
            })
            .flatten();
        drop(state);
        let own = self.finish("scatter", timeout)?;
        let part = match part {
            Some(part) => Some(part),
            None if self.rank == src => own.into_iter().nth(src),
            None => None,
        };
        part.ok_or_else(|| CollectiveError::Mismatch {
            rank: self.global(),
            detail: format!("rank {}'s part was missing in `scatter`", self.global()),
        })
    }

    /// Every rank's one-dimensional `data` back to back in rank order, on every rank (`dst`
    /// `None`: `all_gather_flat`) or only on local rank `dst` (the others get `None`). Each
    /// receiving rank copies every buffer once, straight into its output.
    pub(crate) fn gather_flat(
        &self,
        data: TensorData,
        dst: Option<usize>,
    ) -> Result<Option<TensorData>, CollectiveError> {
        let world = self.shared.world;
        if let Some(dst) = dst {
            check_rank(dst, world)?;
        }
        let operation = Op::GatherFlat(dst);
        let name = operation.name();
        let numel = flat_len(&data, name, self.global(), None)?;
        let dtype = data.dtype;
        let (first_rank, timeout) = (self.shared.first_rank, self.shared.timeout);
        let state = self.publish(
            operation,
            vec![data],
            |state| {
                same_op(
                    state,
                    first_rank,
                    pairwise(|a, b| a.dtype == b.dtype && a.num_elements() == b.num_elements()),
                )
            },
            timeout,
        )?;
        let receives = dst.is_none_or(|dst| dst == self.rank);
        // Every slot is present until each rank takes its own back after `finish`, and nobody
        // writes to them in this operation, so these stay valid for reading until this rank
        // reaches the second rendezvous.
        let parts: Option<Vec<(*const u8, usize)>> = receives
            .then(|| {
                state
                    .slots
                    .iter()
                    .map(|slot| {
                        slot.as_ref()
                            .and_then(|s| s.data.first())
                            .map(|d| (d.as_bytes().as_ptr(), d.as_bytes().len()))
                    })
                    .collect::<Option<Vec<_>>>()
            })
            .flatten();
        drop(state);
        let gathered = parts.map(|parts| {
            let parts: Vec<&[u8]> = parts
                .into_iter()
                // SAFETY: see above; each pointer and length come from a live `&[u8]`.
                .map(|(ptr, len)| unsafe { std::slice::from_raw_parts(ptr, len) })
                .collect();
            concat(&parts, numel * world, dtype)
        });
        self.finish(name, timeout)?;
        match (receives, gathered) {
            (false, _) => Ok(None),
            (true, Some(gathered)) => Ok(Some(gathered)),
            (true, None) => Err(CollectiveError::Mismatch {
                rank: self.global(),
                detail: format!("a rank's buffer was missing in `{name}`"),
            }),
        }
    }

    /// The group's timeout.
    pub fn timeout(&self) -> Duration {
        self.shared.timeout
    }

    /// The reduction behind `all_reduce_many` (`dst = None`) and `reduce_many`.
    fn reduce_where_they_lie(
        &self,
        data: Vec<TensorData>,
        op: ReduceOp,
        dst: Option<usize>,
    ) -> Result<Vec<TensorData>, CollectiveError> {
        for buffer in &data {
            check_supported(buffer, op)?;
        }
        let data: Vec<TensorData> = data.into_iter().map(aligned).collect();
        let layout: Vec<(DType, usize)> =
            data.iter().map(|d| (d.dtype, d.num_elements())).collect();
        let (first_rank, timeout) = (self.shared.first_rank, self.shared.timeout);
        let operation = match dst {
            Some(dst) => Op::Reduce(op, dst),
            None => Op::AllReduce(op),
        };
        let mut state = self.publish(
            operation,
            data,
            |state| {
                same_op(
                    state,
                    first_rank,
                    pairwise(|a, b| a.dtype == b.dtype && a.num_elements() == b.num_elements()),
                )
            },
            timeout,
        )?;
        // Every slot is present until each rank takes its own back after `finish`, so these
        // pointers stay valid until this rank reaches the second rendezvous.
        let ptrs: Vec<Vec<*mut u8>> = (0..layout.len())
            .map(|entry| {
                state
                    .slots
                    .iter_mut()
                    .map(|slot| {
                        slot.as_mut()
                            .and_then(|s| s.data.get_mut(entry))
                            .map_or(std::ptr::null_mut(), |d| d.bytes.as_mut_ptr())
                    })
                    .collect()
            })
            .collect();
        drop(state);
        let total = layout.iter().map(|(_, n)| n).sum();
        let mine = chunk(self.rank, self.shared.world, total);
        let mut offset = 0;
        for ((dtype, numel), ptrs) in layout.into_iter().zip(&ptrs) {
            let lo = mine.start.max(offset);
            let hi = mine.end.min(offset + numel);
            if lo < hi && ptrs.iter().all(|p| !p.is_null()) {
                // SAFETY: entry `entry` of every rank holds `numel` elements of `dtype` (checked
                // at the rendezvous), is aligned (`aligned`), is owned by the shared state and
                // not moved until every rank passed `finish`, and only this rank touches
                // elements `lo..hi` of the joint index space.
                unsafe { reduce_range(dtype, ptrs, (lo - offset)..(hi - offset), op, dst) };
            }
            offset += numel;
        }
        self.finish("all_reduce", timeout)
    }
}

impl Collective for ThreadCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce(&self, data: TensorData, op: ReduceOp) -> Result<TensorData, CollectiveError> {
        single(
            self.all_reduce_many(vec![data], op)?,
            self.global(),
            "all_reduce",
        )
    }

    /// One rendezvous for all buffers, reduced where they lie: the elements of all buffers form
    /// one index space that the ranks split into equal chunks.
    fn all_reduce_many(
        &self,
        data: Vec<TensorData>,
        op: ReduceOp,
    ) -> Result<Vec<TensorData>, CollectiveError> {
        self.reduce_where_they_lie(data, op, None)
    }

    /// As `all_reduce_many`, but the ranks write their chunk of the result into rank `dst`'s
    /// buffers only; the others get `None`.
    fn reduce_many(
        &self,
        data: Vec<TensorData>,
        op: ReduceOp,
        dst: usize,
    ) -> Result<Option<Vec<TensorData>>, CollectiveError> {
        check_rank(dst, self.shared.world)?;
        let reduced = self.reduce_where_they_lie(data, op, Some(dst))?;
        Ok((self.rank == dst).then_some(reduced))
    }

    fn broadcast(&self, data: TensorData, src: usize) -> Result<TensorData, CollectiveError> {
        single(
            self.broadcast_many(vec![data], src)?,
            self.global(),
            "broadcast",
        )
    }

    fn all_gather(&self, data: TensorData) -> Result<Vec<TensorData>, CollectiveError> {
        let (first_rank, timeout) = (self.shared.first_rank, self.shared.timeout);
        let state = self.publish(
            Op::AllGather,
            vec![data],
            |state| {
                same_op(
                    state,
                    first_rank,
                    pairwise(|a, b| a.dtype == b.dtype && a.shape == b.shape),
                )
            },
            timeout,
        )?;
        let mut gathered: Vec<Option<TensorData>> = state
            .slots
            .iter()
            .enumerate()
            .map(|(rank, slot)| {
                if rank == self.rank {
                    None
                } else {
                    slot.as_ref().and_then(|s| s.data.first().cloned())
                }
            })
            .collect();
        drop(state);
        gathered[self.rank] = Some(single(
            self.finish("all_gather", timeout)?,
            self.global(),
            "all_gather",
        )?);
        gathered
            .into_iter()
            .enumerate()
            .map(|(rank, data)| {
                data.ok_or_else(|| CollectiveError::Mismatch {
                    rank: self.global(),
                    detail: format!(
                        "rank {}'s buffer was missing in `all_gather`",
                        first_rank + rank
                    ),
                })
            })
            .collect()
    }

    /// Each rank reduces its own chunk across every deposited buffer, writing it into its own
    /// buffer only, and keeps that chunk: one rendezvous, `n / world` elements combined and
    /// copied per rank.
    fn reduce_scatter(
        &self,
        data: TensorData,
        op: ReduceOp,
    ) -> Result<TensorData, CollectiveError> {
        let world = self.shared.world;
        let numel = flat_len(&data, "reduce_scatter", self.global(), Some(world))?;
        check_supported_in(&data, op, "reduce_scatter")?;
        let data = aligned(data);
        let dtype = data.dtype;
        let (first_rank, timeout) = (self.shared.first_rank, self.shared.timeout);
        let mut state = self.publish(
            Op::ReduceScatter(op),
            vec![data],
            |state| {
                same_op(
                    state,
                    first_rank,
                    pairwise(|a, b| a.dtype == b.dtype && a.num_elements() == b.num_elements()),
                )
            },
            timeout,
        )?;
        // Every slot is present until each rank takes its own back after `finish`, so these
        // pointers stay valid until this rank reaches the second rendezvous.
        let ptrs: Vec<*mut u8> = state
            .slots
            .iter_mut()
            .map(|slot| {
                slot.as_mut()
                    .and_then(|s| s.data.first_mut())
                    .map_or(std::ptr::null_mut(), |d| d.bytes.as_mut_ptr())
            })
            .collect();
        drop(state);
        let mine = chunk(self.rank, world, numel);
        let complete = ptrs.iter().all(|p| !p.is_null());
        if complete && !mine.is_empty() {
            // SAFETY: every rank's buffer holds `numel` elements of `dtype` (checked at the
            // rendezvous), is aligned (`aligned`), is owned by the shared state and not moved
            // until every rank passed `finish`; this rank alone reads or writes elements `mine`
            // of any buffer, and writes them into its own buffer only.
            unsafe { reduce_range(dtype, &ptrs, mine.clone(), op, Some(self.rank)) };
        }
        let own = single(
            self.finish("reduce_scatter", timeout)?,
            self.global(),
            "reduce_scatter",
        )?;
        complete
            .then(|| slice_flat(&own, mine))
            .flatten()
            .ok_or_else(|| CollectiveError::Mismatch {
                rank: self.global(),
                detail: "a rank's buffer was missing or short in `reduce_scatter`".into(),
            })
    }

    fn all_gather_flat(&self, data: TensorData) -> Result<TensorData, CollectiveError> {
        self.gather_flat(data, None)?
            .ok_or_else(|| CollectiveError::Mismatch {
                rank: self.global(),
                detail: "`all_gather_flat` returned no buffer".into(),
            })
    }

    fn barrier(&self) -> Result<(), CollectiveError> {
        let first_rank = self.shared.first_rank;
        let mut state = self.publish(
            Op::Barrier,
            Vec::new(),
            |state| same_op(state, first_rank, |_, _| true),
            self.shared.timeout,
        )?;
        // The slots were checked by the last arriver before anyone woke; nobody reads them now.
        state.slots[self.rank] = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launcher::{ThreadLaunch, launch_threads};
    use half::{bf16, f16};

    fn launch(world: usize, timeout: Duration) -> ThreadLaunch {
        ThreadLaunch {
            world_size: world,
            first_rank: 0,
            timeout,
            threads_per_rank: Some(1),
        }
    }

    /// Rank `r`'s element `i`: integers and halves, so every sum is exact in f32.
    fn value(r: usize, i: usize) -> f32 {
        ((r + 1) * (i % 1000)) as f32 * 0.5 - r as f32 + (i / 1000) as f32
    }

    /// Fails the rank (and so the launch) with a message unless `got == want`.
    fn expect<T: PartialEq + std::fmt::Debug>(got: T, want: T, what: &str) -> Result<(), String> {
        if got == want {
            Ok(())
        } else {
            Err(format!("{what}: got {got:?}, want {want:?}"))
        }
    }

    #[test]
    fn reduce_scatter_gives_each_rank_its_slice_of_the_sum_and_mean() {
        // 5 per rank, and 5000 per rank so a rank's slice spans reduction tiles.
        for world in [2, 3, 4] {
            for per_rank in [5, 5000] {
                let n = per_rank * world;
                for op in [ReduceOp::Sum, ReduceOp::Mean] {
                    launch_threads(&launch(world, Duration::from_secs(30)), |rank, c| {
                        let data: Vec<f32> = (0..n).map(|i| value(rank, i)).collect();
                        let got = c
                            .reduce_scatter(TensorData::new(data, [n]), op)
                            .map_err(|e| e.to_string())?;
                        expect(got.shape.to_vec(), vec![per_rank], "shape")?;
                        let want: Vec<f32> = (rank * n / world..(rank + 1) * n / world)
                            .map(|i| {
                                let sum: f32 = (0..world).map(|r| value(r, i)).sum();
                                match op {
                                    ReduceOp::Mean => sum / world as f32,
                                    _ => sum,
                                }
                            })
                            .collect();
                        let got = got.to_vec::<f32>().map_err(|e| format!("{e:?}"))?;
                        expect(got, want, &format!("world {world} n {n} {op} rank {rank}"))
                    })
                    .unwrap();
                }
            }
        }
    }

    #[test]
    fn reduce_scatter_covers_other_dtypes_and_ops() {
        launch_threads(&launch(3, Duration::from_secs(30)), |rank, c| {
            let r = rank as f64;
            // f64 max
            let got = c
                .reduce_scatter(
                    TensorData::new(vec![r, -r, 2.0 * r, 1.0, r - 1.0, 0.5], [6]),
                    ReduceOp::Max,
                )
                .map_err(|e| e.to_string())?;
            let want = [[2.0, 0.0], [4.0, 1.0], [1.0, 0.5]][rank].to_vec();
            expect(
                got.to_vec::<f64>().map_err(|e| format!("{e:?}"))?,
                want,
                "f64 max",
            )?;
            // integers: the mean rounds to nearest (1 + 2 + 4 = 7, / 3 -> 2)
            let ints = vec![1 << rank; 3];
            let got = c
                .reduce_scatter(TensorData::new(ints, [3]), ReduceOp::Mean)
                .map_err(|e| e.to_string())?;
            expect(
                got.to_vec::<i32>().map_err(|e| format!("{e:?}"))?,
                vec![2],
                "i32 mean",
            )?;
            // bf16 sums accumulate in f32: 256 + 1 + 1 = 258 (pairwise in bf16 it stays 256)
            let v = if rank == 0 { 256.0 } else { 1.0 };
            let got = c
                .reduce_scatter(
                    TensorData::new(vec![bf16::from_f32(v); 3], [3]),
                    ReduceOp::Sum,
                )
                .map_err(|e| e.to_string())?;
            expect(
                got.to_vec::<bf16>().map_err(|e| format!("{e:?}"))?,
                vec![bf16::from_f32(258.0)],
                "bf16 sum",
            )?;
            let got = c
                .reduce_scatter(
                    TensorData::new(vec![f16::from_f32(0.5); 3], [3]),
                    ReduceOp::Mean,
                )
                .map_err(|e| e.to_string())?;
            expect(
                got.to_vec::<f16>().map_err(|e| format!("{e:?}"))?,
                vec![f16::from_f32(0.5)],
                "f16 mean",
            )
        })
        .unwrap();
    }

    #[test]
    fn all_gather_flat_concatenates_in_rank_order() {
        for world in [2, 3, 4] {
            launch_threads(&launch(world, Duration::from_secs(30)), |rank, c| {
                let mine: Vec<f32> = (0..3).map(|k| (rank * 10 + k) as f32).collect();
                let got = c
                    .all_gather_flat(TensorData::new(mine, [3]))
                    .map_err(|e| e.to_string())?;
                expect(got.shape.to_vec(), vec![3 * world], "shape")?;
                let want: Vec<f32> = (0..world)
                    .flat_map(|r| (0..3).map(move |k| (r * 10 + k) as f32))
                    .collect();
                expect(
                    got.to_vec::<f32>().map_err(|e| format!("{e:?}"))?,
                    want,
                    "f32",
                )?;
                // other dtypes travel as they are
                let got = c
                    .all_gather_flat(TensorData::new(vec![rank as i64, -1], [2]))
                    .map_err(|e| e.to_string())?;
                let want: Vec<i64> = (0..world as i64).flat_map(|r| [r, -1]).collect();
                expect(
                    got.to_vec::<i64>().map_err(|e| format!("{e:?}"))?,
                    want,
                    "i64",
                )?;
                let got = c
                    .all_gather_flat(TensorData::new(vec![bf16::from_f32(rank as f32)], [1]))
                    .map_err(|e| e.to_string())?;
                let want: Vec<bf16> = (0..world).map(|r| bf16::from_f32(r as f32)).collect();
                expect(
                    got.to_vec::<bf16>().map_err(|e| format!("{e:?}"))?,
                    want,
                    "bf16",
                )?;
                // an empty buffer gathers to an empty one
                let got = c
                    .all_gather_flat(TensorData::new(Vec::<f32>::new(), [0]))
                    .map_err(|e| e.to_string())?;
                expect(got.num_elements(), 0, "empty")
            })
            .unwrap();
        }
    }

    #[test]
    fn a_length_that_does_not_divide_among_the_ranks_is_a_typed_error() {
        let message = launch_threads(&launch(3, Duration::from_secs(30)), |_, c| {
            match c.reduce_scatter(TensorData::new(vec![1.0f32; 7], [7]), ReduceOp::Sum) {
                Err(CollectiveError::InvalidShape {
                    operation: "reduce_scatter",
                    shape,
                    ..
                }) if shape == vec![7] => {}
                other => return Err(format!("unexpected {other:?}")),
            }
            // the group is still usable afterwards
            c.barrier().map_err(|e| e.to_string())?;
            let err = c
                .reduce_scatter(TensorData::new(vec![1.0f32; 7], [7]), ReduceOp::Sum)
                .unwrap_err();
            Ok(err.to_string())
        })
        .unwrap();
        assert!(
            message.contains("[7]")
                && message.contains("world size 3")
                && message.contains("6 or 9"),
            "{message}"
        );
    }

    #[test]
    fn buffers_of_more_than_one_dimension_are_a_typed_error() {
        launch_threads(&launch(2, Duration::from_secs(30)), |_, c| {
            let square = || TensorData::new(vec![1.0f32; 4], [2, 2]);
            for err in [
                c.reduce_scatter(square(), ReduceOp::Sum).unwrap_err(),
                c.all_gather_flat(square()).unwrap_err(),
            ] {
                let shape_error =
                    matches!(&err, CollectiveError::InvalidShape { shape, .. } if shape == &[2, 2]);
                if !shape_error {
                    return Err(format!("unexpected {err}"));
                }
            }
            // booleans have no sum
            let err = c
                .reduce_scatter(TensorData::new(vec![true, false], [2]), ReduceOp::Sum)
                .unwrap_err();
            match err {
                CollectiveError::UnsupportedDtype {
                    operation: "reduce_scatter",
                    ..
                } => Ok(()),
                other => Err(format!("unexpected {other}")),
            }
        })
        .unwrap();
    }

    #[test]
    fn lengths_or_dtypes_that_differ_across_ranks_are_a_mismatch() {
        let err = launch_threads(&launch(2, Duration::from_secs(60)), |rank, c| {
            let n = if rank == 0 { 4 } else { 6 };
            c.reduce_scatter(TensorData::new(vec![0.0f32; n], [n]), ReduceOp::Sum)
                .map_err(|e| e.to_string())?;
            Ok(())
        })
        .unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("reduce_scatter")
                && message.contains("[4]")
                && message.contains("[6]"),
            "{message}"
        );
        let err = launch_threads(&launch(2, Duration::from_secs(60)), |rank, c| {
            let data = if rank == 0 {
                TensorData::new(vec![0.0f32; 2], [2])
            } else {
                TensorData::new(vec![0.0f64; 2], [2])
            };
            c.all_gather_flat(data).map_err(|e| e.to_string())?;
            Ok(())
        })
        .unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("all_gather_flat")
                && message.contains("F32")
                && message.contains("F64"),
            "{message}"
        );
    }

    #[test]
    fn a_late_rank_times_out_and_a_failed_one_releases_the_others() {
        let start = Instant::now();
        let err = launch_threads(&launch(2, Duration::from_millis(300)), |rank, c| {
            if rank == 1 {
                std::thread::sleep(Duration::from_millis(1_500));
            }
            c.reduce_scatter(TensorData::new(vec![1.0f32; 4], [4]), ReduceOp::Sum)
                .map_err(|e| e.to_string())?;
            Ok(())
        })
        .unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(5));
        crate::launcher::tests::assert_rank_failed(err, 1, "reduce_scatter");
        let start = Instant::now();
        let err = launch_threads(&launch(3, Duration::from_secs(60)), |rank, c| {
            if rank == 2 {
                return Err("rank two gives up".into());
            }
            c.all_gather_flat(TensorData::new(vec![1.0f32; 4], [4]))
                .map_err(|e| e.to_string())?;
            Ok(())
        })
        .unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(10));
        crate::launcher::tests::assert_rank_failed(err, 2, "rank two gives up");
    }
}
