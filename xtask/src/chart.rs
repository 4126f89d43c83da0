//! The SVG chart of `target/bench/ratios.svg`: one horizontal bar per row, a line at 1.0 and a
//! mark at each goal (green bar: goal met, red: missed, grey: no goal).

use crate::rows::Row;
use std::fmt::Write as _;

const PLOT_WIDTH: f64 = 400.0;
/// A generous width of one character of the 12 px sans-serif labels (wide letters included),
/// so that the longest label fits whole left of the bars.
const CHAR_WIDTH: f64 = 7.5;
const ROW_HEIGHT: f64 = 22.0;
const TOP: f64 = 30.0;

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The label of `row`.
fn label(row: &Row) -> String {
    format!("{}: {}", row.section, row.name)
}

/// The width left of the bars: the longest label, whole, and a margin on each side.
fn label_width(rows: &[Row]) -> f64 {
    let longest = rows.iter().map(|r| label(r).chars().count()).max();
    longest.map_or(0.0, |n| n as f64 * CHAR_WIDTH) + 24.0
}

/// The chart as an SVG document.
pub fn svg(title: &str, rows: &[Row]) -> String {
    let finite = |v: f64| if v.is_finite() { v } else { 0.0 };
    let left = label_width(rows);
    // The axis reaches past every ratio and goal, and at least to 2.
    let max = rows
        .iter()
        .flat_map(|r| [finite(r.ratio), r.goal.map_or(0.0, |g| g.value())])
        .fold(2.0f64, f64::max)
        * 1.05;
    let x = |value: f64| left + PLOT_WIDTH * (finite(value).max(0.0) / max);
    let width = left + PLOT_WIDTH + 60.0;
    let height = TOP + ROW_HEIGHT * rows.len() as f64 + 30.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="8" y="18" font-weight="bold">{}</text>"#,
        escape(title)
    );
    for (i, row) in rows.iter().enumerate() {
        let y = TOP + ROW_HEIGHT * i as f64;
        let colour = match row.goal {
            Some(goal) if goal.met(row.ratio) => "#3a9d5d",
            Some(_) => "#c94040",
            None => "#8c8c8c",
        };
        let label = label(row);
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            left - 8.0,
            y + 15.0,
            escape(&label)
        );
        let _ = writeln!(
            out,
            r#"<rect x="{left}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{colour}"/>"#,
            y + 4.0,
            x(row.ratio) - left,
            ROW_HEIGHT - 8.0
        );
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}">{:.3}</text>"#,
            x(row.ratio) + 4.0,
            y + 15.0,
            row.ratio
        );
        if let Some(goal) = row.goal {
            let gx = x(goal.value());
            let _ = writeln!(
                out,
                r#"<line x1="{gx:.1}" y1="{:.1}" x2="{gx:.1}" y2="{:.1}" stroke="black" stroke-width="2"/>"#,
                y + 1.0,
                y + ROW_HEIGHT - 1.0
            );
        }
    }
    let one = x(1.0);
    let bottom = TOP + ROW_HEIGHT * rows.len() as f64;
    let _ = writeln!(
        out,
        r##"<line x1="{one:.1}" y1="{TOP}" x2="{one:.1}" y2="{bottom:.1}" stroke="#444" stroke-dasharray="4 3"/>"##
    );
    let _ = writeln!(
        out,
        r#"<text x="{one:.1}" y="{:.1}" text-anchor="middle">1.0 (black marks: goals)</text>"#,
        bottom + 18.0
    );
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rows::Goal;

    #[test]
    fn one_bar_per_row_coloured_by_goal_and_text_escaped() {
        let row = |name: &str, ratio, goal| Row {
            section: "S".into(),
            name: name.into(),
            ratio,
            range: None,
            goal,
            note: String::new(),
        };
        let rows = [
            row("a ÷ b <fast>", 0.9, Some(Goal::AtMost(1.01))),
            row("c", 0.5, Some(Goal::AtLeast(0.9))),
            row("d", f64::NAN, None),
        ];
        let svg = svg("t & u", &rows);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert_eq!(svg.matches("<rect x=").count(), 3);
        assert!(svg.contains("#3a9d5d") && svg.contains("#c94040") && svg.contains("#8c8c8c"));
        assert!(svg.contains("a ÷ b &lt;fast&gt;") && svg.contains("t &amp; u"));
        assert_eq!(svg.matches("stroke-width=\"2\"").count(), 2);
    }

    #[test]
    fn the_longest_label_fits_left_of_the_bars() {
        let long = "x".repeat(150);
        let rows = [Row {
            section: "FSDP memory".into(),
            name: long.clone(),
            ratio: 1.0,
            range: None,
            goal: None,
            note: String::new(),
        }];
        let chars = "FSDP memory: ".len() + long.len();
        // Right-aligned 8 px left of the bars, it starts right of the left edge.
        assert!(label_width(&rows) - 8.0 - chars as f64 * CHAR_WIDTH > 0.0);
        assert!(svg("t", &rows).contains(&format!(
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}""#,
            label_width(&rows) + PLOT_WIDTH + 60.0
        )));
    }
}
