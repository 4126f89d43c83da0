//! The one error type of burn-fabric. Every message names the bad value and, where there is a
//! list of good ones, the list.

use std::time::Duration;

/// Everything that can go wrong in a Fabric call.
#[derive(Debug, thiserror::Error)]
pub enum FabricError {
    /// A setting (accelerator, devices, strategy, precision, num_nodes, reduce op, ...) has a
    /// value Fabric does not know.
    #[error("invalid {setting} `{value}`: valid values are {valid}")]
    InvalidSetting {
        /// Which setting, e.g. `"accelerator"`.
        setting: &'static str,
        /// The value that was given.
        value: String,
        /// The values that are accepted.
        valid: String,
    },

    /// A precision that parses but that this build of burn-fabric cannot run yet.
    #[error("precision `{precision}` is not available yet: {reason}; available now: {available}")]
    PrecisionNotAvailable {
        /// The requested precision, in Lightning's spelling.
        precision: String,
        /// Why it cannot run.
        reason: String,
        /// The precisions that can run.
        available: String,
    },

    /// A strategy that parses but cannot run in this build.
    #[error("strategy `{strategy}` is not available: {reason}")]
    StrategyNotAvailable {
        /// The requested strategy.
        strategy: String,
        /// Why it cannot run.
        reason: String,
    },

    /// The backend compiled in cannot run on the requested accelerator.
    #[error(
        "accelerator `{accelerator}` is not available with the `{backend}` backend; it runs on: {available}"
    )]
    AcceleratorUnavailable {
        /// The accelerator asked for.
        accelerator: String,
        /// The backend compiled in.
        backend: &'static str,
        /// The accelerators this backend supports.
        available: String,
    },

    /// The backend supports the accelerator, but this machine cannot run it (no driver, no
    /// device, no adapter, no NCCL library).
    #[error("the `{backend}` backend cannot use `{accelerator}` on this machine: {reason}")]
    DriverUnavailable {
        /// The backend's name.
        backend: &'static str,
        /// The accelerator.
        accelerator: String,
        /// What is missing.
        reason: String,
    },

    /// More devices were requested than the machine has.
    #[error(
        "requested {requested} `{accelerator}` device(s) but this machine has only {available}"
    )]
    TooManyDevices {
        /// The accelerator.
        accelerator: String,
        /// How many were asked for.
        requested: usize,
        /// How many exist.
        available: usize,
    },

    /// A device index that does not exist, or a repeated one.
    #[error("device ids {requested:?} are not valid for `{accelerator}`: the machine has ids {available:?}{}", if *.duplicate { " and ids must be unique" } else { "" })]
    InvalidDeviceIds {
        /// The accelerator.
        accelerator: String,
        /// The ids asked for.
        requested: Vec<usize>,
        /// The ids that exist.
        available: Vec<usize>,
        /// True when the problem is a repeated id.
        duplicate: bool,
    },

    /// A value set in code conflicts with the one `fabric run` put in the environment.
    #[error(
        "your code sets {setting}=`{code}` but it conflicts with {env_var}=`{env}` set through the `fabric run` CLI; remove the value from your code or from the CLI"
    )]
    EnvConflict {
        /// The setting name.
        setting: &'static str,
        /// The value in code.
        code: String,
        /// The environment variable.
        env_var: &'static str,
        /// Its value.
        env: String,
    },

    /// An operation that needs all ranks started was called before [`launch`].
    ///
    /// [`launch`]: https://docs.rs/burn-fabric/latest/burn_fabric/struct.Fabric.html#method.launch
    #[error(
        "to use Fabric with more than one device, call `launch(..)` first (called `{operation}` with {world_size} devices configured)"
    )]
    NotLaunched {
        /// The operation that was attempted.
        operation: &'static str,
        /// The configured world size.
        world_size: usize,
    },

    /// `launch` was called on a Fabric that is already running as one rank.
    #[error("`launch` was called again inside rank {rank}; calling it twice is not allowed")]
    AlreadyLaunched {
        /// The rank that called it.
        rank: usize,
    },

    /// `backward` under a `*-mixed` precision got a loss that no forward pass through the
    /// precision context produced, so half precision would silently not have applied.
    #[error(
        "`backward` under `{precision}` got a loss computed outside the precision context: run the forward pass as `fabric.forward(&model, x, |m, x| m.forward(x))` (or inside `fabric.autocast`) so that it runs in half precision"
    )]
    PrecisionBypassed {
        /// The precision in force.
        precision: String,
    },

    /// A rank returned an error or panicked.
    #[error("rank {rank} failed: {message}")]
    RankFailed {
        /// The global rank that failed first.
        rank: usize,
        /// Its error or panic message.
        message: String,
    },

    /// A collective operation failed (timeout, a peer died, mismatched calls).
    #[error(transparent)]
    Collective(#[from] CollectiveError),

    /// The total gradient norm was NaN or infinite while clipping.
    #[error(
        "the total norm of order {norm_type} of the gradients is non-finite ({norm}), so it cannot be clipped"
    )]
    NonFiniteNorm {
        /// The norm order.
        norm_type: f64,
        /// The computed norm.
        norm: f64,
    },

    /// An argument outside its domain (e.g. a batch size of 0).
    #[error("invalid argument `{name}` = {value}: {reason}")]
    InvalidArgument {
        /// The argument name.
        name: &'static str,
        /// Its value.
        value: String,
        /// What is allowed.
        reason: String,
    },

    /// Tensor data could not be read or converted.
    #[error("tensor data error in {context}: {message}")]
    Data {
        /// Where it happened.
        context: &'static str,
        /// The underlying message.
        message: String,
    },

    /// A checkpoint could not be written, read or applied.
    #[error("checkpoint {path}{}: {reason}", .key.as_ref().map(|k| format!(", entry `{k}`")).unwrap_or_default())]
    Checkpoint {
        /// The file.
        path: String,
        /// The first offending entry, when one is to blame.
        key: Option<String>,
        /// What is wrong.
        reason: String,
    },

    /// Something that configures fine but needs a capability this build lacks.
    #[error("{what} is not supported: {reason}")]
    Unsupported {
        /// What was asked for.
        what: String,
        /// Why, and what to do instead.
        reason: String,
    },
}

/// Failure of a collective operation. Every variant names the rank and operation involved, so a
/// hung or crashed job says who caused it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CollectiveError {
    /// Waited longer than the collective timeout.
    #[error(
        "rank {rank} timed out after {timeout:?} in `{operation}` waiting for rank(s) {missing:?}"
    )]
    Timeout {
        /// The rank that gave up.
        rank: usize,
        /// The operation.
        operation: &'static str,
        /// The configured timeout.
        timeout: Duration,
        /// The ranks that never arrived.
        missing: Vec<usize>,
    },

    /// The group was torn down because another rank failed.
    #[error(
        "rank {rank} was released from `{operation}` because rank {failed_rank} failed: {reason}"
    )]
    Aborted {
        /// The rank that was waiting.
        rank: usize,
        /// The operation it was in.
        operation: &'static str,
        /// The rank that failed first.
        failed_rank: usize,
        /// What happened to it.
        reason: String,
    },

    /// A peer finished its work while this rank still waited for it in a collective.
    #[error("rank {rank} waited in `{operation}` but rank {peer} had already returned")]
    PeerExited {
        /// The waiting rank.
        rank: usize,
        /// The operation.
        operation: &'static str,
        /// The rank that left.
        peer: usize,
    },

    /// Ranks called different operations, or the same one with different shapes or dtypes.
    #[error("collective mismatch at rank {rank}: {detail}")]
    Mismatch {
        /// The rank that found the mismatch.
        rank: usize,
        /// What differed.
        detail: String,
    },

    /// The operation does not apply to this dtype (e.g. a sum of booleans).
    #[error("`{operation}` does not support dtype {dtype}")]
    UnsupportedDtype {
        /// The operation.
        operation: &'static str,
        /// The dtype, as Burn prints it.
        dtype: String,
    },

    /// A device engine (NCCL) refused or failed an operation.
    #[error("rank {rank}: `{engine}` failed in `{operation}`: {message}")]
    Engine {
        /// The rank that saw the failure.
        rank: usize,
        /// The engine, e.g. `"nccl"`.
        engine: &'static str,
        /// The operation.
        operation: &'static str,
        /// What went wrong.
        message: String,
    },

    /// A buffer whose shape the operation cannot take: `reduce_scatter` and `all_gather_flat`
    /// take one dimension, and `reduce_scatter` a length that is a multiple of the world size.
    #[error("rank {rank}: `{operation}` cannot take a buffer of shape {shape:?}: {valid}")]
    InvalidShape {
        /// The rank that passed it.
        rank: usize,
        /// The operation.
        operation: &'static str,
        /// The shape that was passed.
        shape: Vec<usize>,
        /// What the operation accepts.
        valid: String,
    },

    /// A source rank outside `0..world_size`.
    #[error("source rank {src} is out of range for world size {world_size}")]
    InvalidRank {
        /// The rank given.
        src: usize,
        /// The world size.
        world_size: usize,
    },
}
