//! `--backend`: picks, at run time, one of the backends this build was compiled with (Cargo
//! features `flex`, `ndarray`, `tch`, `wgpu`, `cuda`); without the flag, `DefaultBackend`.

use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use burn_fabric::BackendDevices;

/// Work generic over the backend, run by [`with_backend`].
pub trait BackendJob {
    /// What the job returns.
    type Output;
    /// Runs the job on backend `B`.
    fn run<B: AutodiffBackend + BackendDevices>(self) -> Self::Output;
}

/// A `--backend` value this build cannot run.
#[derive(Debug, thiserror::Error)]
#[error(
    "backend `{name}` is not compiled into this build; compiled in: {compiled} (add the Cargo feature, e.g. `--features {name}`)"
)]
pub struct UnknownBackend {
    /// The requested name.
    pub name: String,
    /// The backends this build has.
    pub compiled: String,
}

/// The backends compiled into this build.
pub fn compiled() -> Vec<&'static str> {
    [
        ("flex", cfg!(feature = "flex")),
        ("ndarray", cfg!(feature = "ndarray")),
        ("tch", cfg!(feature = "tch")),
        ("wgpu", cfg!(feature = "wgpu")),
        ("cuda", cfg!(feature = "cuda")),
    ]
    .into_iter()
    .filter_map(|(name, on)| on.then_some(name))
    .collect()
}

/// Runs `job` on the backend named `name` (`None`: `DefaultBackend`).
pub fn with_backend<J: BackendJob>(
    name: Option<&str>,
    job: J,
) -> Result<J::Output, UnknownBackend> {
    match name {
        None => Ok(job.run::<burn_fabric::DefaultBackend>()),
        #[cfg(feature = "flex")]
        Some("flex") => Ok(job.run::<Autodiff<burn::backend::Flex>>()),
        #[cfg(feature = "ndarray")]
        Some("ndarray") => Ok(job.run::<Autodiff<burn::backend::NdArray>>()),
        #[cfg(feature = "tch")]
        Some("tch") => Ok(job.run::<Autodiff<burn::backend::LibTorch>>()),
        #[cfg(feature = "wgpu")]
        Some("wgpu") => Ok(job.run::<Autodiff<burn::backend::Wgpu>>()),
        #[cfg(feature = "cuda")]
        Some("cuda") => Ok(job.run::<Autodiff<burn::backend::Cuda>>()),
        Some(other) => Err(UnknownBackend {
            name: other.to_string(),
            compiled: compiled().join(", "),
        }),
    }
}

/// Defines an example's `main` (parse the flags, run, print the error and exit with status 1 on
/// failure) and `pub fn run(&Args) -> Result<Report, Box<dyn Error>>`, which runs the example's
/// `run_on::<B>(&Args)` on the backend `--backend` names (default: the build's
/// `DefaultBackend`). `Args` must flatten [`FabricArgs`](crate::args::FabricArgs) as `fabric`.
///
/// ```text
/// fabric_examples::example_main!(Args, Report);
/// ```
#[macro_export]
macro_rules! example_main {
    ($args:ty, $report:ty) => {
        fn main() -> ::std::process::ExitCode {
            match run(&<$args as $crate::__clap::Parser>::parse()) {
                Ok(_) => ::std::process::ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("error: {err}");
                    ::std::process::ExitCode::FAILURE
                }
            }
        }

        /// Runs the example on the backend `--backend` names (default: the build's
        /// `DefaultBackend`).
        pub fn run(args: &$args) -> Result<$report, Box<dyn ::std::error::Error>> {
            struct Job<'a>(&'a $args);
            impl $crate::backend::BackendJob for Job<'_> {
                type Output = Result<$report, Box<dyn ::std::error::Error>>;
                fn run<
                    B: $crate::__burn::tensor::backend::AutodiffBackend
                        + $crate::__burn_fabric::BackendDevices,
                >(
                    self,
                ) -> Self::Output {
                    run_on::<B>(self.0)
                }
            }
            $crate::backend::with_backend(args.fabric.backend.as_deref(), Job(args))?
        }
    };
}
