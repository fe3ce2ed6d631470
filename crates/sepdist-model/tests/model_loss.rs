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
