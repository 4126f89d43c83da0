//! The order in which forward passes run their FSDP units, remembered from one pass to the
//! next so that a unit's gathers start while the unit before it computes (PyTorch FSDP's
//! forward prefetch, which also learns the order from the first iteration).
//!
//! A unit is known by its first sharded parameter. Every rank runs the same units in the same
//! order, so every rank predicts the same next unit and starts the same gathers in the same
//! order; a wrong prediction (a pass that changed its path) costs a gather that nobody uses.

use burn::module::ParamId;
use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

/// Which unit followed which, in the latest passes that ran them.
#[derive(Default)]
pub struct UnitOrder {
    /// Key of a unit (`None`: the start of a pass) → the sharded parameters of the unit that
    /// came next.
    next: Mutex<HashMap<Option<ParamId>, Vec<ParamId>>>,
}

impl UnitOrder {
    /// A pass entered the unit of sharded parameters `unit` after the unit `previous` (`None`:
    /// first in the pass). Remembers it and returns the parameters of the unit that came after
    /// `unit` last time, which are worth gathering now.
    pub fn entered(&self, previous: Option<ParamId>, unit: &[ParamId]) -> Vec<ParamId> {
        let mut next = self.next.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(&key) = unit.first() else {
            return Vec::new();
        };
        if next.get(&previous).is_none_or(|known| known != unit) {
            next.insert(previous, unit.to_vec());
        }
        next.get(&Some(key)).cloned().unwrap_or_default()
    }

    /// The parameters of the unit that came first in the latest pass.
    pub fn first(&self) -> Vec<ParamId> {
        let next = self.next.lock().unwrap_or_else(PoisonError::into_inner);
        next.get(&None).cloned().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_unit_is_the_one_that_followed_last_time() {
        let order = UnitOrder::default();
        let ids: Vec<ParamId> = (0..6).map(|_| ParamId::new()).collect();
        let (a, b, c) = (&ids[0..2], &ids[2..4], &ids[4..6]);
        // First pass: nothing known yet.
        assert!(order.first().is_empty());
        assert!(order.entered(None, a).is_empty());
        assert!(order.entered(Some(a[0]), b).is_empty());
        assert!(order.entered(Some(b[0]), c).is_empty());
        // Second pass: each unit names the next.
        assert_eq!(order.first(), a);
        assert_eq!(order.entered(None, a), b);
        assert_eq!(order.entered(Some(a[0]), b), c);
        // The same pass runs `a` again after `c` (a model called twice), then `c` right after
        // `a`: the prediction follows what ran latest.
        assert_eq!(order.entered(Some(c[0]), a), b);
        assert_eq!(order.entered(Some(a[0]), c), a);
        assert_eq!(order.entered(None, a), c);
    }
}
