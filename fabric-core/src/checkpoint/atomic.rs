//! Writing a file so that a crash (even SIGKILL) at any moment leaves either the old file or
//! the new one under the final name, never a partial one: write a temporary file in the same
//! directory, fsync it, rename it over the final name, fsync the directory. The writer holds an
//! exclusive `flock` on its temporary until it is renamed, so a later save can tell a killed
//! save's leftover (no lock: the kernel dropped it with the process) from one in progress.

use super::error;
use crate::FabricError;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The directory of `path` and the prefix of its temporary files (hidden, in that directory).
fn temporary_prefix(path: &Path) -> Option<(PathBuf, String)> {
    let name = path.file_name()?.to_string_lossy().into_owned();
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Some((dir, format!(".{name}.tmp-")))
}

/// This machine's name, as temporary files record it.
fn host() -> String {
    let mut name = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it or
    // truncates, and the name is read only up to the first NUL.
    let ok = unsafe { libc::gethostname(name.as_mut_ptr().cast(), name.len()) } == 0;
    let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
    match ok {
        true => String::from_utf8_lossy(&name[..end]).replace('/', "_"),
        false => "unknown".into(),
    }
}

/// Whether process `pid` of this machine is alive.
fn alive(pid: libc::pid_t) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let exists = unsafe { libc::kill(pid, 0) } == 0;
    exists || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Whether `file` is locked by a writer (a save in progress, on any host or container that
/// shares the file system's locks).
fn locked(file: &Path) -> bool {
    let Ok(open) = File::open(file) else {
        return true;
    };
    // SAFETY: a valid descriptor; a lock taken here is released when `open` is closed.
    unsafe { libc::flock(open.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) != 0 }
}

/// Whether the file `name` in `dir` is a temporary a killed save left behind:
/// `.NAME.tmp-HOST-PID-N` that no writer holds locked, and not of a live process of this host
/// (which may not have taken its lock yet).
fn stale(dir: &Path, name: &str, this_host: &str) -> bool {
    let Some((_, owner)) = name.split_once(".tmp-") else {
        return false;
    };
    if !name.starts_with('.') {
        return false;
    }
    let mut fields = owner.rsplitn(3, '-');
    let (Some(_counter), Some(pid), Some(host)) = (fields.next(), fields.next(), fields.next())
    else {
        return false;
    };
    let Ok(pid) = pid.parse::<libc::pid_t>() else {
        return false;
    };
    (host != this_host || !alive(pid)) && !locked(&dir.join(name))
}

/// Removes the stale temporaries (see [`stale`]) in `dir` itself; returns how many, and the
/// subdirectories of `dir`.
fn sweep(dir: &Path, this_host: &str) -> (usize, Vec<PathBuf>) {
    let Ok(listing) = fs::read_dir(dir) else {
        return (0, Vec::new());
    };
    let (mut removed, mut subdirs) = (0, Vec::new());
    for entry in listing.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            subdirs.push(entry.path());
        } else if stale(dir, &name, this_host) && fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    (removed, subdirs)
}

/// Removes the temporary files that saves killed mid-write left in the checkpoint directory
/// `dir` and in its immediate subdirectories (the shard directories of sharded checkpoints).
/// Safe while other processes save there: a temporary still locked by its writer, or of a live
/// process of this host, is never removed. An empty `dir` is the current directory. Returns how
/// many.
pub fn remove_stale_temporaries(dir: &Path) -> usize {
    let dir = match dir.as_os_str().is_empty() {
        true => Path::new("."),
        false => dir,
    };
    let this_host = host();
    let (removed, subdirs) = sweep(dir, &this_host);
    removed
        + subdirs
            .iter()
            .map(|subdir| sweep(subdir, &this_host).0)
            .sum::<usize>()
}

/// Writes `bytes` to `path` atomically (see the module docs), creating parent directories and
/// removing the stale temporaries of earlier killed saves in that directory (not below it: a
/// write may go anywhere, and only checkpoint directories have shard directories to sweep)
/// first.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), FabricError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let fail = |what: &str, e: std::io::Error| error(path, None, format!("{what}: {e}"));
    let (dir, prefix) =
        temporary_prefix(path).ok_or_else(|| error(path, None, "the path names no file"))?;
    fs::create_dir_all(&dir).map_err(|e| fail("cannot create its directory", e))?;
    sweep(&dir, &host());
    let temporary = dir.join(format!(
        "{prefix}{}-{}-{}",
        host(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temporary)?;
        // SAFETY: a valid descriptor; the lock lasts until `file` is closed, after the rename.
        unsafe {
            libc::flock(file.as_raw_fd(), libc::LOCK_EX);
        }
        file.write_all(bytes)?;
        file.sync_all()?;
        Ok(file)
    })();
    let file = match written {
        Ok(file) => file,
        Err(e) => {
            let _ = fs::remove_file(&temporary);
            return Err(fail("cannot write the temporary file", e));
        }
    };
    if let Err(e) = fs::rename(&temporary, path) {
        let _ = fs::remove_file(&temporary);
        return Err(fail("cannot move the temporary file into place", e));
    }
    drop(file);
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
        // Killed saves leave temporaries behind, here and in a shard directory below (on this
        // host and on another whose name has dashes); a live process's save in progress, a save
        // in progress on another machine (it holds its lock), and other files are left alone.
        let host = host();
        let dead = dead_pid();
        let mine = std::process::id();
        let shards = dir.join("sub").join("step-2.ckpt");
        fs::create_dir_all(&shards).unwrap();
        let stale = [
            dir.join("sub")
                .join(format!(".model.ckpt.tmp-{host}-{dead}-1")),
            dir.join("sub")
                .join(format!(".other.ckpt.tmp-{host}-{dead}-7")),
            shards.join(format!(".shard-00001-of-00002.fabric.tmp-{host}-{dead}-0")),
            dir.join("sub")
                .join(format!(".model.ckpt.tmp-node-7-{mine}-2")),
        ];
        let kept = [
            dir.join("sub")
                .join(format!(".model.ckpt.tmp-{host}-{mine}-9")),
            dir.join("sub")
                .join(format!(".model.ckpt.tmp-node-8-{dead}-1")),
            dir.join("sub").join("notes.tmp-1-1"),
            shards.join("shard-00000-of-00002.fabric"),
        ];
        for file in stale.iter().chain(&kept) {
            fs::write(file, b"partial").unwrap();
        }
        // node-8's writer is at work: it holds its temporary locked.
        let writing = File::open(&kept[1]).unwrap();
        // SAFETY: a valid descriptor, unlocked when `writing` is closed.
        assert_eq!(
            unsafe { libc::flock(writing.as_raw_fd(), libc::LOCK_EX) },
            0
        );
        write_atomic(&path, b"second").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        // The write swept its own directory; the checkpoint sweep also the shard directories.
        assert!(stale[2].exists(), "a write sweeps only its own directory");
        remove_stale_temporaries(&dir.join("sub"));
        for file in &stale {
            assert!(!file.exists(), "{} was left behind", file.display());
        }
        for file in &kept {
            assert!(file.exists(), "{} was removed", file.display());
        }
        drop(writing);
        let _ = fs::remove_dir_all(&dir);
    }

    /// The PID of a process that has exited.
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }
}
