//! Learning rate per optimizer step: linear warmup, then cosine, linear or constant decay to
//! the end of training. A pure function of the step, so resuming needs only the counter.

use sepdist_config::{LrDecay, LrScheduleConfig};

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

#[cfg(test)]
mod tests {
    use super::*;

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
