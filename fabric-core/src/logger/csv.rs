//! Lightning's `CSVLogger`: `root/name/version_N/metrics.csv`, one row per logged step, the
//! header the sorted union of every key seen (with `step`). A new key rewrites the file with the
//! wider header; otherwise rows are appended. Unlike Lightning, the automatic step is a real
//! counter, not the number of buffered rows.

use super::{Logger, io_error, version_dir};
use crate::FabricError;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;

/// Metrics as CSV.
pub struct CsvLogger {
    root: PathBuf,
    name: String,
    version: Option<String>,
    dir: Option<PathBuf>,
    keys: BTreeSet<String>,
    rows: Vec<BTreeMap<String, String>>,
}

impl CsvLogger {
    /// A logger writing under `root/name/version_N` (Lightning's default name is
    /// `lightning_logs`).
    pub fn new(root: impl Into<PathBuf>, name: impl Into<String>) -> Self {
        Self {
            root: root.into(),
            name: name.into(),
            version: None,
            dir: None,
            keys: BTreeSet::from(["step".to_string()]),
            rows: Vec::new(),
        }
    }

    /// A fixed version directory name instead of the next `version_N`.
    pub fn with_version(mut self, version: impl Into<String>) -> Self {
        self.version = Some(version.into());
        self
    }

    fn file(&mut self) -> Result<PathBuf, FabricError> {
        let dir = match &self.dir {
            Some(dir) => dir.clone(),
            None => {
                let dir = version_dir(&self.root, &self.name, self.version.as_deref());
                std::fs::create_dir_all(&dir).map_err(|e| io_error(&dir, e))?;
                self.dir = Some(dir.clone());
                dir
            }
        };
        Ok(dir.join("metrics.csv"))
    }

    fn line(&self, row: &BTreeMap<String, String>) -> String {
        let cells: Vec<&str> = self
            .keys
            .iter()
            .map(|k| row.get(k).map_or("", String::as_str))
            .collect();
        cells.join(",")
    }
}

/// Quotes a CSV field when it needs it.
fn field(text: &str) -> String {
    if text.contains([',', '"', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

impl Logger for CsvLogger {
    fn log_metrics(&mut self, metrics: &[(String, f64)], step: u64) -> Result<(), FabricError> {
        let path = self.file()?;
        let mut row = BTreeMap::from([("step".to_string(), step.to_string())]);
        let mut widened = !path.exists();
        for (key, value) in metrics {
            widened |= self.keys.insert(field(key));
            row.insert(field(key), value.to_string());
        }
        self.rows.push(row);
        let write = || -> std::io::Result<()> {
            if widened {
                let mut file = File::create(&path)?;
                let header: Vec<&str> = self.keys.iter().map(String::as_str).collect();
                writeln!(file, "{}", header.join(","))?;
                for row in &self.rows {
                    writeln!(file, "{}", self.line(row))?;
                }
            } else if let Some(row) = self.rows.last() {
                let mut file = OpenOptions::new().append(true).open(&path)?;
                writeln!(file, "{}", self.line(row))?;
            }
            Ok(())
        };
        write().map_err(|e| io_error(&path, e))
    }

    fn log_dir(&self) -> Option<PathBuf> {
        self.dir.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_grows_with_new_keys_and_rows_keep_their_cells() {
        let root = std::env::temp_dir().join(format!("fabric-csv-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let mut logger = CsvLogger::new(&root, "run");
        logger.log_metrics(&[("loss".into(), 0.5)], 0).unwrap();
        logger.log_metrics(&[("loss".into(), 0.25)], 1).unwrap();
        logger
            .log_metrics(&[("acc".into(), 0.9), ("loss".into(), 0.125)], 2)
            .unwrap();
        let text = std::fs::read_to_string(root.join("run/version_0/metrics.csv")).unwrap();
        assert_eq!(text, "acc,loss,step\n,0.5,0\n,0.25,1\n0.9,0.125,2\n");
        logger.log_metrics(&[("loss".into(), 1.0)], 3).unwrap();
        let text = std::fs::read_to_string(root.join("run/version_0/metrics.csv")).unwrap();
        assert!(text.ends_with("0.9,0.125,2\n,1,3\n"), "{text}");
        // a second logger starts version_1
        let mut second = CsvLogger::new(&root, "run");
        second.log_metrics(&[("x".into(), 1.0)], 0).unwrap();
        assert_eq!(second.log_dir(), Some(root.join("run/version_1")));
        let _ = std::fs::remove_dir_all(&root);
    }
}
