//! The peer rows: the loop of `benches/benches/peer.rs` in Lightning Fabric
//! (`benches/peers/lightning_mlp.py`), run when a Python with `torch` and `lightning` is found.

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

/// Runs the Lightning script `rounds` times on `devices` and returns the median samples/s.
pub fn lightning(
    python: &str,
    script: &Path,
    devices: usize,
    steps: u32,
    rounds: usize,
) -> Result<f64, String> {
    let mut values = Vec::new();
    for _ in 0..rounds {
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
        let measured: Throughput =
            serde_json::from_str(line).map_err(|e| format!("{line}: {e}"))?;
        values.push(measured.samples_per_second);
    }
    Ok(crate::report::median_of(&values))
}

/// Ours ÷ theirs rows, for 1 device and 2-rank DDP.
pub fn rows(ours: &[Throughput], theirs: &[(usize, f64)], note: &str) -> Vec<Row> {
    theirs
        .iter()
        .filter_map(|&(devices, their)| {
            let our = ours
                .iter()
                .find(|o| o.devices == devices)?
                .samples_per_second;
            let (name, goal) = match devices {
                1 => (
                    "1 device: burn-fabric ÷ Lightning Fabric samples/s".to_string(),
                    1.0,
                ),
                n => (
                    format!("{n}-rank DDP: burn-fabric ÷ Lightning Fabric (gloo) samples/s"),
                    1.5,
                ),
            };
            Some(Row::single(
                "Lightning Fabric peer",
                &name,
                our / their,
                Some(Goal::AtLeast(goal)),
                format!("{note}; ours {our:.0}, theirs {their:.0} samples/s"),
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_pair_the_same_device_counts() {
        let ours = [
            Throughput {
                devices: 1,
                samples_per_second: 9000.0,
            },
            Throughput {
                devices: 2,
                samples_per_second: 12000.0,
            },
        ];
        let rows = rows(&ours, &[(2, 6000.0), (1, 10000.0), (4, 1.0)], "n");
        assert_eq!(rows.len(), 2);
        assert!((rows[0].ratio - 2.0).abs() < 1e-12 && rows[0].goal.unwrap().met(2.0));
        assert!((rows[1].ratio - 0.9).abs() < 1e-12 && !rows[1].goal.unwrap().met(0.9));
    }
}
