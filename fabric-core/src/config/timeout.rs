//! The collective timeout as a setting: how long a collective waits for the other ranks before
//! it fails naming them. Given in code (`Duration`), by `fabric run --collective-timeout`, or by
//! the `LT_COLLECTIVE_TIMEOUT` environment variable, as `90`, `90s`, `1.5m`, `2h` or `500ms`.

use crate::FabricError;
use std::fmt::{self, Display};
use std::str::FromStr;
use std::time::Duration;

/// PyTorch's (and Lightning's) default collective timeout: 30 minutes.
pub const DEFAULT_COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// A collective timeout, longer than zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CollectiveTimeout(Duration);

impl CollectiveTimeout {
    /// `timeout`, or an error if it is zero.
    pub fn new(timeout: Duration) -> Result<Self, FabricError> {
        if timeout.is_zero() {
            return Err(invalid(&format!("{timeout:?}")));
        }
        Ok(Self(timeout))
    }

    /// The duration.
    pub fn duration(self) -> Duration {
        self.0
    }
}

impl Default for CollectiveTimeout {
    fn default() -> Self {
        Self(DEFAULT_COLLECTIVE_TIMEOUT)
    }
}

impl Display for CollectiveTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}s", self.0.as_secs_f64())
    }
}

impl FromStr for CollectiveTimeout {
    type Err = FabricError;

    /// `90` (seconds), `90s`, `1.5m`, `2h` or `500ms`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let trimmed = text.trim();
        let (number, unit) = match trimmed.find(|c: char| c.is_ascii_alphabetic()) {
            Some(i) => trimmed.split_at(i),
            None => (trimmed, "s"),
        };
        let seconds_per_unit = match unit {
            "ms" => 1e-3,
            "s" => 1.0,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            _ => return Err(invalid(text)),
        };
        let value: f64 = number.trim().parse().map_err(|_| invalid(text))?;
        let seconds = value * seconds_per_unit;
        if !seconds.is_finite() || seconds <= 0.0 || seconds > 1e9 {
            return Err(invalid(text));
        }
        Self::new(Duration::from_secs_f64(seconds))
    }
}

fn invalid(value: &str) -> FabricError {
    FabricError::InvalidSetting {
        setting: "collective_timeout",
        value: value.to_string(),
        valid: "a duration longer than zero: seconds (`90`) or with a unit (`90s`, `1.5m`, `2h`, `500ms`)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_seconds_and_units() {
        let secs = |text: &str| text.parse::<CollectiveTimeout>().unwrap().duration();
        assert_eq!(secs("90"), Duration::from_secs(90));
        assert_eq!(secs(" 5s "), Duration::from_secs(5));
        assert_eq!(secs("1.5m"), Duration::from_secs(90));
        assert_eq!(secs("2h"), Duration::from_secs(7200));
        assert_eq!(secs("500ms"), Duration::from_millis(500));
        assert_eq!(
            CollectiveTimeout::default().duration(),
            Duration::from_secs(1800)
        );
    }

    #[test]
    fn refuses_zero_negative_and_unknown_units_naming_the_valid_forms() {
        for bad in ["0", "0s", "-3", "5 parsecs", "soon", "", "nan", "inf"] {
            let err = bad.parse::<CollectiveTimeout>().unwrap_err().to_string();
            assert!(
                err.contains("collective_timeout") && err.contains("90s"),
                "{bad}: {err}"
            );
        }
        assert!(CollectiveTimeout::new(Duration::ZERO).is_err());
    }
}
