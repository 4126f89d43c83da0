//! Lightning's `Throughput`: feed cumulative time, batches and samples; get batches/s and
//! samples/s over a sliding window, per device and (for several ranks) for the whole job.

use crate::FabricError;
use std::collections::{BTreeMap, VecDeque};

/// A throughput meter over the last `window` updates.
#[derive(Debug, Clone)]
pub struct Throughput {
    window: usize,
    world_size: usize,
    history: VecDeque<(f64, u64, u64)>,
}

impl Throughput {
    /// Rates over `window` updates (at least 2) for a job of `world_size` ranks.
    pub fn new(window: usize, world_size: usize) -> Self {
        Self {
            window: window.max(2),
            world_size: world_size.max(1),
            history: VecDeque::new(),
        }
    }

    /// Records cumulative `time` (seconds), `batches` and `samples` on this rank. Each must
    /// increase strictly, and `samples >= batches`.
    pub fn update(&mut self, time: f64, batches: u64, samples: u64) -> Result<(), FabricError> {
        if samples < batches {
            return Err(FabricError::InvalidArgument {
                name: "samples",
                value: samples.to_string(),
                reason: format!("must be at least batches ({batches})"),
            });
        }
        if let Some(&(t, b, s)) = self.history.back() {
            for (name, new, old) in [
                ("time", time, t),
                ("batches", batches as f64, b as f64),
                ("samples", samples as f64, s as f64),
            ] {
                if new <= old {
                    return Err(FabricError::InvalidArgument {
                        name,
                        value: new.to_string(),
                        reason: format!("expected the value to increase beyond {old}"),
                    });
                }
            }
        }
        self.history.push_back((time, batches, samples));
        if self.history.len() > self.window {
            self.history.pop_front();
        }
        Ok(())
    }

    /// `time`, `batches`, `samples`, and once the window is full `device/batches_per_sec`,
    /// `device/samples_per_sec` and, with several ranks, the job's `batches_per_sec` and
    /// `samples_per_sec` (device rates × world size).
    pub fn compute(&self) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        let (Some(first), Some(last)) = (self.history.front(), self.history.back()) else {
            return out;
        };
        out.insert("time".into(), last.0);
        out.insert("batches".into(), last.1 as f64);
        out.insert("samples".into(), last.2 as f64);
        if self.history.len() < self.window {
            return out;
        }
        let elapsed = last.0 - first.0;
        let batches = (last.1 - first.1) as f64 / elapsed;
        let samples = (last.2 - first.2) as f64 / elapsed;
        out.insert("device/batches_per_sec".into(), batches);
        out.insert("device/samples_per_sec".into(), samples);
        if self.world_size > 1 {
            out.insert("batches_per_sec".into(), batches * self.world_size as f64);
            out.insert("samples_per_sec".into(), samples * self.world_size as f64);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_over_the_window() {
        let mut meter = Throughput::new(3, 2);
        meter.update(1.0, 1, 32).unwrap();
        meter.update(2.0, 2, 64).unwrap();
        assert!(!meter.compute().contains_key("device/samples_per_sec"));
        meter.update(3.0, 3, 96).unwrap();
        let rates = meter.compute();
        assert_eq!(rates["device/samples_per_sec"], 32.0);
        assert_eq!(rates["samples_per_sec"], 64.0);
        assert_eq!(rates["device/batches_per_sec"], 1.0);
        meter.update(5.0, 4, 128).unwrap();
        assert_eq!(meter.compute()["device/batches_per_sec"], 2.0 / 3.0);
        let err = meter.update(5.0, 5, 160).unwrap_err().to_string();
        assert!(err.contains("time") && err.contains("increase"), "{err}");
        assert!(meter.update(6.0, 9, 8).is_err());
    }
}
