//! Training loss: waveform L1 plus weighted multi-resolution complex-STFT L1 (MODEL.md).
//!
//! For each window size `w`: `n_fft = max(w, multi_stft_min_n_fft)`, Hann window of length `w`
//! centred in `n_fft`, hop `multi_stft_hop_size`, centred reflect-padded frames (lucidrains'
//! BS-RoFormer `torch.stft(..., n_fft, win_length=w, hop_length=147)`). The per-resolution term
//! is the mean absolute difference over the real and imaginary parts of all bins, frames,
//! channels and sources (the (re, im) pairs of the two spectra; not the complex modulus).
//! The STFT is linear, so `STFT(ŝ) − STFT(s)` is computed as `STFT(ŝ − s)`: one transform
//! per resolution instead of two.

use crate::error::{ModelError, Result};
use crate::ops::stft::Stft;
use candle_core::Tensor;
use sepdist_config::LossConfig;

/// The loss and its parts, each a scalar tensor on the graph of the estimate.
#[derive(Debug, Clone)]
pub struct LossParts {
    /// `mean |ŝ − s|` over all samples.
    pub waveform: Tensor,
    /// `Σ_resolutions mean |STFT(ŝ) − STFT(s)|` (unweighted).
    pub multi_stft: Tensor,
    /// `waveform + weight · multi_stft`.
    pub total: Tensor,
}

/// The configured loss; holds one STFT per resolution.
pub struct SeparationLoss {
    weight: f64,
    resolutions: Vec<(usize, Stft)>,
}

impl SeparationLoss {
    pub fn new(cfg: &LossConfig) -> Result<Self> {
        if cfg.multi_stft_hop_size == 0 {
            return Err(ModelError::Config(
                "multi_stft_hop_size must be positive".into(),
            ));
        }
        let resolutions = cfg
            .multi_stft_resolutions_window_sizes
            .iter()
            .map(|&w| {
                if w < 2 {
                    return Err(ModelError::Config(format!("STFT window {w} is too short")));
                }
                let n_fft = w.max(cfg.multi_stft_min_n_fft);
                Ok((n_fft, Stft::new(n_fft, cfg.multi_stft_hop_size, w)?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            weight: cfg.multi_stft_resolution_loss_weight,
            resolutions,
        })
    }

    /// `estimate` and `target` of equal shape `[..., N]` (usually `[B, S, 2, N]`).
    pub fn compute(&self, estimate: &Tensor, target: &Tensor) -> Result<LossParts> {
        if estimate.dims() != target.dims() {
            return Err(ModelError::Input(format!(
                "estimate {:?} and target {:?} differ in shape",
                estimate.dims(),
                target.dims()
            )));
        }
        let diff = (estimate - target)?;
        let waveform = diff.abs()?.mean_all()?;
        let n = diff.dims().last().copied().unwrap_or(0);
        let mut multi = waveform.zeros_like()?;
        if self.weight != 0.0 {
            for (n_fft, stft) in &self.resolutions {
                if n <= n_fft / 2 {
                    return Err(ModelError::Input(format!(
                        "signal of {n} samples is too short for an STFT of {n_fft} (reflect padding)"
                    )));
                }
                multi = (multi + stft.forward(&diff)?.abs()?.mean_all()?)?;
            }
        }
        let total = (&waveform + (&multi * self.weight)?)?;
        Ok(LossParts {
            waveform,
            multi_stft: multi,
            total,
        })
    }
}
