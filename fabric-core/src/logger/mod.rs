//! Loggers: where `Fabric::log` sends metrics, from global rank 0 only. Lightning's directory
//! layout: `root/name/version_N/`, the version chosen when the logger first writes.

mod csv;
mod tensorboard;

pub use csv::CsvLogger;
pub use tensorboard::TensorBoardLogger;

use crate::FabricError;
use std::path::{Path, PathBuf};

/// A metrics sink.
pub trait Logger: Send {
    /// Records `metrics` at `step`.
    fn log_metrics(&mut self, metrics: &[(String, f64)], step: u64) -> Result<(), FabricError>;

    /// Flushes and closes; later logs reopen.
    fn finalize(&mut self) -> Result<(), FabricError> {
        Ok(())
    }

    /// The directory the logger writes into, once it has written.
    fn log_dir(&self) -> Option<PathBuf>;
}

/// The `root/name/version_N` a new run writes into (`N` = the largest existing numeric version
/// + 1, or the given `version` verbatim).
pub(crate) fn version_dir(root: &Path, name: &str, version: Option<&str>) -> PathBuf {
    let base = if name.is_empty() {
        root.to_path_buf()
    } else {
        root.join(name)
    };
    if let Some(version) = version {
        return base.join(version);
    }
    let next = std::fs::read_dir(&base)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.path().is_dir())
                .filter_map(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .strip_prefix("version_")
                        .and_then(|n| n.parse::<u64>().ok())
                })
                .max()
                .map_or(0, |max| max + 1)
        })
        .unwrap_or(0);
    base.join(format!("version_{next}"))
}

/// A [`FabricError`] about a logger's file.
pub(crate) fn io_error(path: &Path, e: std::io::Error) -> FabricError {
    FabricError::Unsupported {
        what: format!("writing the log {}", path.display()),
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_count_up_and_ignore_non_numeric_ones() {
        let root = std::env::temp_dir().join(format!("fabric-versions-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        assert_eq!(version_dir(&root, "run", None), root.join("run/version_0"));
        for v in ["version_0", "version_3", "version_x", "other"] {
            std::fs::create_dir_all(root.join("run").join(v)).unwrap();
        }
        assert_eq!(version_dir(&root, "run", None), root.join("run/version_4"));
        assert_eq!(
            version_dir(&root, "run", Some("best")),
            root.join("run/best")
        );
        assert_eq!(version_dir(&root, "", None), root.join("version_0"));
        let _ = std::fs::remove_dir_all(&root);
    }
}
