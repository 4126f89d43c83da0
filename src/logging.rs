//! `Fabric::log` / `log_dict` and callbacks: reporting from the training loop.

use crate::fabric::Fabric;
use burn::tensor::backend::AutodiffBackend;
use fabric_core::FabricError;
use fabric_core::backend::BackendDevices;
use fabric_core::callback::Callback;
use std::path::PathBuf;
use std::sync::PoisonError;
use std::sync::atomic::Ordering;

impl<B: AutodiffBackend + BackendDevices> Fabric<B> {
    /// Logs one metric to every logger, from global rank 0 (other ranks do nothing). Without a
    /// `step`, a counter of `log` calls is used.
    pub fn log(
        &self,
        name: &str,
        value: f64,
        step: impl Into<Option<u64>>,
    ) -> Result<(), FabricError> {
        self.log_dict([(name, value)], step)
    }

    /// Logs several metrics at one step to every logger, from global rank 0.
    pub fn log_dict<'a>(
        &self,
        metrics: impl IntoIterator<Item = (&'a str, f64)>,
        step: impl Into<Option<u64>>,
    ) -> Result<(), FabricError> {
        if !self.is_global_zero() {
            return Ok(());
        }
        let step = step
            .into()
            .unwrap_or_else(|| self.connector.log_calls.fetch_add(1, Ordering::Relaxed));
        let metrics: Vec<(String, f64)> = metrics
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let mut loggers = self
            .connector
            .loggers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for logger in loggers.iter_mut() {
            logger.log_metrics(&metrics, step)?;
        }
        Ok(())
    }

    /// The first logger's directory, once it has written (Lightning's `fabric.logger.log_dir`).
    pub fn log_dir(&self) -> Option<PathBuf> {
        let loggers = self
            .connector
            .loggers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        loggers.iter().find_map(|l| l.log_dir())
    }

    /// Flushes and closes every logger (also done when the Fabric is dropped).
    pub fn finalize_loggers(&self) -> Result<(), FabricError> {
        let mut loggers = self
            .connector
            .loggers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        loggers.iter_mut().try_for_each(|l| l.finalize())
    }

    /// Adds a callback to this rank.
    pub fn add_callback(&mut self, callback: impl Callback + 'static) {
        self.callbacks.push(Box::new(callback));
    }

    /// Calls `hook` on every callback of this rank, in the order they were added:
    /// `fabric.call(|c| c.on_train_batch_end(&event))`.
    pub fn call(&mut self, mut hook: impl FnMut(&mut dyn Callback)) {
        for callback in self.callbacks.iter_mut() {
            hook(callback.as_mut());
        }
    }

    /// Calls the named hook (`Callback::on_hook`) with JSON arguments on every callback, as
    /// Lightning's `fabric.call("name", ...)`.
    pub fn call_hook(&mut self, name: &str, args: &serde_json::Value) {
        self.call(|callback| callback.on_hook(name, args));
    }
}
