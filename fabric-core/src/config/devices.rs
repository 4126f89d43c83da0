//! The `devices` setting: how many devices per node, or which ones.

use super::setting::{Setting, setting_from};
use crate::FabricError;
use std::fmt;
use std::str::FromStr;

/// Per-node device selection, as in Lightning: a count, all of them, `auto`, or explicit ids.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Devices {
    /// One device on the CPU, every device on an accelerator with countable devices.
    #[default]
    Auto,
    /// The first `n` devices (`n >= 1`). On the CPU, `n` ranks share it.
    Count(usize),
    /// Every device (`-1` in Lightning). Not valid on the CPU.
    All,
    /// These device ids (`"0,2"` in Lightning). Not valid on the CPU.
    Ids(Vec<usize>),
}

const VALID: &str = "a positive count like `2`, `-1` (all devices), `auto`, or device ids like `0,2` or `1,` (ids only on accelerators with countable devices)";

fn invalid(value: impl Into<String>) -> FabricError {
    FabricError::InvalidSetting {
        setting: "devices",
        value: value.into(),
        valid: VALID.to_string(),
    }
}

impl fmt::Display for Devices {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Devices::Auto => f.write_str("auto"),
            Devices::Count(n) => write!(f, "{n}"),
            Devices::All => f.write_str("-1"),
            Devices::Ids(ids) => {
                let ids: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
                write!(f, "{},", ids.join(","))
            }
        }
    }
}

impl FromStr for Devices {
    type Err = FabricError;

    /// Lightning's string forms: `"auto"`, `"-1"`, `"3"` (a count), `"0,2"`, `"1, 3"` and `"2,"`
    /// (id lists).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim();
        if text.eq_ignore_ascii_case("auto") {
            return Ok(Devices::Auto);
        }
        if text == "-1" {
            return Ok(Devices::All);
        }
        if text.contains(',') {
            let ids = text
                .split(',')
                .map(str::trim)
                .filter(|part| !part.is_empty())
                .map(|part| part.parse::<usize>().map_err(|_| invalid(s)))
                .collect::<Result<Vec<_>, _>>()?;
            if ids.is_empty() {
                return Err(invalid(s));
            }
            return Ok(Devices::Ids(ids));
        }
        match text.parse::<usize>() {
            Ok(0) | Err(_) => Err(invalid(s)),
            Ok(n) => Ok(Devices::Count(n)),
        }
    }
}

setting_from!(Devices);

impl From<usize> for Setting<Devices> {
    fn from(n: usize) -> Self {
        Setting::Text(n.to_string())
    }
}

impl From<i32> for Setting<Devices> {
    fn from(n: i32) -> Self {
        Setting::Text(n.to_string())
    }
}

impl From<i64> for Setting<Devices> {
    fn from(n: i64) -> Self {
        Setting::Text(n.to_string())
    }
}

impl From<Vec<usize>> for Setting<Devices> {
    fn from(ids: Vec<usize>) -> Self {
        Setting::Value(Devices::Ids(ids))
    }
}

impl From<&[usize]> for Setting<Devices> {
    fn from(ids: &[usize]) -> Self {
        Setting::Value(Devices::Ids(ids.to_vec()))
    }
}
