//! The examples' progress bar: shown on global rank 0 only.

use burn::tensor::backend::AutodiffBackend;
use burn_fabric::{BackendDevices, Fabric};
use indicatif::{ProgressBar, ProgressStyle};

/// A bar of `len` `unit`s on global rank 0, a hidden one elsewhere.
pub fn bar<B: AutodiffBackend + BackendDevices>(
    fabric: &Fabric<B>,
    len: u64,
    unit: &str,
) -> ProgressBar {
    if !fabric.is_global_zero() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    let template = format!("{{bar:40}} {{pos}}/{{len}} {unit} {{elapsed_precise}} eta {{eta}}");
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style);
    }
    bar
}
