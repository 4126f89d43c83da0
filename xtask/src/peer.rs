//! The peer rows, run when a Python with `torch` and `lightning` is found: the loop of
//! `benches/benches/peer.rs` in Lightning Fabric (`benches/peers/lightning_mlp.py`), and the
//! `language_model` example's training in Lightning Fabric (`benches/peers/lightning_lm.py`).

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

/// Runs a Lightning script once with `args` and returns the number under `key` of the JSON
/// line it prints last.
pub fn lightning(python: &str, script: &Path, args: &[String], key: &str) -> Result<f64, String> {
    let output = Command::new(python)
        .arg(script)
        .args(args)
        .output()
        .map_err(|e| format!("could not run {python}: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .ok_or_else(|| {
            format!(
                "{} {} printed no result ({}): {}",
                script.display(),
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            )
        })?;
    let measured: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("{line}: {e}"))?;
    measured[key]
        .as_f64()
        .ok_or_else(|| format!("{line}: no number `{key}`"))
}

/// The tokens/s that one run of the `language_model` example prints last (`... N tokens/s`).
pub fn tokens_per_second(stdout: &str) -> Option<f64> {
    stdout.lines().rev().find_map(|line| {
        line.strip_suffix(" tokens/s")?
            .split_whitespace()
            .last()?
            .parse()
            .ok()
    })
}

/// What a set of rounds measured: the section of its rows, the unit, the goals.
pub struct Workload {
    /// The rows' section.
    pub section: &'static str,
    /// What both sides count per second (`samples/s`, `tokens/s`).
    pub unit: &'static str,
}

/// The MLP loop of `benches/benches/peer.rs`.
pub const MLP: Workload = Workload {
    section: "Lightning Fabric peer",
    unit: "samples/s",
};

/// The `language_model` example's training.
pub const LANGUAGE_MODEL: Workload = Workload {
    section: "Lightning Fabric peer: language model",
    unit: "tokens/s",
};

/// Throughput of both sides in one round, for one device count and one of our backends.
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
pub fn rows(workload: &Workload, rounds: &[Round], note: &str) -> Vec<Row> {
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
            let unit = workload.unit;
            let (name, goal) = match n {
                1 => (format!("1 device, ours on {on}: burn-fabric ÷ Lightning Fabric {unit}"), 1.0),
                n => (
                    format!("{n}-rank DDP, ours on {on}: burn-fabric ÷ Lightning Fabric (gloo) {unit}"),
                    1.5,
                ),
            };
            let goal = (best(*n).as_deref() == Some(backend.as_str())).then_some(Goal::AtLeast(goal));
            Row::from_rounds(
                workload.section,
                &name,
                &ratios(*n, backend),
                goal,
                format!(
                    "{note}; ours on {on}; {} rounds alternating the two; median {unit} ours {:.0}, theirs {:.0}",
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
        let rows = rows(&MLP, &rounds, "n");
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
        let lm = super::rows(&LANGUAGE_MODEL, &rounds[..2], "n");
        assert!(lm[0].name.ends_with("tokens/s") && lm[0].section.contains("language"));
    }

    #[test]
    fn reads_the_examples_last_tokens_per_second() {
        let stdout = "epoch 1  train loss 2.9  val loss 2.5  perplexity 12.197  20431 tokens/s\n\
                      epoch 2  train loss 2.1  val loss 2.0  perplexity 7.400  21012 tokens/s\n\
                      sample: Elizabeth ...\n";
        assert_eq!(tokens_per_second(stdout), Some(21012.0));
        assert_eq!(tokens_per_second("no numbers"), None);
    }
}
