//! The façade's collectives: tensors of any kind (float, int, bool) of this rank's backend or its
//! inner backend, moved through the strategy's [`Collective`](fabric_collective::Collective).

use crate::fabric::Fabric;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{BasicOps, Tensor, TensorData};
use fabric_collective::Collective;
use fabric_collective::ReduceOp;
use fabric_core::backend::BackendDevices;
use fabric_core::{CollectiveError, FabricError};
use serde::Serialize;
use serde::de::DeserializeOwned;

impl<B: AutodiffBackend + BackendDevices> Fabric<B> {
    /// Moves `tensor` to the host, through `exchange` on this rank's collective, and back to
    /// its device with its dtype.
    fn exchange<BT, const D: usize, K>(
        &self,
        operation: &'static str,
        tensor: Tensor<BT, D, K>,
        exchange: impl FnOnce(&dyn Collective, TensorData) -> Result<TensorData, CollectiveError>,
    ) -> Result<Tensor<BT, D, K>, FabricError>
    where
        BT: Backend<Device = B::Device>,
        K: BasicOps<BT>,
    {
        let collective = self.collective(operation)?;
        let (device, dtype) = (tensor.device(), tensor.dtype());
        let data = exchange(collective, tensor.into_data())?;
        Ok(Tensor::from_data(data, (&device, dtype)))
    }

    /// Waits until every rank gets here.
    pub fn barrier(&self) -> Result<(), FabricError> {
        Ok(self.collective("barrier")?.barrier()?)
    }

    /// Combines `tensor` across ranks element-wise with `op` (`Sum`, `Mean`, `Min`, `Max`;
    /// parse Lightning's strings with `"mean".parse()`). Every rank gets the result; the
    /// identity on one device. Integer means round to nearest.
    pub fn all_reduce<BT, const D: usize, K>(
        &self,
        tensor: Tensor<BT, D, K>,
        op: ReduceOp,
    ) -> Result<Tensor<BT, D, K>, FabricError>
    where
        BT: Backend<Device = B::Device>,
        K: BasicOps<BT>,
    {
        self.exchange("all_reduce", tensor, |c, data| c.all_reduce(data, op))
    }

    /// [`all_reduce`](Self::all_reduce) of one number.
    pub fn all_reduce_scalar(&self, value: f64, op: ReduceOp) -> Result<f64, FabricError> {
        fabric_collective::all_reduce_scalar(self.collective("all_reduce")?, value, op)
    }

    /// Rank `src`'s `tensor` on every rank (the others' `tensor` only says where to put it).
    pub fn broadcast<BT, const D: usize, K>(
        &self,
        tensor: Tensor<BT, D, K>,
        src: usize,
    ) -> Result<Tensor<BT, D, K>, FabricError>
    where
        BT: Backend<Device = B::Device>,
        K: BasicOps<BT>,
    {
        self.exchange("broadcast", tensor, |c, data| c.broadcast(data, src))
    }

    /// Rank `src`'s `value` on every rank, for any serde value (Lightning broadcasts any
    /// picklable object).
    pub fn broadcast_object<T: Serialize + DeserializeOwned>(
        &self,
        value: &T,
        src: usize,
    ) -> Result<T, FabricError> {
        let collective = self.collective("broadcast")?;
        let bad = |e: serde_json::Error| FabricError::Data {
            context: "broadcast_object",
            message: e.to_string(),
        };
        let bytes = serde_json::to_vec(value).map_err(bad)?;
        let len = bytes.len();
        let data = collective.broadcast(TensorData::new(bytes, [len]), src)?;
        serde_json::from_slice(data.as_bytes()).map_err(bad)
    }

    /// Every rank's `tensor`, stacked along a new first dimension: `[world_size, ...]` (also
    /// `[1, ...]` on one device, unlike Lightning, so the result's rank never depends on the
    /// world size). `D2` must be `D + 1`; shapes and dtypes must match across ranks.
    pub fn all_gather<BT, const D: usize, const D2: usize, K>(
        &self,
        tensor: Tensor<BT, D, K>,
    ) -> Result<Tensor<BT, D2, K>, FabricError>
    where
        BT: Backend<Device = B::Device>,
        K: BasicOps<BT>,
    {
        const {
            assert!(
                D2 == D + 1,
                "all_gather adds one dimension: D2 must be D + 1"
            )
        };
        let collective = self.collective("all_gather")?;
        let (device, dtype) = (tensor.device(), tensor.dtype());
        let parts = collective.all_gather(tensor.into_data())?;
        let tensors: Vec<Tensor<BT, D, K>> = parts
            .into_iter()
            .map(|data| Tensor::from_data(data, (&device, dtype)))
            .collect();
        Ok(Tensor::stack(tensors, 0))
    }
}
