//! The rows `cargo xtask bench` collects: each benchmark that measures a ratio side by side also
//! writes it, as JSON, to `$FABRIC_BENCH_OUT/<bench>.json` when xtask sets that variable. xtask
//! turns the rows of all benchmarks into one Markdown table, a JSON file and an SVG chart (it
//! compiles this file too, so both sides share one definition of a row).

use serde::{Deserialize, Serialize};
use std::path::Path;

/// Which way a ratio should go.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Goal {
    /// The ratio should be at most this.
    AtMost(f64),
    /// The ratio should be at least this.
    AtLeast(f64),
}

impl Goal {
    /// Whether `ratio` meets the goal.
    pub fn met(self, ratio: f64) -> bool {
        match self {
            Goal::AtMost(limit) => ratio <= limit,
            Goal::AtLeast(limit) => ratio >= limit,
        }
    }

    /// The limit.
    pub fn value(self) -> f64 {
        match self {
            Goal::AtMost(v) | Goal::AtLeast(v) => v,
        }
    }
}

impl std::fmt::Display for Goal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Goal::AtMost(v) => write!(f, "≤ {v:.2}"),
            Goal::AtLeast(v) => write!(f, "≥ {v:.2}"),
        }
    }
}

/// One measured ratio.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    /// The table section (what is compared).
    pub section: String,
    /// What this row's ratio is, e.g. "Fabric 1 device ÷ plain Burn, time per step".
    pub name: String,
    /// The median of the per-round ratios.
    pub ratio: f64,
    /// The smallest and largest per-round ratio.
    pub range: Option<[f64; 2]>,
    /// The target, if the project has one.
    pub goal: Option<Goal>,
    /// How it was measured (model, sizes, rounds).
    pub note: String,
}

impl Row {
    /// A row whose ratio is the median of `ratios` (one per round), with their range.
    pub fn from_rounds(
        section: &str,
        name: &str,
        ratios: &[f64],
        goal: Option<Goal>,
        note: String,
    ) -> Self {
        let ratio = median_of(ratios);
        let range = (ratios.len() > 1).then(|| range_of(ratios));
        Self {
            section: section.into(),
            name: name.into(),
            ratio,
            range,
            goal,
            note,
        }
    }

    /// A row of one measured ratio.
    pub fn single(section: &str, name: &str, ratio: f64, goal: Option<Goal>, note: String) -> Self {
        Self::from_rounds(section, name, &[ratio], goal, note)
    }
}

/// The median of `values` (the upper one of an even count; NaN when empty).
pub fn median_of(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The smallest and the largest of `values`.
pub fn range_of(values: &[f64]) -> [f64; 2] {
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    [lo, hi]
}

/// Prints `rows` as a Markdown table of ratio, median and range.
pub fn print_table(rows: &[Row]) {
    println!("| ratio | median | range |\n|---|---|---|");
    for row in rows {
        let [lo, hi] = row.range.unwrap_or([row.ratio; 2]);
        println!("| {} | {:.3} | {lo:.3} – {hi:.3} |", row.name, row.ratio);
    }
}

/// Writes `rows` to `$FABRIC_BENCH_OUT/<bench>.json` when xtask asked for them; without the
/// variable (a bench run by hand) does nothing.
pub fn record(bench: &str, rows: &[Row]) {
    record_json(bench, &rows);
}

/// Writes `value` as JSON to `$FABRIC_BENCH_OUT/<name>.json` when the variable is set.
pub fn record_json(name: &str, value: &impl Serialize) {
    if let Some(dir) = std::env::var_os("FABRIC_BENCH_OUT") {
        record_json_in(Path::new(&dir), name, value);
    }
}

/// Writes `value` as JSON to `dir/<name>.json`. A failure to write is reported, not fatal.
pub fn record_json_in(dir: &Path, name: &str, value: &impl Serialize) {
    let path = dir.join(format!("{name}.json"));
    let written = std::fs::create_dir_all(dir)
        .map_err(|e| e.to_string())
        .and_then(|()| serde_json::to_vec_pretty(value).map_err(|e| e.to_string()))
        .and_then(|json| std::fs::write(&path, json).map_err(|e| e.to_string()));
    if let Err(err) = written {
        eprintln!("{name}: could not write {}: {err}", path.display());
    }
}
