//! STFT / iSTFT: naive DFT equality, round trip, finite-difference gradients.

mod ops_util;

use candle_core::{DType, Device, Result, Tensor};
use ops_util::{fd_check, max_abs, max_abs_diff, uniform};
use sepdist_model::ops::Stft;

/// Direct-sum STFT in f64 with torch.stft(center=True, pad_mode="reflect") conventions.
fn naive_stft(x: &[f64], n_fft: usize, hop: usize, window: &[f64]) -> Vec<f64> {
    let n = x.len();
    let pad = n_fft / 2;
    let padded: Vec<f64> = (0..n + 2 * pad)
        .map(|m| {
            let i = m as isize - pad as isize;
            let j = if i < 0 {
                -i
            } else if i >= n as isize {
                2 * (n as isize - 1) - i
            } else {
                i
            };
            x[j as usize]
        })
        .collect();
    let frames = n / hop + 1;
    let bins = n_fft / 2 + 1;
    let mut out = vec![0.0; bins * frames * 2];
    for f in 0..bins {
        for t in 0..frames {
            let (mut re, mut im) = (0.0, 0.0);
            for k in 0..n_fft {
                let a = -2.0 * std::f64::consts::PI * (f * k) as f64 / n_fft as f64;
                let s = window[k] * padded[t * hop + k];
                re += s * a.cos();
                im += s * a.sin();
            }
            out[(f * frames + t) * 2] = re;
            out[(f * frames + t) * 2 + 1] = im;
        }
    }
    out
}

#[test]
fn ops_stft_matches_naive_dft() -> Result<()> {
    for &(n_fft, hop, win, n) in &[(64, 16, 64, 300), (32, 5, 20, 101), (16, 4, 15, 17)] {
        let stft = Stft::new(n_fft, hop, win)?;
        let x = uniform(&[2, 3, n], 7, DType::F64)?;
        for dtype in [DType::F64, DType::F32] {
            let spec = stft.forward(&x.to_dtype(dtype)?)?;
            assert_eq!(spec.dims(), &[2, 3, n_fft / 2 + 1, n / hop + 1, 2]);
            let mut expected = Vec::new();
            for row in x.flatten_to(1)?.to_vec2::<f64>()? {
                expected.extend(naive_stft(&row, n_fft, hop, stft.window()));
            }
            let expected = Tensor::from_vec(expected, spec.dims(), &Device::Cpu)?;
            let rel = max_abs_diff(&spec, &expected)? / max_abs(&expected)?;
            let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
            assert!(rel < tol, "{dtype:?} n_fft {n_fft}: relative error {rel}");
        }
    }
    Ok(())
}

#[test]
fn ops_stft_accepts_any_leading_dims() -> Result<()> {
    let stft = Stft::new(32, 8, 32)?;
    let x = uniform(&[2, 3, 100], 21, DType::F32)?;
    let batched = stft.forward(&x)?;
    // A bare signal [N] gives [F, T, 2] and equals the matching row of the batch.
    let single = stft.forward(&x.get(1)?.get(2)?)?;
    assert_eq!(single.dims(), &[17, 13, 2]);
    assert!(max_abs_diff(&single, &batched.get(1)?.get(2)?)? < 1e-6);
    let back = stft.inverse(&single, 100)?;
    assert_eq!(back.dims(), &[100]);
    Ok(())
}

#[test]
fn ops_stft_window_is_periodic_hann_centred() -> Result<()> {
    let stft = Stft::new(8, 2, 4)?;
    // periodic Hann(4) = [0, 0.5, 1, 0.5], centred in 8 with 2 zeros on each side.
    let expected = [0.0, 0.0, 0.0, 0.5, 1.0, 0.5, 0.0, 0.0];
    for (w, e) in stft.window().iter().zip(expected) {
        assert!((w - e).abs() < 1e-12, "{:?}", stft.window());
    }
    Ok(())
}

#[test]
fn ops_stft_round_trip_f32() -> Result<()> {
    // (n_fft, hop, win_length, length): multiples of the hop and not, win_length < n_fft,
    // and the loss' long window with hop 147.
    let cases = [
        (64, 16, 64, 1024),
        (64, 16, 64, 1000),
        (64, 16, 48, 999),
        (128, 32, 100, 777),
        (4096, 147, 4096, 8000),
    ];
    for (i, &(n_fft, hop, win, n)) in cases.iter().enumerate() {
        let stft = Stft::new(n_fft, hop, win)?;
        let x = uniform(&[2, 2, n], 11 + i as u64, DType::F32)?;
        let spec = stft.forward(&x)?;
        let y = stft.inverse(&spec, n)?;
        assert_eq!(y.dims(), x.dims());
        let err = max_abs_diff(&x, &y)?;
        assert!(err < 1e-5, "case {i}: round-trip error {err}");
    }
    Ok(())
}

#[test]
fn ops_stft_inverse_rejects_bad_shapes() -> Result<()> {
    let stft = Stft::new(16, 4, 16)?;
    let bad = Tensor::zeros((3, 5, 2), DType::F32, &Device::Cpu)?;
    assert!(stft.inverse(&bad, 10).is_err());
    let short = Tensor::zeros((2, 8), DType::F32, &Device::Cpu)?;
    assert!(
        stft.forward(&short).is_err(),
        "signal not longer than n_fft/2"
    );
    assert!(Stft::new(15, 4, 15).is_err());
    assert!(Stft::new(16, 0, 16).is_err());
    assert!(Stft::new(16, 4, 17).is_err());
    // 16-bit floats are transformed in f32 (and returned in their dtype); integers have no
    // kernel.
    let half = Tensor::zeros((2, 40), DType::F16, &Device::Cpu)?;
    assert_eq!(stft.forward(&half)?.dtype(), DType::F16);
    let ints = Tensor::zeros((2, 40), DType::U32, &Device::Cpu)?;
    assert!(stft.forward(&ints).is_err(), "u32 has no kernel");
    Ok(())
}

#[test]
fn ops_stft_gradient_matches_finite_differences() -> Result<()> {
    for &(n_fft, hop, win, n) in &[(8, 2, 8, 13), (16, 3, 11, 20), (8, 4, 8, 16)] {
        let stft = Stft::new(n_fft, hop, win)?;
        let x = uniform(&[2, n], 3, DType::F64)?;
        let err = fd_check(|t| stft.forward(t), &x, 5)?;
        assert!(err < 1e-7, "stft n_fft {n_fft} hop {hop}: fd error {err}");
    }
    Ok(())
}

#[test]
fn ops_stft_inverse_gradient_matches_finite_differences() -> Result<()> {
    for &(n_fft, hop, win, n) in &[(8, 2, 8, 13), (16, 3, 11, 20), (8, 2, 6, 9)] {
        let stft = Stft::new(n_fft, hop, win)?;
        let frames = stft.n_frames(n);
        let spec = uniform(&[2, n_fft / 2 + 1, frames, 2], 9, DType::F64)?;
        let err = fd_check(|t| stft.inverse(t, n), &spec, 4)?;
        assert!(err < 1e-7, "istft n_fft {n_fft} hop {hop}: fd error {err}");
        if win == n_fft {
            // A length past what the frames cover: the tail is zero and gets no gradient.
            // (With a zero-padded window the envelope vanishes there and it is an error.)
            let err = fd_check(|t| stft.inverse(t, n + 3 * n_fft), &spec, 6)?;
            assert!(err < 1e-7, "istft (padded tail): fd error {err}");
        }
    }
    Ok(())
}

#[test]
fn ops_stft_second_order_composition() -> Result<()> {
    // iSTFT ∘ STFT is the identity, so its gradient is the projection itself.
    let stft = Stft::new(16, 4, 16)?;
    let x = uniform(&[1, 50], 2, DType::F64)?;
    let err = fd_check(|t| stft.inverse(&stft.forward(t)?, 50), &x, 8)?;
    assert!(err < 1e-7, "fd error {err}");
    Ok(())
}

/// `⟨A x, y⟩ = ⟨x, Aᵀ y⟩` at realistic sizes (several overlap-add chunks, the loss' long
/// window with hop 147), where finite differences coordinate by coordinate would be slow.
#[test]
fn ops_stft_adjoint_identity_at_realistic_sizes() -> Result<()> {
    use candle_core::Var;
    for &(n_fft, hop, n) in &[(4096, 147, 9001), (2048, 512, 12000)] {
        let stft = Stft::new(n_fft, hop, n_fft)?;
        let x = Var::from_tensor(&uniform(&[2, n], 31, DType::F64)?)?;
        let spec = stft.forward(&x)?;
        let y = uniform(spec.dims(), 32, DType::F64)?;
        let lhs = (&spec * &y)?.sum_all()?.to_scalar::<f64>()?;
        let grads = (&spec * &y)?.sum_all()?.backward()?;
        let gx = grads
            .get(&x)
            .ok_or_else(|| candle_core::Error::Msg("no gradient".into()))?;
        let rhs = (gx * x.as_tensor())?.sum_all()?.to_scalar::<f64>()?;
        assert!(
            (lhs - rhs).abs() < 1e-9 * lhs.abs().max(1.0),
            "stft {lhs} vs {rhs}"
        );

        let s = Var::from_tensor(&y)?;
        let sig = stft.inverse(&s, n)?;
        let z = uniform(sig.dims(), 33, DType::F64)?;
        let lhs = (&sig * &z)?.sum_all()?.to_scalar::<f64>()?;
        let grads = (&sig * &z)?.sum_all()?.backward()?;
        let gs = grads
            .get(&s)
            .ok_or_else(|| candle_core::Error::Msg("no gradient".into()))?;
        // irfft ignores the imaginary parts of DC and Nyquist: zero them on the primal side.
        let f = n_fft / 2 + 1;
        let mut mask = vec![1.0f64; f * 2];
        for bin in [0, f - 1] {
            mask[bin * 2 + 1] = 0.0;
        }
        let mask = Tensor::from_vec(mask, (f, 1, 2), &Device::Cpu)?;
        let rhs = (gs * y.broadcast_mul(&mask)?)?
            .sum_all()?
            .to_scalar::<f64>()?;
        assert!(
            (lhs - rhs).abs() < 1e-9 * lhs.abs().max(1.0),
            "istft {lhs} vs {rhs}"
        );
    }
    Ok(())
}
