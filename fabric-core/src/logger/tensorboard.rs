//! Lightning's `TensorBoardLogger`: scalar summaries in a TensorFlow event file under
//! `root/name/version_N/`, readable by TensorBoard.
//!
//! The file is a TFRecord stream: each record is its length (u64 LE), the masked CRC-32C of the
//! length, the bytes, and their masked CRC-32C; each record holds one `Event` protocol buffer
//! (the first one announcing `brain.Event:2`). The few protobuf fields needed are encoded here.

use super::{Logger, io_error, version_dir};
use crate::FabricError;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

/// Metrics as TensorBoard scalars.
pub struct TensorBoardLogger {
    root: PathBuf,
    name: String,
    version: Option<String>,
    file: Option<(PathBuf, File)>,
}

impl TensorBoardLogger {
    /// A logger writing under `root/name/version_N`.
    pub fn new(root: impl Into<PathBuf>, name: impl Into<String>) -> Self {
        Self {
            root: root.into(),
            name: name.into(),
            version: None,
            file: None,
        }
    }

    /// A fixed version directory name instead of the next `version_N`.
    pub fn with_version(mut self, version: impl Into<String>) -> Self {
        self.version = Some(version.into());
        self
    }

    /// Opens the event file on first use (so only a rank that logs creates a version).
    fn open(&mut self) -> Result<(), FabricError> {
        if self.file.is_none() {
            let dir = version_dir(&self.root, &self.name, self.version.as_deref());
            std::fs::create_dir_all(&dir).map_err(|e| io_error(&dir, e))?;
            let now = wall_time();
            let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
            let path = dir.join(format!(
                "events.out.tfevents.{}.{host}.{}",
                now as u64,
                std::process::id()
            ));
            let mut file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| io_error(&path, e))?;
            let header = event(now, 0, Body::FileVersion("brain.Event:2"));
            file.write_all(&record(&header))
                .map_err(|e| io_error(&path, e))?;
            self.file = Some((path, file));
        }
        Ok(())
    }
}

impl Logger for TensorBoardLogger {
    fn log_metrics(&mut self, metrics: &[(String, f64)], step: u64) -> Result<(), FabricError> {
        let now = wall_time();
        let mut bytes = Vec::new();
        for (tag, value) in metrics {
            bytes.extend(record(&event(now, step, Body::Scalar(tag, *value as f32))));
        }
        self.open()?;
        if let Some((path, file)) = &mut self.file {
            file.write_all(&bytes)
                .and_then(|()| file.flush())
                .map_err(|e| io_error(path, e))?;
        }
        Ok(())
    }

    fn finalize(&mut self) -> Result<(), FabricError> {
        if let Some((path, file)) = self.file.take() {
            file.sync_all().map_err(|e| io_error(&path, e))?;
        }
        Ok(())
    }

    fn log_dir(&self) -> Option<PathBuf> {
        self.file
            .as_ref()
            .and_then(|(path, _)| path.parent().map(PathBuf::from))
    }
}

fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

enum Body<'a> {
    FileVersion(&'a str),
    Scalar(&'a str, f32),
}

fn varint(mut value: u64, out: &mut Vec<u8>) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn length_delimited(field: u8, bytes: &[u8], out: &mut Vec<u8>) {
    out.push((field << 3) | 2);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// `Event { wall_time = 1, step = 2, file_version = 3 | summary = 5 }` with
/// `Summary { value = 1: Value { tag = 1, simple_value = 2 } }`.
fn event(wall_time: f64, step: u64, body: Body<'_>) -> Vec<u8> {
    let mut out = vec![(1 << 3) | 1];
    out.extend_from_slice(&wall_time.to_le_bytes());
    out.push(2 << 3);
    varint(step, &mut out);
    match body {
        Body::FileVersion(version) => length_delimited(3, version.as_bytes(), &mut out),
        Body::Scalar(tag, value) => {
            let mut summary_value = Vec::new();
            length_delimited(1, tag.as_bytes(), &mut summary_value);
            summary_value.push((2 << 3) | 5);
            summary_value.extend_from_slice(&value.to_le_bytes());
            let mut summary = Vec::new();
            length_delimited(1, &summary_value, &mut summary);
            length_delimited(5, &summary, &mut out);
        }
    }
    out
}

fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_of_a_known_string() {
        // RFC 3720 test vector: 32 bytes of zeros -> 0x8A9136AA
        assert_eq!(crc32c::crc32c(&[0u8; 32]), 0x8A91_36AA);
    }

    #[test]
    fn records_frame_and_checksum_each_event() {
        let root = std::env::temp_dir().join(format!("fabric-tb-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let mut logger = TensorBoardLogger::new(&root, "run");
        logger.log_metrics(&[("loss".into(), 0.5)], 7).unwrap();
        logger.finalize().unwrap();
        let dir = logger
            .log_dir()
            .unwrap_or_else(|| root.join("run/version_0"));
        let file = std::fs::read_dir(&dir)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let bytes = std::fs::read(file).unwrap();
        let mut records = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
            let len_crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
            assert_eq!(len_crc, masked_crc(&bytes[at..at + 8]));
            let data = &bytes[at + 12..at + 12 + len];
            let data_crc =
                u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
            assert_eq!(data_crc, masked_crc(data));
            records.push(data.to_vec());
            at += 16 + len;
        }
        assert_eq!(records.len(), 2);
        assert!(records[0].windows(13).any(|w| w == b"brain.Event:2"));
        assert!(records[1].windows(4).any(|w| w == b"loss"));
        assert!(records[1].windows(4).any(|w| w == 0.5f32.to_le_bytes()));
        let _ = std::fs::remove_dir_all(&root);
    }
}
