//! Learning rate per optimizer step: linear warmup, then cosine, linear or constant decay to
//! the end of training. A pure function of the step, so resuming needs only the counter —
//! times the reduce-on-plateau scale ([`Plateau`]), whose small state is saved in checkpoints.

use sepdist_config::{LrDecay, LrScheduleConfig, PlateauConfig};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq)]
pub struct LrSchedule {
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub decay: LrDecay,
}

impl LrSchedule {
    pub fn new(base_lr: f64, config: &LrScheduleConfig, total_steps: u64) -> Self {
        Self {
            base_lr,
            warmup_steps: config.warmup_steps as u64,
            total_steps,
            decay: config.decay,
        }
    }

    /// Rate of the update made at optimizer step `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.base_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        match self.decay {
            LrDecay::Constant => self.base_lr,
            LrDecay::Linear => self.base_lr * (1.0 - progress),
            LrDecay::Cosine => self.base_lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        }
    }
}

/// Reduce-on-plateau state: PyTorch's `ReduceLROnPlateau` in `max` mode with an absolute
/// threshold and no cooldown, observed once per validation. After more than `patience`
/// validations in a row without beating the best by more than `threshold`, the scale is
/// multiplied by `factor` (never below `min_lr / base_lr`) and the count restarts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Plateau {
    pub best: Option<f64>,
    /// Validations since the last improvement (or reduction).
    pub bad: u64,
    /// Reductions applied so far.
    pub reductions: u32,
}

impl Plateau {
    /// Records a validation metric (higher is better); true when it reduced the rate.
    pub fn observe(&mut self, metric: f64, cfg: &PlateauConfig, base_lr: f64) -> bool {
        if self.best.is_none_or(|best| metric > best + cfg.threshold) {
            self.best = Some(metric);
            self.bad = 0;
            return false;
        }
        self.bad += 1;
        if self.bad <= cfg.patience {
            return false;
        }
        self.bad = 0;
        // At the floor already: nothing to reduce (PyTorch's `eps` check).
        if self.scale(cfg, base_lr) <= cfg.min_lr / base_lr {
            return false;
        }
        self.reductions += 1;
        true
    }

    /// Factor applied to the scheduled rate: `max(factor^reductions, min_lr / base_lr)`.
    pub fn scale(&self, cfg: &PlateauConfig, base_lr: f64) -> f64 {
        let reductions = i32::try_from(self.reductions).unwrap_or(i32::MAX);
        cfg.factor.powi(reductions).max(cfg.min_lr / base_lr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plateau_reduces_after_patience_bad_validations_down_to_the_floor() {
        let cfg = PlateauConfig {
            patience: 2,
            factor: 0.5,
            min_lr: 2e-4,
            threshold: 0.1,
        };
        let base = 1e-3;
        let mut p = Plateau::default();
        // 1.0 is the first best; 1.05 does not beat it by more than 0.1: bad.
        let reduced: Vec<bool> = [1.0, 1.05, 0.9, 0.8, 1.5, 1.5, 1.5, 1.5, 1.5, 1.5, 1.5, 1.5]
            .iter()
            .map(|&m| p.observe(m, &cfg, base))
            .collect();
        assert_eq!(
            reduced,
            [
                false, false, false, true, // third bad validation after the best: reduced
                false, false, false, true, // 1.5 is a new best, then three bad ones
                false, false, true, false, // 0.25 would be under the floor: 0.2
            ]
        );
        assert_eq!(p.reductions, 3);
        assert!((p.scale(&cfg, base) - 0.2).abs() < 1e-12);
        // At the floor, further plateaus change nothing.
        for _ in 0..3 {
            assert!(!p.observe(1.5, &cfg, base));
        }
        assert_eq!(p.reductions, 3);
    }

    fn schedule(decay: LrDecay) -> LrSchedule {
        LrSchedule {
            base_lr: 1e-3,
            warmup_steps: 4,
            total_steps: 14,
            decay,
        }
    }

    #[test]
    fn warmup_is_linear_up_to_the_base_rate() {
        let s = schedule(LrDecay::Cosine);
        let got: Vec<f64> = (0..4).map(|k| s.lr(k)).collect();
        assert_eq!(got, vec![2.5e-4, 5e-4, 7.5e-4, 1e-3]);
    }

    #[test]
    fn decays_reach_their_end_values() {
        let cos = schedule(LrDecay::Cosine);
        assert!((cos.lr(4) - 1e-3).abs() < 1e-15);
        assert!((cos.lr(9) - 5e-4).abs() < 1e-12);
        assert!(cos.lr(14).abs() < 1e-15);
        assert!(cos.lr(100).abs() < 1e-15);
        let lin = schedule(LrDecay::Linear);
        assert!((lin.lr(9) - 5e-4).abs() < 1e-15);
        assert_eq!(schedule(LrDecay::Constant).lr(13), 1e-3);
    }

    #[test]
    fn no_warmup_starts_at_the_base_rate() {
        let mut s = schedule(LrDecay::Cosine);
        s.warmup_steps = 0;
        assert_eq!(s.lr(0), 1e-3);
    }
}
