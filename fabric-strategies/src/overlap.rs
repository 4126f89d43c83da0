//! DDP's gradient averaging overlapped with the backward pass (PyTorch DDP's bucketed
//! all-reduce started from gradient hooks).
//!
//! Inside `Fabric::forward`, each `burn_fabric::unit` watches its module's parameters
//! ([`fabric_core::watch`]): backward hands each one's gradient here right after the unit's
//! backward. The watched parameters are bucketed in the reverse of the order the forward pass
//! watched them (the order backward finishes them, the same on every rank); a bucket whose
//! gradients are all in is handed to the rank's communication thread, which averages it while
//! backward goes on. The strategy collects the results when backward ends ([`Overlap::finish`]),
//! with the rest of the gradients averaged as before.

use crate::bucket::{plan_buckets, reduce_bucket, reduce_buckets};
use crate::comm_thread::{CommThread, stopped};
use crate::grads::GradStore;
use crate::module::{FlatGrad, ParamSlot};
use burn::module::ParamId;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use fabric_collective::Collective;
use fabric_core::FabricError;
use fabric_core::gather::TrackedGather;
use fabric_core::watch::GradSink;
use std::collections::HashMap;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// What a forward pass needs to watch parameters: where their gradients go and the training
/// backend's watch operation.
#[derive(Clone)]
pub struct ParamWatch {
    /// The rank's overlapped averaging.
    pub sink: Arc<dyn WatchSink>,
    /// The training backend's tracked operations.
    pub tracked: TrackedGather,
}

/// A [`GradSink`] that is told which parameters a forward pass watches.
pub trait WatchSink: GradSink {
    /// A forward pass watches one use of parameter `id` (`numel` elements of `dtype`).
    fn watch(&self, id: ParamId, numel: usize, dtype: DType);

    /// This sink as a plain [`GradSink`], for the autodiff operation.
    fn as_sink(self: Arc<Self>) -> Arc<dyn GradSink>;
}

/// One rank's overlapped averaging.
pub struct Overlap<B: Backend> {
    collective: Arc<dyn Collective>,
    device: B::Device,
    bucket_bytes: usize,
    grads: Arc<Mutex<GradStore<B>>>,
    state: Mutex<State<B>>,
    comm: CommThread,
}

/// The watched parameters since the last [`Overlap::finish`] and the gradients come in.
struct State<B: Backend> {
    /// Watched parameters in the order the forward passes first watched them.
    order: Vec<Watched>,
    index: HashMap<ParamId, usize>,
    /// The buckets (of positions in `order`, last watched first), planned at the first
    /// gradient; the first of them are with the communication thread, whose averages of them
    /// `sent` awaits.
    buckets: Vec<Vec<usize>>,
    sent: Vec<Receiver<Averaging<B>>>,
    grads: Vec<Option<Tensor<B, 1>>>,
}

struct Watched {
    id: ParamId,
    numel: usize,
    dtype: DType,
    /// Uses whose gradient has not come in yet.
    waiting: usize,
}

/// A bucket's averaged gradients from the communication thread.
type Averaging<B> = Result<Vec<FlatGrad<B>>, FabricError>;

/// Averaged gradients of the watched parameters, by id (`None`: no rank had one).
pub type Averaged<B> = HashMap<ParamId, Option<Tensor<B, 1>>>;

impl<B: Backend> Overlap<B> {
    /// Overlapped averaging through `collective` in buckets of about `bucket_bytes`, adding the
    /// gradients stored in `grads` (accumulated under `no_backward_sync`) to what it averages.
    pub fn new(
        collective: Arc<dyn Collective>,
        device: B::Device,
        bucket_bytes: usize,
        grads: Arc<Mutex<GradStore<B>>>,
    ) -> Self {
        Self {
            comm: CommThread::new(collective.rank()),
            collective,
            device,
            bucket_bytes,
            grads,
            state: Mutex::new(State {
                order: Vec::new(),
                index: HashMap::new(),
                buckets: Vec::new(),
                sent: Vec::new(),
                grads: Vec::new(),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State<B>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Hands every bucket from `state.sent` on whose gradients are all in (every bucket with
    /// `all`) to the communication thread, in order — but never the last one, which
    /// [`finish`](Self::finish) averages together with the leftover flags.
    fn send_ready(&self, state: &mut State<B>, all: bool) {
        while state.sent.len() + 1 < state.buckets.len() {
            let k = state.sent.len();
            let bucket = &state.buckets[k];
            if !all && bucket.iter().any(|&i| state.order[i].waiting > 0) {
                return;
            }
            let (members, dtype) = self.members(state, k);
            let (collective, device) = (Arc::clone(&self.collective), self.device.clone());
            let averaged = self
                .comm
                .run(move || reduce_bucket(&*collective, &device, members, dtype, None));
            state.sent.push(averaged);
        }
    }

    /// Bucket `k`'s gradients: what backward handed over plus what `no_backward_sync` passes
    /// stored; and their dtype.
    fn members(&self, state: &mut State<B>, k: usize) -> (Vec<FlatGrad<B>>, DType) {
        let mut stored = self.grads.lock().unwrap_or_else(PoisonError::into_inner);
        let bucket = &state.buckets[k];
        let members = bucket
            .iter()
            .map(|&i| {
                let watched = &state.order[i];
                let grad = sum(state.grads[i].take(), stored.remove(watched.id));
                FlatGrad {
                    numel: watched.numel,
                    dtype: watched.dtype,
                    grad,
                }
            })
            .collect();
        (members, state.order[bucket[0]].dtype)
    }

    /// Ends a backward pass: sends the buckets still waiting (a parameter some use of which got
    /// no gradient counts as it is), waits for them, averages the last bucket here, and then
    /// what `grads` (the backward pass's gradients in `layout` order) holds for the watched
    /// parameters — this rank's gradient of a parameter also used outside its unit — where
    /// any rank has some (presence flags travel with the last bucket). Takes the watched
    /// parameters out of `grads` and returns their averages. `None` when no parameter was
    /// watched.
    pub fn finish(
        &self,
        layout: &[ParamSlot],
        grads: &mut [Option<Tensor<B, 1>>],
    ) -> Option<Result<Averaged<B>, FabricError>> {
        let mut state = self.state();
        if state.order.is_empty() {
            return None;
        }
        let mut leftover = HashMap::new();
        for (slot, grad) in layout.iter().zip(grads.iter_mut()) {
            if state.index.contains_key(&slot.id)
                && let Some(grad) = grad.take()
            {
                leftover.insert(slot.id, grad);
            }
        }
        if state.buckets.is_empty() {
            plan(&mut state, self.bucket_bytes);
        }
        self.send_ready(&mut state, true);
        // The last bucket (the first unit's parameters, the last backward finishes) travels
        // from here, with one flag per watched parameter: 1 where this rank has a leftover.
        let last = state.buckets.len() - 1;
        let (mut members, dtype) = self.members(&mut state, last);
        let flags: Vec<f32> = state
            .order
            .iter()
            .map(|w| f32::from(u8::from(leftover.contains_key(&w.id))))
            .collect();
        let count = flags.len();
        members.push(FlatGrad {
            numel: count,
            dtype: DType::F32,
            grad: Some(Tensor::from_data(
                TensorData::new(flags, [count]),
                (&self.device, DType::F32),
            )),
        });
        let order = std::mem::take(&mut state.order);
        let buckets = std::mem::take(&mut state.buckets);
        let sent = std::mem::take(&mut state.sent);
        state.index.clear();
        state.grads.clear();
        drop(state);
        let mut averaged = HashMap::new();
        let mut first_error = None;
        let mut keep = |bucket: usize, result: Result<Vec<FlatGrad<B>>, FabricError>| match result {
            Ok(grads) => {
                for (&i, grad) in buckets[bucket].iter().zip(grads) {
                    averaged.insert(order[i].id, grad.grad);
                }
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        };
        for (bucket, averaged) in sent.into_iter().enumerate() {
            // A stopped thread dropped the bucket.
            keep(
                bucket,
                averaged.recv().unwrap_or_else(|_| Err(self.stopped())),
            );
        }
        // Every bucket before it is averaged: this rank's collective is free again.
        let mut last_grads = reduce_bucket(&*self.collective, &self.device, members, dtype, None);
        let flags = match &mut last_grads {
            Ok(grads) => grads.pop().and_then(|f| f.grad),
            Err(_) => None,
        };
        keep(last, last_grads);
        if let Some(error) = first_error {
            return Some(Err(error));
        }
        let flags = flags.map(|f| f.into_data().convert::<f32>().to_vec::<f32>());
        let flags = match flags {
            Some(Ok(flags)) => flags,
            _ => return Some(Err(self.stopped())),
        };
        Some(self.settle_leftover(&order, &flags, &mut leftover, averaged))
    }

    /// The error of a communication thread that stopped (or of flags that did not come back).
    fn stopped(&self) -> FabricError {
        FabricError::Collective(stopped(self.collective.rank(), "overlap", "all_reduce"))
    }

    /// Adds the average of the leftover gradients of the watched parameters that some rank
    /// has (`flags`, averaged over the ranks: above zero where any rank has one) to `averaged`.
    fn settle_leftover(
        &self,
        order: &[Watched],
        flags: &[f32],
        leftover: &mut HashMap<ParamId, Tensor<B, 1>>,
        mut averaged: Averaged<B>,
    ) -> Result<Averaged<B>, FabricError> {
        let extra: Vec<&Watched> = order
            .iter()
            .zip(flags)
            .filter(|(_, f)| **f > 0.0)
            .map(|(w, _)| w)
            .collect();
        if extra.is_empty() {
            return Ok(averaged);
        }
        let grads = extra
            .iter()
            .map(|w| FlatGrad {
                numel: w.numel,
                dtype: w.dtype,
                grad: leftover.remove(&w.id),
            })
            .collect();
        let reduced = reduce_buckets(
            &*self.collective,
            &self.device,
            grads,
            self.bucket_bytes,
            None,
        )?;
        for (w, grad) in extra.into_iter().zip(reduced) {
            let total = sum(averaged.remove(&w.id).flatten(), grad.grad);
            averaged.insert(w.id, total);
        }
        Ok(averaged)
    }
}

/// `a + b`, either alone when the other is absent.
fn sum<B: Backend>(a: Option<Tensor<B, 1>>, b: Option<Tensor<B, 1>>) -> Option<Tensor<B, 1>> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a + b),
        (a, b) => a.or(b),
    }
}

/// Buckets the watched parameters, last watched first.
fn plan<B: Backend>(state: &mut State<B>, bucket_bytes: usize) {
    let reversed: Vec<usize> = (0..state.order.len()).rev().collect();
    let sizes: Vec<(usize, DType)> = reversed
        .iter()
        .map(|&i| (state.order[i].numel, state.order[i].dtype))
        .collect();
    state.buckets = plan_buckets(&sizes, bucket_bytes)
        .into_iter()
        .map(|b| reversed[b.tensors].to_vec())
        .collect();
    state.grads = (0..state.order.len()).map(|_| None).collect();
}

impl<B: Backend> GradSink for Overlap<B> {
    fn ready(&self, id: ParamId, grad: TensorData) {
        let mut state = self.state();
        let Some(&i) = state.index.get(&id) else {
            return;
        };
        if state.buckets.is_empty() {
            plan(&mut state, self.bucket_bytes);
        }
        let dtype = grad.dtype;
        let grad = Tensor::<B, 1>::from_data(grad, (&self.device, dtype));
        state.grads[i] = sum(state.grads[i].take(), Some(grad));
        let watched = &mut state.order[i];
        watched.waiting = watched.waiting.saturating_sub(1);
        self.send_ready(&mut state, false);
    }
}

impl<B: Backend> WatchSink for Overlap<B> {
    fn watch(&self, id: ParamId, numel: usize, dtype: DType) {
        let mut state = self.state();
        match state.index.get(&id) {
            Some(&i) => state.order[i].waiting += 1,
            None => {
                let i = state.order.len();
                state.order.push(Watched {
                    id,
                    numel,
                    dtype,
                    waiting: 1,
                });
                state.index.insert(id, i);
            }
        }
    }

    fn as_sink(self: Arc<Self>) -> Arc<dyn GradSink> {
        self
    }
}
