//! Training loss: a weighted sum of waveform L1, waveform MSE and the multi-resolution
//! complex-STFT L1 of MODEL.md (default: L1 + multi-STFT), optionally weighted per source.
//!
//! For each window size `w`: `n_fft = max(w, multi_stft_min_n_fft)`, Hann window of length `w`
//! centred in `n_fft`, hop `multi_stft_hop_size`, centred reflect-padded frames (lucidrains'
//! BS-RoFormer `torch.stft(..., n_fft, win_length=w, hop_length=147)`). The per-resolution term
//! is the mean absolute difference over the real and imaginary parts of all bins, frames,
//! channels and sources (the (re, im) pairs of the two spectra; not the complex modulus).
//! The STFT is linear, so `STFT(ŝ) − STFT(s)` is computed as `STFT(ŝ − s)`: one transform
//! per resolution instead of two. All resolutions are one fused op
//! ([`crate::ops::stft_l1::multi_stft_l1`]) that keeps only the difference for the backward,
//! not a spectrogram per resolution.

use crate::error::{ModelError, Result};
use crate::ops::stft::Stft;
use crate::ops::stft_l1::multi_stft_l1;
use candle_core::Tensor;
use sepdist_config::LossConfig;

/// The loss and its parts, each a scalar tensor on the graph of the estimate (from
/// [`SeparationLoss::compute_source`]: one source's share of each).
#[derive(Debug, Clone)]
pub struct LossParts {
    /// `mean |ŝ − s|` over all samples (source-weighted mean when weights are set).
    pub waveform: Tensor,
    /// `mean (ŝ − s)²`, likewise.
    pub mse: Tensor,
    /// `Σ_resolutions mean |STFT(ŝ) − STFT(s)|` (unweighted by its loss weight; zero when
    /// that weight is 0, as it is then not computed).
    pub multi_stft: Tensor,
    /// `l1_weight · waveform + mse_weight · mse + multi_stft_weight · multi_stft`.
    pub total: Tensor,
}

/// The configured loss; holds one STFT per resolution.
pub struct SeparationLoss {
    l1_weight: f64,
    mse_weight: f64,
    weight: f64,
    resolutions: Vec<Stft>,
    /// Per-source weights of a `[B, S, 2, N]` estimate; `None`: all 1.
    source_weights: Option<Vec<f64>>,
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
                Ok(Stft::new(n_fft, cfg.multi_stft_hop_size, w)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            l1_weight: cfg.l1_weight,
            mse_weight: cfg.mse_weight,
            weight: cfg.multi_stft_resolution_loss_weight,
            resolutions,
            source_weights: None,
        })
    }

    /// The loss of `cfg` for estimates of `sources` (in that order), with
    /// `cfg.source_weights` applied (absent sources weigh 1). All weights 1 is the plain mean.
    pub fn for_sources(cfg: &LossConfig, sources: &[String]) -> Result<Self> {
        let mut loss = Self::new(cfg)?;
        if let Some(unknown) = cfg.source_weights.keys().find(|k| !sources.contains(k)) {
            return Err(ModelError::Config(format!(
                "loss weight for `{unknown}`, which is not one of the sources ({})",
                sources.join(", ")
            )));
        }
        let weights: Vec<f64> = sources
            .iter()
            .map(|s| cfg.source_weights.get(s).copied().unwrap_or(1.0))
            .collect();
        if weights.iter().any(|w| !w.is_finite() || *w < 0.0) || weights.iter().sum::<f64>() <= 0.0
        {
            return Err(ModelError::Config(format!(
                "source weights {weights:?} must be non-negative with a positive sum"
            )));
        }
        if weights.iter().any(|&w| w != 1.0) {
            loss.source_weights = Some(weights);
        }
        Ok(loss)
    }

    /// The STFTs of the multi-resolution term, one per window size.
    pub fn resolutions(&self) -> &[Stft] {
        &self.resolutions
    }

    /// `estimate` and `target` of equal shape `[..., N]` (usually `[B, S, 2, N]`; source
    /// weights need exactly that shape).
    pub fn compute(&self, estimate: &Tensor, target: &Tensor) -> Result<LossParts> {
        if estimate.dims() != target.dims() {
            return Err(ModelError::Input(format!(
                "estimate {:?} and target {:?} differ in shape",
                estimate.dims(),
                target.dims()
            )));
        }
        let diff = (estimate - target)?;
        // A weighted mean over sources of equal size is (S / Σw) · mean(w · x). Weights are
        // non-negative, so |w·d| = w·|d|, and the STFT is linear: STFT(w·d) = w·STFT(d).
        let (weighted, weight_tensor, norm) = match &self.source_weights {
            None => (diff.clone(), None, 1.0),
            Some(w) => {
                let dims = diff.dims();
                if dims.len() != 4 || dims[1] != w.len() {
                    return Err(ModelError::Input(format!(
                        "source weights for {} sources need a [B, S, 2, N] estimate, got {dims:?}",
                        w.len()
                    )));
                }
                let wt = Tensor::from_vec(
                    w.iter().map(|&x| x as f32).collect::<Vec<_>>(),
                    (1, w.len(), 1, 1),
                    diff.device(),
                )?
                .to_dtype(diff.dtype())?;
                let weighted = diff.broadcast_mul(&wt)?;
                (weighted, Some(wt), w.len() as f64 / w.iter().sum::<f64>())
            }
        };
        let scale = |t: Tensor| -> Result<Tensor> { Ok(if norm == 1.0 { t } else { (t * norm)? }) };
        let waveform = scale(weighted.abs()?.mean_all()?)?;
        let squared = diff.sqr()?;
        let squared = match &weight_tensor {
            None => squared,
            Some(wt) => squared.broadcast_mul(wt)?,
        };
        let mse = scale(squared.mean_all()?)?;
        let multi = self.multi_stft(&weighted, &waveform, scale)?;
        self.parts(waveform, mse, multi)
    }

    /// The part of [`SeparationLoss::compute`] that source `source` of `n_sources`
    /// contributes, from that source's `estimate` and `target` (equal shapes `[..., N]`,
    /// usually `[B, 1, 2, N]`; every source's the same). Summed over the sources, each part
    /// (and the total) equals the one of `compute` on the `[B, S, 2, N]` stack: the means
    /// over all sources are `Σ_s c_s · mean_s` with `c_s = w_s / Σw` (`1 / S` unweighted).
    /// What the engine runs, so that only one source's head and loss graphs are alive at a
    /// time.
    pub fn compute_source(
        &self,
        estimate: &Tensor,
        target: &Tensor,
        source: usize,
        n_sources: usize,
    ) -> Result<LossParts> {
        if estimate.dims() != target.dims() {
            return Err(ModelError::Input(format!(
                "estimate {:?} and target {:?} of source {source} differ in shape",
                estimate.dims(),
                target.dims()
            )));
        }
        if source >= n_sources {
            return Err(ModelError::Input(format!(
                "source {source} out of range for {n_sources} sources"
            )));
        }
        let share = match &self.source_weights {
            None => 1.0 / n_sources as f64,
            Some(w) if w.len() == n_sources => w[source] / w.iter().sum::<f64>(),
            Some(w) => {
                return Err(ModelError::Input(format!(
                    "the loss has weights for {} sources, not {n_sources}",
                    w.len()
                )));
            }
        };
        // Non-negative weights and a linear STFT: the source's share scales each mean.
        let scale =
            |t: Tensor| -> Result<Tensor> { Ok(if share == 1.0 { t } else { (t * share)? }) };
        let diff = (estimate - target)?;
        let waveform = scale(diff.abs()?.mean_all()?)?;
        let mse = scale(diff.sqr()?.mean_all()?)?;
        let multi = self.multi_stft(&diff, &waveform, scale)?;
        self.parts(waveform, mse, multi)
    }

    /// `scale(Σ_resolutions mean |STFT(d)|)` of the (weighted) difference `d`; zero (like
    /// `zero`) when its loss weight is 0.
    fn multi_stft(
        &self,
        d: &Tensor,
        zero: &Tensor,
        scale: impl Fn(Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        if self.weight == 0.0 {
            return Ok(zero.zeros_like()?);
        }
        let n = d.dims().last().copied().unwrap_or(0);
        if let Some(stft) = self.resolutions.iter().find(|s| n <= s.n_fft() / 2) {
            return Err(ModelError::Input(format!(
                "signal of {n} samples is too short for an STFT of {} (reflect padding)",
                stft.n_fft()
            )));
        }
        scale(multi_stft_l1(d, &self.resolutions)?)
    }

    /// The parts with their weighted total.
    fn parts(&self, waveform: Tensor, mse: Tensor, multi: Tensor) -> Result<LossParts> {
        // Only the parts with a positive weight join the graph of the total.
        let mut total: Option<Tensor> = None;
        for (part, w) in [
            (&waveform, self.l1_weight),
            (&mse, self.mse_weight),
            (&multi, self.weight),
        ] {
            if w != 0.0 {
                let term = if w == 1.0 { part.clone() } else { (part * w)? };
                total = Some(match total {
                    None => term,
                    Some(t) => (t + term)?,
                });
            }
        }
        let total = match total {
            Some(t) => t,
            None => waveform.zeros_like()?,
        };
        Ok(LossParts {
            waveform,
            mse,
            multi_stft: multi,
            total,
        })
    }
}
