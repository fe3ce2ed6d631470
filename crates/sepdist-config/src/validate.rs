//! Cross-field rules, checked before anything is allocated. Every broken rule is reported,
//! not just the first.

use crate::error::RuleViolation;
use crate::schema::{Config, DatasetFormat};
use std::collections::HashSet;

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
    let bins: usize = widths.iter().sum();
    check(
        bins == m.freq_bins(),
        "model.bands",
        format!(
            "the {} bands cover {bins} bins, but n_fft = {} has n_fft/2+1 = {} bins",
            widths.len(),
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
    let l = &t.loss;
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
