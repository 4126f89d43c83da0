//! Where the examples keep checkpoints: `DIR/step-00000123.ckpt`, the newest being the one
//! with the largest step.

use std::path::{Path, PathBuf};

/// The checkpoint file of optimizer step `step`.
pub fn path(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!("step-{step:08}.ckpt"))
}

/// The newest checkpoint in `dir`, if any.
pub fn newest(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
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
        .max_by_key(|(step, _)| *step)
        .map(|(_, path)| path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_is_the_largest_step() {
        let dir = std::env::temp_dir().join(format!("fabric-examples-ckpt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(newest(&dir), None);
        for step in [9, 120, 10] {
            std::fs::write(path(&dir, step), b"x").unwrap();
        }
        std::fs::write(dir.join(".step-00000999.ckpt.tmp-1-1"), b"partial").unwrap();
        assert_eq!(newest(&dir), Some(path(&dir, 120)));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
