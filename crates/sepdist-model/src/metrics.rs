//! Separation metrics on plain sample buffers: uSDR (MSST/MDX "utterance" SDR) and the
//! BSSEval v4 SDR of `museval` with its per-track median (cSDR, the SiSEC 2018 / MUSDB18
//! number).
//!
//! Audio is one buffer per source, channel-major (`[C, N]` flattened: left channel, then
//! right), as everywhere in sepdist. Sums are accumulated in `f64`.
//!
//! # Why BSSEval v4's SDR is computed without the 512-tap projection
//!
//! museval (`metrics.bss_eval`, `mode="v4"`, `bsseval_sources_version=False`, the setting of
//! `museval.evaluate` and of every MUSDB18 leaderboard) decomposes the estimate of source `j`
//! in each window into `s_true + e_spat + e_interf + e_artif`, where `e_spat` and `e_interf`
//! come from the 512-tap projection filters (computed once per track from the references'
//! auto/cross-correlations) and `e_artif = ŝ − s_true − e_spat − e_interf` by construction
//! (`_bss_decomp_mtifilt`). The images-version criterion (`_bss_crit`) is then
//! `SDR = 10·log10(Σ s_true² / Σ (e_spat + e_interf + e_artif)²)`, and the error sum
//! telescopes to `ŝ − s_true`: the projection filters cancel out of the SDR exactly. The
//! per-window SDR of museval v4 is therefore the windowed signal-to-error ratio
//! `10·log10(Σ_win s² / Σ_win (ŝ − s)²)`, which this module computes directly. Consequences
//! (checked against museval in the tests' fixtures): it is *not* scale invariant and a
//! filtered estimate is *not* forgiven by the filter (those invariances show up in museval's
//! SIR/SAR, not its SDR). The filters only matter for ISR/SIR/SAR, which this module does not
//! compute.
//!
//! museval's framing and NaN rules are reproduced: windows `[t·hop, t·hop + window)` for
//! `t < ⌊(N − window + hop) / hop⌋` (a trailing partial window is dropped; a track shorter
//! than one window is one window), and a window in which *any* reference source or *any*
//! estimate is silent (its channel sum zero at every sample) is NaN for every source. A zero
//! error gives `+inf` (museval's `_safe_db`). cSDR is the median over the non-NaN windows
//! (pandas' `median`, which museval's track aggregation uses).

/// ε of uSDR, as in MSST's and the MDX challenge's `sdr` (added to both energies).
pub const USDR_EPS: f64 = 1e-7;

/// Errors of the metrics (shapes only; the metrics themselves are total).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MetricsError {
    #[error("reference has {reference} samples, estimate {estimate}")]
    Length { reference: usize, estimate: usize },
    #[error("{what} must be positive")]
    Zero { what: &'static str },
    #[error("{samples} samples do not split into {channels} channels")]
    Channels { samples: usize, channels: usize },
    #[error("{references} references but {estimates} estimates")]
    Sources { references: usize, estimates: usize },
}

pub type Result<T> = std::result::Result<T, MetricsError>;

fn same_len(reference: &[f32], estimate: &[f32]) -> Result<()> {
    if reference.len() == estimate.len() {
        Ok(())
    } else {
        Err(MetricsError::Length {
            reference: reference.len(),
            estimate: estimate.len(),
        })
    }
}

/// Whole-track SDR of one source, all channels pooled:
/// `10·log10((Σ s² + ε) / (Σ (s − ŝ)² + ε))` with `ε =` [`USDR_EPS`].
pub fn usdr(reference: &[f32], estimate: &[f32]) -> Result<f64> {
    same_len(reference, estimate)?;
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&s, &e) in reference.iter().zip(estimate) {
        let (s, e) = (f64::from(s), f64::from(e));
        num += s * s;
        den += (s - e) * (s - e);
    }
    Ok(10.0 * ((num + USDR_EPS) / (den + USDR_EPS)).log10())
}

/// [`usdr`] on `f64` buffers.
pub fn usdr_f64(reference: &[f64], estimate: &[f64]) -> Result<f64> {
    if reference.len() != estimate.len() {
        return Err(MetricsError::Length {
            reference: reference.len(),
            estimate: estimate.len(),
        });
    }
    let num: f64 = reference.iter().map(|s| s * s).sum();
    let den: f64 = reference
        .iter()
        .zip(estimate)
        .map(|(s, e)| (s - e) * (s - e))
        .sum();
    Ok(10.0 * ((num + USDR_EPS) / (den + USDR_EPS)).log10())
}

/// Window and hop of BSSEval v4, in samples. MUSDB18 uses one second for both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framing {
    pub window: usize,
    pub hop: usize,
}

impl Framing {
    /// museval's MUSDB setting: `window = hop = sample_rate`.
    pub fn seconds(sample_rate: u32) -> Self {
        let n = sample_rate as usize;
        Framing { window: n, hop: n }
    }

    /// The `[start, end)` windows of a signal of `frames` samples (museval's `Framing`).
    pub fn windows(&self, frames: usize) -> Vec<(usize, usize)> {
        let count = if self.window < frames {
            (frames - self.window + self.hop) / self.hop
        } else {
            1
        };
        (0..count)
            .map(|t| {
                let start = t * self.hop;
                (start, (start + self.window).min(frames))
            })
            .collect()
    }
}

/// Per-window BSSEval v4 SDR (museval `evaluate`, images version) of every source:
/// `result[j][t]`, NaN where museval skips the window (see the module documentation).
/// `references[j]` and `estimates[j]` are `[channels, N]` channel-major buffers of equal
/// length; an estimate of another length should be cut or zero-padded to the reference's
/// first, as museval's `pad_or_truncate` does (see [`pad_or_truncate`]).
pub fn bss_eval_v4_sdr(
    references: &[&[f32]],
    estimates: &[&[f32]],
    channels: usize,
    framing: Framing,
) -> Result<Vec<Vec<f64>>> {
    if references.len() != estimates.len() {
        return Err(MetricsError::Sources {
            references: references.len(),
            estimates: estimates.len(),
        });
    }
    if channels == 0 {
        return Err(MetricsError::Zero { what: "channels" });
    }
    if framing.window == 0 || framing.hop == 0 {
        return Err(MetricsError::Zero {
            what: "window and hop",
        });
    }
    let Some(first) = references.first() else {
        return Ok(Vec::new());
    };
    let total = first.len();
    for (r, e) in references.iter().zip(estimates) {
        same_len(first, r)?;
        same_len(r, e)?;
    }
    if total % channels != 0 {
        return Err(MetricsError::Channels {
            samples: total,
            channels,
        });
    }
    let frames = total / channels;
    let windows = framing.windows(frames);
    // museval's `_any_source_silent`: a source is silent in a window when the sum over its
    // channels is exactly zero at every sample.
    let silent = |x: &[f32], start: usize, end: usize| {
        (start..end).all(|i| {
            (0..channels)
                .map(|c| f64::from(x[c * frames + i]))
                .sum::<f64>()
                == 0.0
        })
    };
    let mut out = vec![Vec::with_capacity(windows.len()); references.len()];
    for &(start, end) in &windows {
        let skip = references
            .iter()
            .chain(estimates)
            .any(|x| silent(x, start, end));
        for (j, (r, e)) in references.iter().zip(estimates).enumerate() {
            let sdr = if skip {
                f64::NAN
            } else {
                let (mut num, mut den) = (0.0f64, 0.0f64);
                for c in 0..channels {
                    let range = c * frames + start..c * frames + end;
                    for (&s, &x) in r[range.clone()].iter().zip(&e[range]) {
                        let (s, x) = (f64::from(s), f64::from(x));
                        num += s * s;
                        den += (x - s) * (x - s);
                    }
                }
                safe_db(num, den)
            };
            out[j].push(sdr);
        }
    }
    Ok(out)
}

/// museval's `_safe_db`: `+inf` for a zero denominator.
fn safe_db(num: f64, den: f64) -> f64 {
    if den == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (num / den).log10()
    }
}

/// The median of the non-NaN values (the mean of the two middle ones for an even count), NaN
/// if there is none: pandas' `median`, which museval aggregates the windows with.
pub fn nan_median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// cSDR of every source: the median over windows of [`bss_eval_v4_sdr`], NaN windows ignored.
pub fn csdr(
    references: &[&[f32]],
    estimates: &[&[f32]],
    channels: usize,
    framing: Framing,
) -> Result<Vec<f64>> {
    Ok(bss_eval_v4_sdr(references, estimates, channels, framing)?
        .iter()
        .map(|w| nan_median(w))
        .collect())
}

/// museval's `pad_or_truncate` for one channel-major buffer: the estimate (`[channels, n]`)
/// cut or zero-padded at the end of every channel to `frames` samples per channel.
pub fn pad_or_truncate(estimate: &[f32], channels: usize, frames: usize) -> Result<Vec<f32>> {
    if channels == 0 {
        return Err(MetricsError::Zero { what: "channels" });
    }
    if estimate.len() % channels != 0 {
        return Err(MetricsError::Channels {
            samples: estimate.len(),
            channels,
        });
    }
    let n = estimate.len() / channels;
    let keep = n.min(frames);
    let mut out = vec![0.0; channels * frames];
    for c in 0..channels {
        out[c * frames..c * frames + keep].copy_from_slice(&estimate[c * n..c * n + keep]);
    }
    Ok(out)
}
