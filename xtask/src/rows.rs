//! The rows the benchmarks write (`fabric_benches::report::Row`, as JSON), and the Markdown
//! table xtask makes of them.

pub use crate::report::{Goal, Row};
use std::fmt::Write as _;
use std::path::Path;

/// The order of the table's sections; others follow in file-name order.
const SECTIONS: [&str; 12] = [
    "Fabric overhead",
    "DDP",
    "Lightning Fabric peer",
    "Lightning Fabric peer: language model",
    "Precision",
    "ZeRO memory",
    "ZeRO speed",
    "FSDP memory",
    "FSDP speed",
    "Collective",
    "MPI",
    "Fused all-reduce-and-cast",
];

/// Every `*.json` row file in `dir` (the benchmarks' output), sections in [`SECTIONS`] order;
/// files that are not row lists (the peer's raw throughputs) are left to their readers.
pub fn read_dir(dir: &Path) -> Vec<Row> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    let mut rows: Vec<Row> = files
        .iter()
        .filter_map(|p| std::fs::read(p).ok())
        .filter_map(|bytes| serde_json::from_slice::<Vec<Row>>(&bytes).ok())
        .flatten()
        .collect();
    // A stable sort keeps each section's rows in the order their benchmark wrote them.
    rows.sort_by_key(|r| {
        SECTIONS
            .iter()
            .position(|s| *s == r.section)
            .unwrap_or(SECTIONS.len())
    });
    rows
}

/// The rows as one Markdown table, grouped by section in first-seen order.
pub fn markdown(rows: &[Row]) -> String {
    let mut sections: Vec<&str> = Vec::new();
    for row in rows {
        if !sections.contains(&row.section.as_str()) {
            sections.push(&row.section);
        }
    }
    let mut out =
        String::from("| | ratio | median | range | goal | met |\n|---|---|---|---|---|---|\n");
    for section in sections {
        for (i, row) in rows.iter().filter(|r| r.section == section).enumerate() {
            let head = if i == 0 {
                format!("**{section}**")
            } else {
                String::new()
            };
            let range = row
                .range
                .map_or_else(|| "–".into(), |[lo, hi]| format!("{lo:.3} – {hi:.3}"));
            let (goal, met) = match row.goal {
                Some(goal) => (
                    goal.to_string(),
                    if goal.met(row.ratio) { "yes" } else { "**no**" },
                ),
                None => ("–".into(), "–"),
            };
            let _ = writeln!(
                out,
                "| {head} | {} | {:.3} | {range} | {goal} | {met} |",
                row.name, row.ratio
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(section: &str, ratio: f64, goal: Option<Goal>) -> Row {
        Row {
            section: section.into(),
            name: format!("{section} {ratio}"),
            ratio,
            range: Some([ratio - 0.1, ratio + 0.1]),
            goal,
            note: String::new(),
        }
    }

    #[test]
    fn table_groups_sections_and_judges_goals() {
        let rows = [
            row("A", 1.005, Some(Goal::AtMost(1.01))),
            row("B", 0.5, Some(Goal::AtLeast(0.9))),
            row("A", 2.0, None),
        ];
        let table = markdown(&rows);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 5);
        assert!(lines[2].starts_with("| **A** | A 1.005 | 1.005 | 0.905 – 1.105 | ≤ 1.01 | yes |"));
        assert!(lines[3].starts_with("|  | A 2 | 2.000 |"), "{}", lines[3]);
        assert!(lines[4].contains("| ≥ 0.90 | **no** |"), "{}", lines[4]);
    }

    #[test]
    fn rows_round_trip_through_the_benchmarks_json() {
        let json = r#"[{"section":"S","name":"n","ratio":1.5,"range":null,"goal":{"at_least":1.0},"note":"x"}]"#;
        let rows: Vec<Row> = serde_json::from_str(json).unwrap();
        assert!(matches!(rows[0].goal, Some(Goal::AtLeast(v)) if v == 1.0));
        assert!(rows[0].goal.unwrap().met(rows[0].ratio));
    }
}
