//! Cross-field rules, checked before anything is allocated. Every broken rule is reported,
//! not just the first.

use crate::error::RuleViolation;
use crate::schema::{Config, DatasetFormat};
use std::collections::HashSet;

/// Bound of `widest² × (bands + 1) × (layers + mask_depth + 1) × sources` (see `validate`).
const MAX_MODEL_SIZE: f64 = (1u64 << 50) as f64;

/// Most tracks the synthetic generator writes (`dataset.synthetic.tracks`, `data synth --tracks`).
pub const MAX_SYNTHETIC_TRACKS: usize = 100_000;
/// Most frames of one synthetic track (`seconds × sample_rate`): 2^27, about 50 min at
/// 44.1 kHz; every stem of a track is held in memory while it is written.
pub const MAX_SYNTHETIC_FRAMES: u64 = 1 << 27;

/// Why a synthetic dataset of `tracks` tracks of `seconds` s at `sample_rate` Hz is too large
/// to generate; `None` when it is within [`MAX_SYNTHETIC_TRACKS`] and [`MAX_SYNTHETIC_FRAMES`].
pub fn synthetic_too_large(tracks: usize, seconds: f32, sample_rate: u32) -> Option<String> {
    if tracks > MAX_SYNTHETIC_TRACKS {
        return Some(format!(
            "{tracks} tracks are more than the generator's limit of {MAX_SYNTHETIC_TRACKS}"
        ));
    }
    let frames = f64::from(seconds) * f64::from(sample_rate);
    (frames > MAX_SYNTHETIC_FRAMES as f64).then(|| {
        format!(
            "{seconds} s at {sample_rate} Hz is {frames:.0} frames per track, more than the generator's limit of {MAX_SYNTHETIC_FRAMES} ({:.0} min at {sample_rate} Hz)",
            MAX_SYNTHETIC_FRAMES as f64 / f64::from(sample_rate.max(1)) / 60.0
        )
    })
}

pub fn validate(c: &Config) -> Vec<RuleViolation> {
    let mut out = Vec::new();
    let mut check = |ok: bool, key: &str, message: String| {
        if !ok {
            out.push(RuleViolation {
                key: key.to_string(),
                message,
            });
        }
    };
    let (d, m, t, dist) = (&c.dataset, &c.model, &c.training, &c.distributed);

    check(
        !d.sources.is_empty(),
        "dataset.sources",
        "must name at least one source".into(),
    );
    let mut seen = HashSet::new();
    for s in &d.sources {
        check(
            !s.trim().is_empty(),
            "dataset.sources",
            "a source name is empty".into(),
        );
        // The name becomes part of parameter names (`mask_estimators.{name}.…`).
        check(
            !s.contains(['.', '/']),
            "dataset.sources",
            format!("`{s}` must not contain `.` or `/`"),
        );
        check(
            seen.insert(s),
            "dataset.sources",
            format!("`{s}` is listed twice"),
        );
    }
    check(
        d.sample_rate > 0,
        "dataset.sample_rate",
        "must be positive".into(),
    );
    check(
        d.segment_length >= m.n_fft,
        "dataset.segment_length",
        format!(
            "{} is shorter than model.n_fft = {}",
            d.segment_length, m.n_fft
        ),
    );
    check(
        d.samples_per_epoch >= 1,
        "dataset.samples_per_epoch",
        "must be at least 1".into(),
    );
    let [gmin, gmax] = d.augment.gain;
    check(
        gmin.is_finite() && gmax.is_finite() && 0.0 <= gmin && gmin <= gmax,
        "dataset.augment.gain",
        format!("[{gmin}, {gmax}] must satisfy 0 <= min <= max"),
    );
    check(
        d.num_workers >= 1,
        "dataset.num_workers",
        "must be at least 1".into(),
    );
    check(
        d.prefetch >= 1,
        "dataset.prefetch",
        "must be at least 1".into(),
    );
    if d.format == DatasetFormat::Synthetic {
        let syn = &d.synthetic;
        check(
            syn.tracks >= 2,
            "dataset.synthetic.tracks",
            format!(
                "{} leaves no track for the train or the test split (need >= 2)",
                syn.tracks
            ),
        );
        if let Some(why) = synthetic_too_large(syn.tracks, syn.seconds, d.sample_rate) {
            check(false, "dataset.synthetic", why);
        }
        let frames = (f64::from(syn.seconds) * f64::from(d.sample_rate)).floor();
        check(
            syn.seconds.is_finite() && frames >= d.segment_length as f64,
            "dataset.synthetic.seconds",
            format!(
                "{} s at {} Hz is shorter than dataset.segment_length = {}",
                syn.seconds, d.sample_rate, d.segment_length
            ),
        );
    }

    check(
        m.n_fft >= 2 && m.n_fft % 2 == 0,
        "model.n_fft",
        format!("{} must be even and at least 2", m.n_fft),
    );
    check(
        m.hop_length >= 1 && m.hop_length <= m.n_fft,
        "model.hop_length",
        format!(
            "{} must be between 1 and model.n_fft = {}",
            m.hop_length, m.n_fft
        ),
    );
    let widths = m.bands.widths();
    // Checked: absurd widths must be reported, not overflow.
    let bins = widths.iter().try_fold(0usize, |sum, &w| sum.checked_add(w));
    check(
        bins == Some(m.freq_bins()),
        "model.bands",
        format!(
            "the {} bands cover {} bins, but n_fft = {} has n_fft/2+1 = {} bins",
            widths.len(),
            bins.map_or_else(|| "more than 2^64".to_string(), |b| b.to_string()),
            m.n_fft,
            m.freq_bins()
        ),
    );
    check(
        !widths.contains(&0),
        "model.bands",
        "a band has 0 bins".into(),
    );
    check(
        m.n_layers >= 1,
        "model.n_layers",
        "must be at least 1".into(),
    );
    // A loose bound of the parameter count (products of the widths, layers and sources): the
    // closed forms of the parameter count and FLOPs use 64-bit integers, and no machine holds
    // a model anywhere near this size (real ones stay below 2^41).
    let widest = [
        m.emb_dim,
        m.mask_hidden(),
        m.ffn_hidden_dim[0],
        m.ffn_hidden_dim[1],
        m.freq_bins(),
    ]
    .into_iter()
    .max()
    .unwrap_or(0);
    let size = (widest as f64).powi(2)
        * (widths.len() as f64 + 1.0)
        * (m.n_layers as f64 + m.mask_depth as f64 + 1.0)
        * (d.sources.len() as f64).max(1.0);
    check(
        size <= MAX_MODEL_SIZE,
        "model",
        format!(
            "implausibly large (widths up to {widest}, {} layers, {} bands, {} sources: on the order of {size:.1e} parameters)",
            m.n_layers,
            widths.len(),
            d.sources.len()
        ),
    );
    check(m.n_heads >= 1, "model.n_heads", "must be at least 1".into());
    check(
        m.n_heads >= 1 && m.emb_dim >= 1 && m.emb_dim % m.n_heads == 0,
        "model.emb_dim",
        format!(
            "{} is not divisible by model.n_heads = {}",
            m.emb_dim, m.n_heads
        ),
    );
    check(
        m.head_dim() % 2 == 0,
        "model.n_heads",
        format!(
            "head dimension emb_dim/n_heads = {} must be even (rotary embedding rotates pairs)",
            m.head_dim()
        ),
    );
    check(
        m.ffn_hidden_dim.iter().all(|&h| h >= 1),
        "model.ffn_hidden_dim",
        "widths must be at least 1".into(),
    );
    check(
        m.mask_hidden() >= 1,
        "model.mask_hidden_dim",
        "must be at least 1".into(),
    );
    check(
        m.mask_depth >= 1,
        "model.mask_depth",
        "must be at least 1".into(),
    );

    check(
        t.batch_size >= 1,
        "training.batch_size",
        "must be at least 1".into(),
    );
    check(
        t.gradient_accumulation_steps >= 1,
        "training.gradient_accumulation_steps",
        "must be at least 1".into(),
    );
    check(
        t.epochs >= 1,
        "training.epochs",
        "must be at least 1".into(),
    );
    let o = &t.optimizer;
    check(
        o.lr.is_finite() && o.lr > 0.0,
        "training.optimizer.lr",
        format!("{} must be positive", o.lr),
    );
    check(
        o.betas.iter().all(|b| (0.0..1.0).contains(b)),
        "training.optimizer.betas",
        format!("{:?} must each lie in [0, 1)", o.betas),
    );
    check(
        o.weight_decay.is_finite() && o.weight_decay >= 0.0,
        "training.optimizer.weight_decay",
        "must be non-negative".into(),
    );
    check(
        o.eps.is_finite() && o.eps > 0.0,
        "training.optimizer.eps",
        "must be positive".into(),
    );
    if let Some(clip) = t.grad_clip {
        check(
            clip.is_finite() && clip > 0.0,
            "training.grad_clip",
            format!("{clip} must be positive (null disables clipping)"),
        );
    }
    if let Some(p) = &t.lr_schedule.plateau {
        check(
            p.factor.is_finite() && p.factor > 0.0 && p.factor < 1.0,
            "training.lr_schedule.plateau.factor",
            format!("{} must lie in (0, 1)", p.factor),
        );
        check(
            p.min_lr.is_finite() && p.min_lr >= 0.0,
            "training.lr_schedule.plateau.min_lr",
            "must be non-negative".into(),
        );
        check(
            p.threshold.is_finite() && p.threshold >= 0.0,
            "training.lr_schedule.plateau.threshold",
            "must be non-negative (dB of mean uSDR)".into(),
        );
    }
    if let Some(e) = &t.ema {
        check(
            (0.0..1.0).contains(&e.momentum),
            "training.ema.momentum",
            format!("{} must lie in [0, 1)", e.momentum),
        );
        check(
            e.every >= 1,
            "training.ema.every",
            "must be at least 1 optimizer step".into(),
        );
    }
    check(
        !(dist.backend == crate::schema::Backend::Nccl
            && t.device == crate::schema::DeviceChoice::Cpu),
        "training.device",
        "cpu, but distributed.backend: nccl runs on GPUs; use training.device: cuda or auto, or another backend".into(),
    );
    if let Some(budget) = t.memory_budget {
        check(
            budget.0 > 0,
            "training.memory_budget",
            "must be a positive size such as 24GB (null: the device's free memory)".into(),
        );
    }
    let l = &t.loss;
    for (key, w) in [("l1_weight", l.l1_weight), ("mse_weight", l.mse_weight)] {
        check(
            w.is_finite() && w >= 0.0,
            &format!("training.loss.{key}"),
            format!("{w} must be non-negative"),
        );
    }
    check(
        l.l1_weight > 0.0 || l.mse_weight > 0.0 || l.multi_stft_resolution_loss_weight > 0.0,
        "training.loss",
        "l1_weight, mse_weight and multi_stft_resolution_loss_weight are all 0: nothing to train on"
            .into(),
    );
    for (name, w) in &l.source_weights {
        check(
            d.sources.contains(name),
            "training.loss.source_weights",
            format!(
                "`{name}` is not one of dataset.sources ({})",
                d.sources.join(", ")
            ),
        );
        check(
            w.is_finite() && *w >= 0.0,
            "training.loss.source_weights",
            format!("{name}: {w} must be non-negative"),
        );
    }
    check(
        d.sources
            .iter()
            .any(|s| l.source_weights.get(s).is_none_or(|w| *w > 0.0)),
        "training.loss.source_weights",
        "every source has weight 0".into(),
    );
    check(
        l.multi_stft_resolution_loss_weight.is_finite()
            && l.multi_stft_resolution_loss_weight >= 0.0,
        "training.loss.multi_stft_resolution_loss_weight",
        "must be non-negative".into(),
    );
    check(
        l.multi_stft_hop_size >= 1,
        "training.loss.multi_stft_hop_size",
        "must be at least 1".into(),
    );
    if l.multi_stft_resolution_loss_weight > 0.0 {
        check(
            !l.multi_stft_resolutions_window_sizes.is_empty(),
            "training.loss.multi_stft_resolutions_window_sizes",
            "is empty while the multi-resolution weight is positive".into(),
        );
        for &w in &l.multi_stft_resolutions_window_sizes {
            let n_fft = w.max(l.multi_stft_min_n_fft);
            check(
                w >= 2,
                "training.loss.multi_stft_resolutions_window_sizes",
                format!("window {w} must be at least 2"),
            );
            // Centred STFTs reflect-pad by n_fft/2, which needs a longer signal.
            check(
                d.segment_length > n_fft / 2,
                "training.loss.multi_stft_resolutions_window_sizes",
                format!(
                    "window {w} uses n_fft {n_fft}, whose reflect padding needs dataset.segment_length > {}",
                    n_fft / 2
                ),
            );
        }
    }

    check(
        dist.zero_stage <= 3,
        "distributed.zero_stage",
        format!("{} must be 0, 1, 2 or 3", dist.zero_stage),
    );
    check(
        dist.bucket_size_mb.is_finite() && dist.bucket_size_mb > 0.0,
        "distributed.bucket_size_mb",
        "must be positive".into(),
    );
    check(
        dist.timeout_s >= 1,
        "distributed.timeout_s",
        "must be at least 1 second".into(),
    );
    out
}
