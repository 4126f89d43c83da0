//! The peer rows: the loop of `benches/benches/peer.rs` in Lightning Fabric
//! (`benches/peers/lightning_mlp.py`), run when a Python with `torch` and `lightning` is found.

use crate::report::median_of;
use crate::rows::{Goal, Row};
use serde::Deserialize;
use std::path::Path;
use std::process::Command;

/// Python to use: `FABRIC_PEER_PYTHON`, else `python3`.
pub fn python() -> String {
    std::env::var("FABRIC_PEER_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// How to get the peer rows when the packages are missing.
pub const INSTALL_HINT: &str = "peer rows skipped: no Python with torch and lightning. Install them with \
     `python3 -m pip install torch==2.9.0 lightning` (or point FABRIC_PEER_PYTHON at a Python that has them)";

/// Whether `python` imports torch and lightning.
pub fn available(python: &str) -> bool {
    Command::new(python)
        .args(["-c", "import torch, lightning"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// One throughput measurement (ours from the bench's JSON, theirs from the script's line).
#[derive(Debug, Clone, Deserialize)]
pub struct Throughput {
    pub devices: usize,
    pub samples_per_second: f64,
}

/// Runs the Lightning script once on `devices` and returns its samples/s.
pub fn lightning(python: &str, script: &Path, devices: usize, steps: u32) -> Result<f64, String> {
    let output = Command::new(python)
        .arg(script)
        .args([
            "--devices",
            &devices.to_string(),
            "--steps",
            &steps.to_string(),
        ])
        .output()
        .map_err(|e| format!("could not run {python}: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .ok_or_else(|| {
            format!(
                "{} --devices {devices} printed no result ({}): {}",
                script.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            )
        })?;
    let measured: Throughput = serde_json::from_str(line).map_err(|e| format!("{line}: {e}"))?;
    Ok(measured.samples_per_second)
}

/// Samples/s of both sides in one round, for one device count.
#[derive(Debug, Clone, Copy)]
pub struct Round {
    pub devices: usize,
    pub ours: f64,
    pub theirs: f64,
}

/// Ours ÷ theirs rows (median of the per-round ratios), for 1 device and 2-rank DDP.
pub fn rows(rounds: &[Round], note: &str) -> Vec<Row> {
    let mut devices: Vec<usize> = rounds.iter().map(|r| r.devices).collect();
    devices.sort_unstable();
    devices.dedup();
    devices
        .into_iter()
        .map(|n| {
            let mine: Vec<&Round> = rounds.iter().filter(|r| r.devices == n).collect();
            let ratios: Vec<f64> = mine.iter().map(|r| r.ours / r.theirs).collect();
            let ours: Vec<f64> = mine.iter().map(|r| r.ours).collect();
            let theirs: Vec<f64> = mine.iter().map(|r| r.theirs).collect();
            let (name, goal) = match n {
                1 => ("1 device: burn-fabric ÷ Lightning Fabric samples/s".to_string(), 1.0),
                n => (format!("{n}-rank DDP: burn-fabric ÷ Lightning Fabric (gloo) samples/s"), 1.5),
            };
            Row::from_rounds(
                "Lightning Fabric peer",
                &name,
                &ratios,
                Some(Goal::AtLeast(goal)),
                format!(
                    "{note}; {} rounds alternating the two; median samples/s ours {:.0}, theirs {:.0}",
                    mine.len(),
                    median_of(&ours),
                    median_of(&theirs)
                ),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_are_medians_of_rounds_per_device_count() {
        let round = |devices, ours, theirs| Round {
            devices,
            ours,
            theirs,
        };
        let rounds = [
            round(1, 9000.0, 10000.0),
            round(2, 12000.0, 6000.0),
            round(1, 11000.0, 10000.0),
            round(2, 9000.0, 6000.0),
            round(1, 8000.0, 10000.0),
        ];
        let rows = rows(&rounds, "n");
        assert_eq!(rows.len(), 2);
        assert!((rows[0].ratio - 0.9).abs() < 1e-12, "{:?}", rows[0]);
        assert_eq!(rows[0].range, Some([0.8, 1.1]));
        assert!(!rows[0].goal.unwrap().met(rows[0].ratio));
        assert!((rows[1].ratio - 2.0).abs() < 1e-12 && rows[1].goal.unwrap().met(2.0));
        assert!(rows[1].note.contains("2 rounds"), "{}", rows[1].note);
    }
}
