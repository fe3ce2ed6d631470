//! AdamW over flat fp32 buffers. The update is a pure function of (parameter, gradient,
//! state) element by element, so a rank can update any contiguous shard of the flat
//! parameter vector (ZeRO) with the state of that shard alone. candle's `AdamW` keeps
//! private per-variable state that can be neither sharded nor saved.

use rayon::prelude::*;
use sepdist_config::OptimizerConfig;

/// Elements per parallel task: large enough to amortise scheduling, small enough to split
/// a 10 M-parameter model over all cores.
const CHUNK: usize = 1 << 16;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWHyper {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl From<&OptimizerConfig> for AdamWHyper {
    fn from(c: &OptimizerConfig) -> Self {
        Self {
            beta1: c.betas[0],
            beta2: c.betas[1],
            eps: c.eps,
            weight_decay: c.weight_decay,
        }
    }
}

/// First and second moments of one contiguous shard, and the number of updates applied.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamW {
    pub hyper: AdamWHyper,
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
    /// Updates applied so far (PyTorch's `step`); bias correction uses `step + 1`.
    pub step: u64,
}

impl AdamW {
    pub fn new(hyper: AdamWHyper, len: usize) -> Self {
        Self {
            hyper,
            exp_avg: vec![0.0; len],
            exp_avg_sq: vec![0.0; len],
            step: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.exp_avg.len()
    }

    pub fn is_empty(&self) -> bool {
        self.exp_avg.is_empty()
    }

    /// One update of `params` with `grads` (already averaged and clipped) at rate `lr`,
    /// with PyTorch's `torch.optim.AdamW` arithmetic (decoupled decay, bias-corrected
    /// moments, eps added to the corrected root).
    ///
    /// # Panics
    /// If the three buffers differ in length: a programming error, not a user input.
    pub fn update(&mut self, params: &mut [f32], grads: &[f32], lr: f64) {
        assert_eq!(params.len(), self.len(), "parameter shard length");
        assert_eq!(grads.len(), self.len(), "gradient shard length");
        self.step += 1;
        let h = self.hyper;
        let t = self.step as i32;
        let bias1 = 1.0 - h.beta1.powi(t);
        let bias2_sqrt = (1.0 - h.beta2.powi(t)).sqrt();
        let step_size = (lr / bias1) as f32;
        let decay = (1.0 - lr * h.weight_decay) as f32;
        let (b1, b2, eps) = (h.beta1 as f32, h.beta2 as f32, h.eps as f32);
        let inv_bias2_sqrt = (1.0 / bias2_sqrt) as f32;
        params
            .par_chunks_mut(CHUNK)
            .zip(grads.par_chunks(CHUNK))
            .zip(self.exp_avg.par_chunks_mut(CHUNK))
            .zip(self.exp_avg_sq.par_chunks_mut(CHUNK))
            .for_each(|(((p, g), m), v)| {
                for i in 0..p.len() {
                    let gi = g[i];
                    p[i] *= decay;
                    m[i] = b1 * m[i] + (1.0 - b1) * gi;
                    v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
                    let denom = v[i].sqrt() * inv_bias2_sqrt + eps;
                    p[i] -= step_size * m[i] / denom;
                }
            });
    }
}

/// Σ g² in f64, the partial that ranks all-reduce before taking the global norm.
pub fn sum_of_squares(grads: &[f32]) -> f64 {
    grads
        .par_chunks(CHUNK)
        .map(|c| c.iter().map(|&g| f64::from(g) * f64::from(g)).sum::<f64>())
        .sum()
}

/// The factor that clips a gradient of global norm `norm` to `max_norm`, as PyTorch's
/// `clip_grad_norm_` (`max_norm / (norm + 1e-6)`, never above 1).
pub fn clip_scale(norm: f64, max_norm: Option<f64>) -> f64 {
    match max_norm {
        Some(max) if norm.is_finite() => (max / (norm + 1e-6)).min(1.0),
        _ => 1.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Element-by-element reference in f64, written from the AdamW paper's algorithm with
    /// PyTorch's placement of eps.
    fn reference(p: &mut [f64], g_steps: &[Vec<f64>], lr: f64, h: AdamWHyper) {
        let mut m = vec![0.0; p.len()];
        let mut v = vec![0.0; p.len()];
        for (t, g) in g_steps.iter().enumerate() {
            let t = (t + 1) as i32;
            for i in 0..p.len() {
                p[i] -= lr * h.weight_decay * p[i];
                m[i] = h.beta1 * m[i] + (1.0 - h.beta1) * g[i];
                v[i] = h.beta2 * v[i] + (1.0 - h.beta2) * g[i] * g[i];
                let m_hat = m[i] / (1.0 - h.beta1.powi(t));
                let v_hat = v[i] / (1.0 - h.beta2.powi(t));
                p[i] -= lr * m_hat / (v_hat.sqrt() + h.eps);
            }
        }
    }

    #[test]
    fn adamw_matches_the_hand_computed_reference_over_several_steps() {
        let h = AdamWHyper {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        };
        let init = [0.5f64, -1.0, 2.0, 0.0, 1e-3];
        let grads: Vec<Vec<f64>> = (0..6)
            .map(|s| {
                init.iter()
                    .enumerate()
                    .map(|(i, _)| ((s * 7 + i * 3) as f64).sin() * 0.3)
                    .collect()
            })
            .collect();
        let lr = 1e-2;
        let mut expected = init.to_vec();
        reference(&mut expected, &grads, lr, h);

        let mut params: Vec<f32> = init.iter().map(|&x| x as f32).collect();
        let mut opt = AdamW::new(h, params.len());
        for g in &grads {
            let g32: Vec<f32> = g.iter().map(|&x| x as f32).collect();
            opt.update(&mut params, &g32, lr);
        }
        assert_eq!(opt.step, 6);
        for (got, want) in params.iter().zip(&expected) {
            assert!((f64::from(*got) - want).abs() < 1e-6, "{got} vs {want}");
        }
    }

    #[test]
    fn first_step_moves_each_parameter_by_about_lr() {
        // With zero decay, step 1 is lr · g / (|g| + eps): a sign step.
        let h = AdamWHyper {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let mut p = vec![1.0f32, 1.0, 1.0];
        let mut opt = AdamW::new(h, 3);
        opt.update(&mut p, &[0.5, -2.0, 0.0], 0.1);
        assert!((p[0] - 0.9).abs() < 1e-6);
        assert!((p[1] - 1.1).abs() < 1e-6);
        assert_eq!(p[2], 1.0);
    }

    #[test]
    fn sharded_updates_equal_the_whole_update() {
        let h = AdamWHyper {
            beta1: 0.8,
            beta2: 0.99,
            eps: 1e-6,
            weight_decay: 0.1,
        };
        let n = 3 * CHUNK + 17;
        let grads: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).cos()).collect();
        let mut whole: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.11).sin()).collect();
        let mut sharded = whole.clone();
        let mut opt = AdamW::new(h, n);
        opt.update(&mut whole, &grads, 3e-3);
        let cut = n / 3 + 5;
        let mut a = AdamW::new(h, cut);
        let mut b = AdamW::new(h, n - cut);
        let (p0, p1) = sharded.split_at_mut(cut);
        a.update(p0, &grads[..cut], 3e-3);
        b.update(p1, &grads[cut..], 3e-3);
        assert_eq!(whole, sharded);
    }

    #[test]
    fn clipping_scales_by_the_global_norm() {
        let g = [3.0f32, 4.0];
        let norm = sum_of_squares(&g).sqrt();
        assert_eq!(norm, 5.0);
        let s = clip_scale(norm, Some(1.0));
        assert!((s - 1.0 / (5.0 + 1e-6)).abs() < 1e-12);
        let clipped: Vec<f64> = g.iter().map(|&x| f64::from(x) * s).collect();
        let clipped_norm = clipped.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((clipped_norm - 1.0).abs() < 1e-6);
        assert_eq!(clip_scale(norm, Some(10.0)), 1.0);
        assert_eq!(clip_scale(norm, None), 1.0);
        assert_eq!(clip_scale(f64::NAN, Some(1.0)), 1.0);
    }
}
