//! Writing a file so that a crash (even SIGKILL) at any moment leaves either the old file or
//! the new one under the final name, never a partial one: write a temporary file in the same
//! directory, fsync it, rename it over the final name, fsync the directory.

use super::error;
use crate::FabricError;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The prefix of temporary files for `path` (hidden, in the same directory).
fn temporary_prefix(path: &Path) -> Option<(PathBuf, String)> {
    let name = path.file_name()?.to_string_lossy().into_owned();
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Some((dir, format!(".{name}.tmp-")))
}

/// Removes temporary files that a killed save of `path` left behind. Returns how many.
pub fn remove_stale_temporaries(path: &Path) -> usize {
    let Some((dir, prefix)) = temporary_prefix(path) else {
        return 0;
    };
    let Ok(listing) = fs::read_dir(&dir) else {
        return 0;
    };
    listing
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .filter(|e| fs::remove_file(e.path()).is_ok())
        .count()
}

/// Writes `bytes` to `path` atomically (see the module docs), creating parent directories and
/// removing stale temporaries of earlier killed saves first.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), FabricError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let fail = |what: &str, e: std::io::Error| error(path, None, format!("{what}: {e}"));
    let (dir, prefix) =
        temporary_prefix(path).ok_or_else(|| error(path, None, "the path names no file"))?;
    fs::create_dir_all(&dir).map_err(|e| fail("cannot create its directory", e))?;
    remove_stale_temporaries(path);
    let temporary = dir.join(format!(
        "{prefix}{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&temporary);
        return Err(fail("cannot write the temporary file", e));
    }
    if let Err(e) = fs::rename(&temporary, path) {
        let _ = fs::remove_file(&temporary);
        return Err(fail("cannot move the temporary file into place", e));
    }
    // Make the rename itself durable.
    if let Ok(directory) = File::open(&dir) {
        let _ = directory.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_and_cleans_stale_temporaries() {
        let dir = std::env::temp_dir().join(format!("fabric-atomic-{}", std::process::id()));
        let path = dir.join("sub").join("model.ckpt");
        write_atomic(&path, b"first").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"first");
        // a killed save leaves a temporary behind
        fs::write(dir.join("sub").join(".model.ckpt.tmp-1-1"), b"partial").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        let leftovers: Vec<_> = fs::read_dir(dir.join("sub"))
            .unwrap()
            .filter_map(Result::ok)
            .collect();
        assert_eq!(leftovers.len(), 1, "{leftovers:?}");
        let _ = fs::remove_dir_all(&dir);
    }
}
