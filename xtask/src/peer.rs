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
    /// Our backend (`flex`, `tch`); the script's lines have none.
    #[serde(default)]
    pub backend: String,
    pub devices: usize,
    pub samples_per_second: f64,
}

/// The backend's name as the table prints it.
fn backend_name(backend: &str) -> &str {
    match backend {
        "flex" => "Flex",
        "tch" => "LibTorch",
        other => other,
    }
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

/// Samples/s of both sides in one round, for one device count and one of our backends.
#[derive(Debug, Clone)]
pub struct Round {
    pub backend: String,
    pub devices: usize,
    pub ours: f64,
    pub theirs: f64,
}

/// Ours ÷ theirs rows (median of the per-round ratios), for 1 device and 2-rank DDP, one per
/// backend of ours. The goals (≥ 1.0 on one device, ≥ 1.5 for DDP) are the best backend's:
/// they go on the row of the backend with the highest median for that device count.
pub fn rows(rounds: &[Round], note: &str) -> Vec<Row> {
    let mut groups: Vec<(usize, String)> = rounds
        .iter()
        .map(|r| (r.devices, r.backend.clone()))
        .collect();
    groups.sort();
    groups.dedup();
    let ratios = |devices: usize, backend: &str| -> Vec<f64> {
        rounds
            .iter()
            .filter(|r| r.devices == devices && r.backend == backend)
            .map(|r| r.ours / r.theirs)
            .collect()
    };
    let best = |devices: usize| {
        groups
            .iter()
            .filter(|(n, _)| *n == devices)
            .max_by(|a, b| median_of(&ratios(a.0, &a.1)).total_cmp(&median_of(&ratios(b.0, &b.1))))
            .map(|(_, backend)| backend.clone())
    };
    groups
        .iter()
        .map(|(n, backend)| {
            let mine: Vec<&Round> = rounds
                .iter()
                .filter(|r| r.devices == *n && r.backend == *backend)
                .collect();
            let ours: Vec<f64> = mine.iter().map(|r| r.ours).collect();
            let theirs: Vec<f64> = mine.iter().map(|r| r.theirs).collect();
            let on = backend_name(backend);
            let (name, goal) = match n {
                1 => (format!("1 device, ours on {on}: burn-fabric ÷ Lightning Fabric samples/s"), 1.0),
                n => (
                    format!("{n}-rank DDP, ours on {on}: burn-fabric ÷ Lightning Fabric (gloo) samples/s"),
                    1.5,
                ),
            };
            let goal = (best(*n).as_deref() == Some(backend.as_str())).then_some(Goal::AtLeast(goal));
            Row::from_rounds(
                "Lightning Fabric peer",
                &name,
                &ratios(*n, backend),
                goal,
                format!(
                    "{note}; ours on {on}; {} rounds alternating the two; median samples/s ours {:.0}, theirs {:.0}",
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
    fn ratios_are_medians_of_rounds_per_device_count_and_backend() {
        let round = |backend: &str, devices, ours, theirs| Round {
            backend: backend.into(),
            devices,
            ours,
            theirs,
        };
        let rounds = [
            round("flex", 1, 9000.0, 10000.0),
            round("flex", 2, 12000.0, 6000.0),
            round("flex", 1, 11000.0, 10000.0),
            round("flex", 2, 9000.0, 6000.0),
            round("flex", 1, 8000.0, 10000.0),
            round("tch", 1, 12000.0, 10000.0),
            round("tch", 2, 6000.0, 6000.0),
        ];
        let rows = rows(&rounds, "n");
        assert_eq!(rows.len(), 4);
        // Sorted by device count, then backend.
        assert!(
            rows[0].name.contains("1 device, ours on Flex"),
            "{}",
            rows[0].name
        );
        assert!((rows[0].ratio - 0.9).abs() < 1e-12, "{:?}", rows[0]);
        assert_eq!(rows[0].range, Some([0.8, 1.1]));
        // The goal is the best backend's: LibTorch on one device, Flex for DDP.
        assert!(rows[0].goal.is_none());
        assert!(rows[1].name.contains("on LibTorch") && rows[1].goal.unwrap().met(1.2));
        assert!((rows[2].ratio - 2.0).abs() < 1e-12 && rows[2].goal.unwrap().met(2.0));
        assert!(rows[2].note.contains("2 rounds"), "{}", rows[2].note);
        assert!(rows[3].goal.is_none());
    }
}
