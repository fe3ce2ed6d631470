//! Loss parts against a direct computation (host-side STFT by the DFT definition).

mod model_util;

use candle_core::{Device, Tensor};
use sepdist_config::LossConfig;
use sepdist_model::loss::SeparationLoss;
use std::f64::consts::PI;

type R<T> = Result<T, Box<dyn std::error::Error>>;

/// `torch.stft(x, n_fft, hop, win_length=win, window=hann(win, periodic), center=True,
/// pad_mode="reflect")` as (re, im) values, by the definition.
fn naive_stft(x: &[f64], n_fft: usize, hop: usize, win: usize) -> Vec<(f64, f64)> {
    let n = x.len() as isize;
    let pad = (n_fft / 2) as isize;
    let off = (n_fft - win) / 2;
    let mut w = vec![0.0; n_fft];
    for i in 0..win {
        w[off + i] = 0.5 - 0.5 * (2.0 * PI * i as f64 / win as f64).cos();
    }
    let frames = x.len() / hop + 1;
    let mut out = Vec::new();
    for t in 0..frames {
        for k in 0..=n_fft / 2 {
            let (mut re, mut im) = (0.0, 0.0);
            for (j, wj) in w.iter().enumerate() {
                let mut i = (t * hop + j) as isize - pad;
                if i < 0 {
                    i = -i;
                }
                if i >= n {
                    i = 2 * (n - 1) - i;
                }
                let a = -2.0 * PI * (k * j) as f64 / n_fft as f64;
                re += wj * x[i as usize] * a.cos();
                im += wj * x[i as usize] * a.sin();
            }
            out.push((re, im));
        }
    }
    out
}

#[test]
fn model_loss_parts_match_direct_computation() -> R<()> {
    let dev = Device::Cpu;
    let cfg = LossConfig {
        multi_stft_resolution_loss_weight: 0.5,
        multi_stft_resolutions_window_sizes: vec![16, 8],
        multi_stft_hop_size: 5,
        multi_stft_min_n_fft: 12,
        ..LossConfig::default()
    };
    let loss = SeparationLoss::new(&cfg)?;
    let est = model_util::normal(&[1, 2, 2, 40], 1.0, 1)?;
    let tgt = model_util::normal(&[1, 2, 2, 40], 1.0, 2)?;
    let parts = loss.compute(&est, &tgt)?;

    let e = est.reshape((4, 40))?.to_vec2::<f64>()?;
    let t = tgt.reshape((4, 40))?.to_vec2::<f64>()?;
    let wave: f64 = e
        .iter()
        .flatten()
        .zip(t.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .sum::<f64>()
        / 160.0;
    let mut multi = 0.0;
    for &win in &cfg.multi_stft_resolutions_window_sizes {
        let n_fft = win.max(cfg.multi_stft_min_n_fft);
        let (mut sum, mut count) = (0.0, 0usize);
        for (a, b) in e.iter().zip(&t) {
            let sa = naive_stft(a, n_fft, cfg.multi_stft_hop_size, win);
            let sb = naive_stft(b, n_fft, cfg.multi_stft_hop_size, win);
            for ((ar, ai), (br, bi)) in sa.into_iter().zip(sb) {
                sum += (ar - br).abs() + (ai - bi).abs();
                count += 2;
            }
        }
        multi += sum / count as f64;
    }
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-10 * b.abs().max(1.0);
    let got_wave = parts.waveform.to_scalar::<f64>()?;
    let got_multi = parts.multi_stft.to_scalar::<f64>()?;
    let got_total = parts.total.to_scalar::<f64>()?;
    assert!(close(got_wave, wave), "{got_wave} vs {wave}");
    assert!(close(got_multi, multi), "{got_multi} vs {multi}");
    assert!(close(got_total, wave + 0.5 * multi), "{got_total}");

    // Weight 0 skips the spectral part; identical inputs give zero loss.
    let wave_only = SeparationLoss::new(&LossConfig {
        multi_stft_resolution_loss_weight: 0.0,
        ..cfg
    })?;
    let p = wave_only.compute(&est, &tgt)?;
    assert!(close(p.total.to_scalar::<f64>()?, wave));
    let z = loss.compute(&est, &est)?;
    assert_eq!(z.total.to_scalar::<f64>()?, 0.0);
    // Mismatched shapes and too-short signals are errors, not panics.
    assert!(loss.compute(&est, &tgt.narrow(3, 0, 39)?).is_err());
    let short = Tensor::zeros((1, 4), candle_core::DType::F64, &dev)?;
    assert!(loss.compute(&short, &short).is_err());
    Ok(())
}

/// L1, MSE and multi-STFT per source by the definitions, then their weighted means over
/// sources and the weighted sum of the parts.
#[test]
fn model_loss_weighted_sum_and_source_weights_match_direct_computation() -> R<()> {
    let sources = ["bass".to_string(), "vocals".to_string()];
    let cfg = LossConfig {
        l1_weight: 0.3,
        mse_weight: 2.0,
        multi_stft_resolution_loss_weight: 0.5,
        multi_stft_resolutions_window_sizes: vec![16],
        multi_stft_hop_size: 5,
        multi_stft_min_n_fft: 12,
        source_weights: [("vocals".to_string(), 3.0)].into_iter().collect(),
    };
    let loss = SeparationLoss::for_sources(&cfg, &sources)?;
    let est = model_util::normal(&[1, 2, 2, 40], 1.0, 3)?;
    let tgt = model_util::normal(&[1, 2, 2, 40], 1.0, 4)?;
    let parts = loss.compute(&est, &tgt)?;

    let e = est.reshape((4, 40))?.to_vec2::<f64>()?;
    let t = tgt.reshape((4, 40))?.to_vec2::<f64>()?;
    // Rows 0, 1: bass (weight 1); rows 2, 3: vocals (weight 3).
    let per_source = |f: &dyn Fn(&[f64], &[f64]) -> f64| -> f64 {
        let s = |r: std::ops::Range<usize>| r.map(|i| f(&e[i], &t[i])).sum::<f64>() / 2.0;
        (1.0 * s(0..2) + 3.0 * s(2..4)) / 4.0
    };
    let l1 = per_source(&|a, b| a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f64>() / 40.0);
    let mse = per_source(&|a, b| a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>() / 40.0);
    let multi = per_source(&|a, b| {
        let (sa, sb) = (naive_stft(a, 16, 5, 16), naive_stft(b, 16, 5, 16));
        let n = 2 * sa.len();
        sa.into_iter()
            .zip(sb)
            .map(|((ar, ai), (br, bi))| (ar - br).abs() + (ai - bi).abs())
            .sum::<f64>()
            / n as f64
    });
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-10 * b.abs().max(1.0);
    let got = |t: &Tensor| t.to_scalar::<f64>();
    assert!(
        close(got(&parts.waveform)?, l1),
        "{} vs {l1}",
        got(&parts.waveform)?
    );
    assert!(
        close(got(&parts.mse)?, mse),
        "{} vs {mse}",
        got(&parts.mse)?
    );
    assert!(close(got(&parts.multi_stft)?, multi));
    let total = 0.3 * l1 + 2.0 * mse + 0.5 * multi;
    assert!(
        close(got(&parts.total)?, total),
        "{} vs {total}",
        got(&parts.total)?
    );

    // MSE alone: the total is the MSE.
    let mse_only = SeparationLoss::for_sources(
        &LossConfig {
            l1_weight: 0.0,
            mse_weight: 1.0,
            multi_stft_resolution_loss_weight: 0.0,
            ..cfg.clone()
        },
        &sources,
    )?;
    assert!(close(got(&mse_only.compute(&est, &tgt)?.total)?, mse));
    // Weights for an unknown source, or none positive, are configuration errors.
    let bad = LossConfig {
        source_weights: [("piano".to_string(), 1.0)].into_iter().collect(),
        ..cfg.clone()
    };
    assert!(SeparationLoss::for_sources(&bad, &sources).is_err());
    let zero = LossConfig {
        source_weights: [("bass".to_string(), 0.0), ("vocals".to_string(), 0.0)]
            .into_iter()
            .collect(),
        ..cfg
    };
    assert!(SeparationLoss::for_sources(&zero, &sources).is_err());
    Ok(())
}
