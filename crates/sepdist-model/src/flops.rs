//! Closed forms of the parameter count and the forward FLOPs, written from MODEL.md (not by
//! walking the parameter specs, so a test can check the two against each other).

use sepdist_config::ModelConfig;

/// Trainable scalars of the separator for `n_sources` sources.
///
/// With `F' = Σ f_k` (= n_fft/2+1), `K` bands, `D` = emb_dim, `I = H·⌊D/H⌋`, FFN widths
/// `h ∈ {h_time, h_band}`, `M` = mask_hidden, depth `L`, `S` sources:
/// - band split: `Σ_k (d_k + d_k·D + D) = 4F' + 4F'·D + K·D` (RMSNorm gain, weight, bias);
/// - per layer and transformer: `D + 3·I·D + I·D` (attention) `+ D + 2·D·h + h + D` (FFN);
/// - final norm: `D`;
/// - mask estimators: `S·[K·(D·M + M + (L−2)(M² + M)) + (M + 1)·8F']` for `L ≥ 2`,
///   `S·(D + 1)·8F'` for `L = 1`.
pub fn param_count(cfg: &ModelConfig, n_sources: usize) -> u64 {
    let widths = cfg.bands.widths();
    let k = widths.len() as u64;
    let f: u64 = widths.iter().map(|&w| w as u64).sum();
    let d = cfg.emb_dim as u64;
    let heads = cfg.n_heads.max(1) as u64;
    let inner = heads * (d / heads);
    let m = cfg.mask_hidden() as u64;
    let depth = cfg.mask_depth as u64;
    let s = n_sources as u64;

    let band_split = 4 * f + 4 * f * d + k * d;
    let transformer = |h: u64| (d + 3 * inner * d + inner * d) + (d + 2 * d * h + h + d);
    let layers = cfg.n_layers as u64
        * (transformer(cfg.ffn_hidden_dim[0] as u64) + transformer(cfg.ffn_hidden_dim[1] as u64));
    let final_norm = d;
    let mask = match depth {
        0 => 0,
        1 => s * (d + 1) * 8 * f,
        _ => s * (k * (d * m + m + (depth - 2) * (m * m + m)) + (m + 1) * 8 * f),
    };
    band_split + layers + final_norm + mask
}

/// FLOPs of one FFT of size `n`, the usual `5·n·log2(n)` estimate.
fn fft_flops(n: usize) -> f64 {
    let n = n as f64;
    5.0 * n * n.log2()
}

/// Forward FLOPs of the separator for one stereo example of `segment_length` samples.
///
/// Counts `2·MACs` of every matmul (band split, QKV, `QKᵀ`, `PV`, attention output, both FFN
/// linears, every mask-estimator linear) plus `5·n·log2(n)` per FFT of the mixture STFT
/// (2 channels × T frames) and of the iSTFT (S sources × 2 channels × T frames). Element-wise
/// work (norms, softmax, RoPE, GELU, masking, overlap-add) and the loss are not counted.
/// A training step (forward + backward) costs about 3× this; with activation checkpointing
/// about 4×.
pub fn flops_per_sample(cfg: &ModelConfig, n_sources: usize, segment_length: usize) -> f64 {
    let widths = cfg.bands.widths();
    let k = widths.len() as f64;
    let f: f64 = widths.iter().map(|&w| w as f64).sum();
    let t = cfg.frames(segment_length) as f64;
    let d = cfg.emb_dim as f64;
    let heads = cfg.n_heads.max(1);
    let dh = (cfg.emb_dim / heads) as f64;
    let h = heads as f64;
    let inner = h * dh;
    let m = cfg.mask_hidden() as f64;
    let s = n_sources as f64;

    let ffts = (2.0 + 2.0 * s) * t * fft_flops(cfg.n_fft);
    let band_split = 2.0 * t * 4.0 * f * d;
    // A transformer over `seqs` sequences of length `len`, FFN width `hid`.
    let transformer = |seqs: f64, len: f64, hid: f64| {
        let tokens = seqs * len;
        qkv_projection(tokens, d, inner)
            + 2.0 * 2.0 * seqs * h * len * len * dh
            + 2.0 * tokens * inner * d
            + 2.0 * tokens * 2.0 * d * hid
    };
    let layers = cfg.n_layers as f64
        * (transformer(k, t, cfg.ffn_hidden_dim[0] as f64)
            + transformer(t, k, cfg.ffn_hidden_dim[1] as f64));
    let mask = match cfg.mask_depth {
        0 => 0.0,
        1 => s * t * 2.0 * d * 8.0 * f,
        depth => s * t * 2.0 * (k * (d * m + (depth - 2) as f64 * m * m) + m * 8.0 * f),
    };
    ffts + band_split + layers + mask
}

/// Forward FLOPs, per stereo example of `segment_length` samples, of the transformers' QKV
/// projections: what activation checkpointing's backward runs a third time
/// (`Block::backward_recomputed`).
pub fn qkv_flops_per_sample(cfg: &ModelConfig, segment_length: usize) -> f64 {
    let k = cfg.bands.widths().len() as f64;
    let t = cfg.frames(segment_length) as f64;
    let d = cfg.emb_dim as f64;
    let inner = (cfg.n_heads.max(1) * (cfg.emb_dim / cfg.n_heads.max(1))) as f64;
    // Both transformers of a layer see every (frame, band) token once.
    cfg.n_layers as f64 * 2.0 * qkv_projection(k * t, d, inner)
}

/// `2·MACs` of the QKV projection of `tokens` rows of width `d` to `3·inner`.
fn qkv_projection(tokens: f64, d: f64, inner: f64) -> f64 {
    2.0 * tokens * d * 3.0 * inner
}
