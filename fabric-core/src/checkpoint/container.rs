//! The checkpoint container:
//!
//! ```text
//! "BFABRIC\x01" | header length: u64 LE | header (JSON) | header CRC-32: u32 LE | entry bytes...
//! ```
//!
//! The header lists each entry's key, kind, length and CRC-32, in file order. Decoding checks
//! every length against the file and every checksum before anything is interpreted, so a
//! truncated or corrupted file is an error naming the first bad entry, never a panic.

use super::error;
use crate::FabricError;
use serde::{Deserialize, Serialize};
use std::path::Path;

const MAGIC: &[u8; 8] = b"BFABRIC\x01";
const FORMAT: u32 = 1;

/// What an entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// A module record (Burn's named MessagePack).
    Module,
    /// An optimizer record.
    Optimizer,
    /// A learning-rate scheduler record.
    Scheduler,
    /// A serde value (JSON).
    Value,
}

/// Float precision a record was written with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Settings {
    /// f32 floats (Burn's `FullPrecisionSettings`).
    #[default]
    Full,
    /// f64 floats (`DoublePrecisionSettings`), for `64-true` models.
    Double,
}

/// One named entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The user's key.
    pub key: String,
    /// What it holds.
    pub kind: EntryKind,
    /// How its floats were written.
    pub settings: Settings,
    /// The encoded payload.
    pub bytes: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct Header {
    format: u32,
    entries: Vec<HeaderEntry>,
}

#[derive(Serialize, Deserialize)]
struct HeaderEntry {
    key: String,
    kind: EntryKind,
    #[serde(default)]
    settings: Settings,
    len: u64,
    crc32: u32,
}

/// Encodes entries into the bytes of one checkpoint file.
pub fn encode(entries: &[Entry]) -> Vec<u8> {
    let header = Header {
        format: FORMAT,
        entries: entries
            .iter()
            .map(|e| HeaderEntry {
                key: e.key.clone(),
                kind: e.kind,
                settings: e.settings,
                len: e.bytes.len() as u64,
                crc32: crc32fast::hash(&e.bytes),
            })
            .collect(),
    };
    // A header of strings and integers always serialises.
    let header = serde_json::to_vec(&header).unwrap_or_default();
    let payload: usize = entries.iter().map(|e| e.bytes.len()).sum();
    let mut out = Vec::with_capacity(8 + 8 + header.len() + 4 + payload);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(&crc32fast::hash(&header).to_le_bytes());
    for entry in entries {
        out.extend_from_slice(&entry.bytes);
    }
    out
}

/// Decodes and verifies the bytes of checkpoint file `path`.
pub fn decode(path: &Path, bytes: &[u8]) -> Result<Vec<Entry>, FabricError> {
    let fail = |key: Option<&str>, reason: String| error(path, key, reason);
    if bytes.len() < 16 || &bytes[..8] != MAGIC {
        return Err(fail(
            None,
            "not a burn-fabric checkpoint (missing or damaged file signature)".into(),
        ));
    }
    let header_len = u64::from_le_bytes(bytes[8..16].try_into().unwrap_or_default());
    let header_end = 16u64
        .checked_add(header_len)
        .filter(|end| end.saturating_add(4) <= bytes.len() as u64)
        .ok_or_else(|| {
            fail(
                None,
                format!(
                    "truncated: the header needs {header_len} bytes but the file has {}",
                    bytes.len()
                ),
            )
        })? as usize;
    let header_bytes = &bytes[16..header_end];
    let stored_crc = u32::from_le_bytes(
        bytes[header_end..header_end + 4]
            .try_into()
            .unwrap_or_default(),
    );
    if crc32fast::hash(header_bytes) != stored_crc {
        return Err(fail(
            None,
            "corrupted: the header checksum does not match".into(),
        ));
    }
    let header: Header = serde_json::from_slice(header_bytes)
        .map_err(|e| fail(None, format!("unreadable header: {e}")))?;
    if header.format != FORMAT {
        return Err(fail(
            None,
            format!("format version {} is not {FORMAT}", header.format),
        ));
    }
    let mut offset = header_end + 4;
    let mut entries = Vec::with_capacity(header.entries.len());
    for entry in header.entries {
        let end = (offset as u64)
            .checked_add(entry.len)
            .filter(|end| *end <= bytes.len() as u64)
            .ok_or_else(|| {
                fail(
                    Some(&entry.key),
                    format!(
                        "truncated: the entry needs {} bytes from offset {offset} but the file has {}",
                        entry.len,
                        bytes.len()
                    ),
                )
            })? as usize;
        let payload = &bytes[offset..end];
        if crc32fast::hash(payload) != entry.crc32 {
            return Err(fail(
                Some(&entry.key),
                "corrupted: the checksum does not match".into(),
            ));
        }
        entries.push(Entry {
            key: entry.key,
            kind: entry.kind,
            settings: entry.settings,
            bytes: payload.to_vec(),
        });
        offset = end;
    }
    if offset != bytes.len() {
        return Err(fail(
            None,
            format!(
                "{} unexpected bytes after the last entry",
                bytes.len() - offset
            ),
        ));
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Entry> {
        vec![
            Entry {
                key: "model".into(),
                kind: EntryKind::Module,
                settings: Settings::Full,
                bytes: (0..200u8).collect(),
            },
            Entry {
                key: "step".into(),
                kind: EntryKind::Value,
                settings: Settings::Full,
                bytes: b"42".to_vec(),
            },
        ]
    }

    #[test]
    fn round_trips() {
        let bytes = encode(&sample());
        assert_eq!(decode(Path::new("x"), &bytes).unwrap(), sample());
    }

    #[test]
    fn every_truncation_and_flip_is_an_error_never_a_panic() {
        let bytes = encode(&sample());
        let path = Path::new("ckpt");
        for len in 0..bytes.len() {
            let err = decode(path, &bytes[..len]).unwrap_err().to_string();
            assert!(err.contains("ckpt"), "{err}");
        }
        for i in 0..bytes.len() {
            for bit in [0x01u8, 0x80] {
                let mut damaged = bytes.clone();
                damaged[i] ^= bit;
                assert!(
                    decode(path, &damaged).is_err(),
                    "flip at byte {i} went unnoticed"
                );
            }
        }
        // a flip inside the model's payload names the entry
        let mut damaged = bytes.clone();
        let at = bytes.len() - 2 - 100;
        damaged[at] ^= 1;
        let err = decode(path, &damaged).unwrap_err().to_string();
        assert!(err.contains("`model`") && err.contains("checksum"), "{err}");
    }
}
