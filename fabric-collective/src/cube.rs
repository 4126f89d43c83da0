//! Between Burn's fusion tensors and the CubeCL buffers under them, for the device engines
//! (NCCL, the fused shared-device engine). Burn's `Wgpu` and `Cuda` are `Fusion<CubeBackend>`:
//! a tensor is an entry in a lazy fusion stream, and its buffer exists only once the stream has
//! run the operations that make it.

use burn::tensor::{Tensor, TensorPrimitive};
use burn_fusion::client::GlobalFusionClient;
use burn_fusion::stream::OperationStreams;
use burn_fusion::{Fusion, FusionBackend, NoOp};
use burn_ir::{BackendIr, InitOperationIr, OperationIr, OperationOutput};

pub use burn_cubecl::tensor::CubeTensor;
pub use burn_cubecl::{CubeBackend, CubeRuntime};

/// The fusion client of a `Fusion<C>` tensor, to put results back where the tensor came from.
pub type FusionClient<C> = GlobalFusionClient<<C as FusionBackend>::FusionRuntime>;

/// Runs what the fusion stream still holds for `tensor` and returns its CubeCL tensor
/// (contiguous) with the fusion client it came from.
pub fn into_cube<R, C>(tensor: Tensor<Fusion<C>, 1>) -> (CubeTensor<R>, FusionClient<C>)
where
    R: CubeRuntime,
    C: FusionBackend<FloatTensorPrimitive = CubeTensor<R>>,
{
    let fusion = tensor.into_primitive().tensor();
    let client = fusion.client.clone();
    let cube = burn_cubecl::kernel::into_contiguous(client.resolve_tensor_float::<C>(fusion));
    (cube, client)
}

/// Puts a CubeCL tensor back into the fusion stream of `client` as a `Fusion<C>` tensor.
pub fn from_cube<R, C>(client: &FusionClient<C>, tensor: CubeTensor<R>) -> Tensor<Fusion<C>, 1>
where
    R: CubeRuntime,
    C: FusionBackend<FloatTensorPrimitive = CubeTensor<R>> + BackendIr,
{
    let (shape, dtype) = (tensor.meta.shape().clone(), tensor.dtype);
    let handle = <C as BackendIr>::float_tensor_handle(tensor);
    let desc = InitOperationIr::create(shape, dtype, || client.register_tensor_handle(handle));
    let fusion = client
        .register(
            OperationStreams::default(),
            OperationIr::Init(desc),
            NoOp::<C>::new(),
        )
        .output();
    Tensor::from_primitive(TensorPrimitive::Float(fusion))
}
