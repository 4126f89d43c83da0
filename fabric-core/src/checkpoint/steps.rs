//! Checkpoints named by optimizer step in one directory, `DIR/step-00000123.ckpt` (a file, or
//! a directory of shards under a sharded strategy), and finding the newest complete one: what
//! a program restarted by `fabric run --max-restarts` resumes from.

use super::shard_files;
use std::path::{Path, PathBuf};

/// The outcome of [`newest_checkpoint`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Newest {
    /// The newest complete checkpoint, if any.
    pub path: Option<PathBuf>,
    /// One line for each newer, incomplete checkpoint passed over, naming it and why.
    pub skipped: Vec<String>,
}

/// The checkpoint file of optimizer step `step`.
pub fn step_checkpoint(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!("step-{step:08}.ckpt"))
}

/// The newest complete checkpoint among `dir`'s [`step_checkpoint`]s, and the newer ones
/// skipped because they are incomplete: a sharded save (a directory of per-rank shards)
/// interrupted before every rank wrote its shard. A checkpoint file is always complete (it is
/// written atomically), and a missing or empty `dir` has none.
pub fn newest_checkpoint(dir: &Path) -> Newest {
    let Ok(listing) = std::fs::read_dir(dir) else {
        return Newest::default();
    };
    let mut found: Vec<(u64, PathBuf)> = listing
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let step = name
                .strip_prefix("step-")?
                .strip_suffix(".ckpt")?
                .parse::<u64>()
                .ok()?;
            Some((step, entry.path()))
        })
        .collect();
    found.sort();
    let mut skipped = Vec::new();
    while let Some((_, path)) = found.pop() {
        match incomplete(&path) {
            None => {
                return Newest {
                    path: Some(path),
                    skipped,
                };
            }
            // The reason names the checkpoint: "checkpoint PATH: ...".
            Some(reason) => skipped.push(format!("skipping incomplete {reason}")),
        }
    }
    Newest {
        path: None,
        skipped,
    }
}

/// Why the checkpoint at `path` cannot be loaded whole, or `None` if it can.
fn incomplete(path: &Path) -> Option<String> {
    if !path.is_dir() {
        return None;
    }
    shard_files(path).err().map(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_is_the_largest_step() {
        let dir = std::env::temp_dir().join(format!("fabric-newest-ckpt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(newest_checkpoint(&dir), Newest::default());
        for step in [9, 120, 10] {
            std::fs::write(step_checkpoint(&dir, step), b"x").unwrap();
        }
        std::fs::write(dir.join(".step-00000999.ckpt.tmp-1-1"), b"partial").unwrap();
        assert_eq!(
            newest_checkpoint(&dir).path,
            Some(step_checkpoint(&dir, 120))
        );
        // A newer sharded save that rank 1 never finished is skipped, named, never chosen.
        let partial = step_checkpoint(&dir, 130);
        std::fs::create_dir_all(&partial).unwrap();
        std::fs::write(partial.join("shard-00000-of-00002.fabric"), b"x").unwrap();
        let Newest {
            path: chosen,
            skipped,
        } = newest_checkpoint(&dir);
        assert_eq!(chosen, Some(step_checkpoint(&dir, 120)));
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert!(
            skipped[0].contains("step-00000130.ckpt") && skipped[0].contains("[1]"),
            "{skipped:?}"
        );
        // Once every shard is there it is the newest.
        std::fs::write(partial.join("shard-00001-of-00002.fabric"), b"x").unwrap();
        assert_eq!(newest_checkpoint(&dir).path, Some(partial));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
