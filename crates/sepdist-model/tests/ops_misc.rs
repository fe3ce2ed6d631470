//! RMSNorm, softmax and RoPE: finite-difference gradients and reference formulas.

mod ops_util;

use candle_core::{DType, Device, Result, Tensor};
use ops_util::{fd_check, max_abs_diff, uniform};
use sepdist_model::ops::{Rope, rms_norm, softmax_last_dim};

#[test]
fn ops_rms_norm_matches_formula() -> Result<()> {
    let x = uniform(&[3, 4, 6], 1, DType::F64)?;
    let gamma = uniform(&[6], 2, DType::F64)?;
    let y = rms_norm(&x, &gamma, 1e-5)?;
    let xs = x.to_vec3::<f64>()?;
    let gs = gamma.to_vec1::<f64>()?;
    let ys = y.to_vec3::<f64>()?;
    for (xa, ya) in xs.iter().zip(&ys) {
        for (row, yrow) in xa.iter().zip(ya) {
            let ms = row.iter().map(|v| v * v).sum::<f64>() / row.len() as f64;
            for ((v, g), out) in row.iter().zip(&gs).zip(yrow) {
                assert!((v / (ms + 1e-5).sqrt() * g - out).abs() < 1e-12);
            }
        }
    }
    assert!(rms_norm(&x, &uniform(&[5], 2, DType::F64)?, 1e-5).is_err());
    Ok(())
}

#[test]
fn ops_rms_norm_gradients_match_finite_differences() -> Result<()> {
    let x = uniform(&[2, 3, 5], 3, DType::F64)?;
    let gamma = (uniform(&[5], 4, DType::F64)? + 1.5)?;
    let err = fd_check(|t| rms_norm(t, &gamma, 1e-5), &x, 5)?;
    assert!(err < 1e-7, "d/dx: {err}");
    let err = fd_check(|g| rms_norm(&x, g, 1e-5), &gamma, 6)?;
    assert!(err < 1e-7, "d/dgamma: {err}");
    Ok(())
}

#[test]
fn ops_softmax_matches_formula_and_is_stable() -> Result<()> {
    let x = (uniform(&[4, 7], 1, DType::F64)? * 5.0)?;
    let y = softmax_last_dim(&x)?;
    for (row, yrow) in x.to_vec2::<f64>()?.iter().zip(y.to_vec2::<f64>()?) {
        let z: f64 = row.iter().map(|v| v.exp()).sum();
        for (v, out) in row.iter().zip(yrow) {
            assert!((v.exp() / z - out).abs() < 1e-12);
        }
    }
    // Huge logits: a naive exp would overflow to inf/NaN.
    let big = Tensor::new(&[[1000f32, 1001., 999.]], &Device::Cpu)?;
    let p = softmax_last_dim(&big)?.to_vec2::<f32>()?;
    assert!(p[0].iter().all(|v| v.is_finite()));
    assert!((p[0].iter().sum::<f32>() - 1.0).abs() < 1e-6);
    Ok(())
}

#[test]
fn ops_softmax_gradient_matches_finite_differences() -> Result<()> {
    let x = (uniform(&[3, 6], 7, DType::F64)? * 3.0)?;
    let err = fd_check(softmax_last_dim, &x, 8)?;
    assert!(err < 1e-7, "{err}");
    Ok(())
}

#[test]
fn ops_rope_matches_direct_formula() -> Result<()> {
    let (b, h, t, d) = (2, 3, 10, 8);
    let rope = Rope::new(16, d, 10000.0, &Device::Cpu, DType::F64)?;
    let x = uniform(&[b, h, t, d], 1, DType::F64)?;
    let y = rope.apply(&x)?;
    let xs = x.flatten_to(1)?.to_vec3::<f64>()?;
    let ys = y.flatten_to(1)?.to_vec3::<f64>()?;
    for (xa, ya) in xs.iter().zip(&ys) {
        for (pos, (row, yrow)) in xa.iter().zip(ya).enumerate() {
            for i in 0..d / 2 {
                let theta = pos as f64 * 10000f64.powf(-2.0 * i as f64 / d as f64);
                let (a, c) = (row[2 * i], row[2 * i + 1]);
                let e0 = a * theta.cos() - c * theta.sin();
                let e1 = c * theta.cos() + a * theta.sin();
                assert!((yrow[2 * i] - e0).abs() < 1e-12);
                assert!((yrow[2 * i + 1] - e1).abs() < 1e-12);
            }
        }
    }
    Ok(())
}

#[test]
fn ops_rope_relative_position_property() -> Result<()> {
    // ⟨rope(q)_i, rope(k)_j⟩ depends on i − j only: put the same q at every position and the
    // same k at every position, then compare all pairs with equal offset.
    let (t, d) = (12, 16);
    let rope = Rope::new(t, d, 10000.0, &Device::Cpu, DType::F64)?;
    let q = uniform(&[1, 1, 1, d], 1, DType::F64)?.repeat((1, 1, t, 1))?;
    let k = uniform(&[1, 1, 1, d], 2, DType::F64)?.repeat((1, 1, t, 1))?;
    let dots = rope
        .apply(&q)?
        .matmul(&rope.apply(&k)?.t()?)?
        .flatten_to(1)?
        .get(0)?
        .to_vec2::<f64>()?;
    for i in 0..t {
        for j in 0..t {
            if i >= 1 && j >= 1 {
                assert!((dots[i][j] - dots[i - 1][j - 1]).abs() < 1e-10, "({i},{j})");
            }
        }
    }
    // And it is not trivially constant.
    assert!((dots[0][0] - dots[5][0]).abs() > 1e-6);
    Ok(())
}

#[test]
fn ops_rope_gradient_matches_finite_differences() -> Result<()> {
    let rope = Rope::new(8, 6, 10000.0, &Device::Cpu, DType::F64)?;
    let x = uniform(&[1, 2, 5, 6], 3, DType::F64)?;
    let err = fd_check(|t| rope.apply(t), &x, 4)?;
    assert!(err < 1e-7, "{err}");
    Ok(())
}

#[test]
fn ops_rope_rejects_bad_arguments() -> Result<()> {
    assert!(Rope::new(8, 7, 10000.0, &Device::Cpu, DType::F32).is_err());
    let rope = Rope::new(4, 8, 10000.0, &Device::Cpu, DType::F32)?;
    let long = Tensor::zeros((1, 1, 5, 8), DType::F32, &Device::Cpu)?;
    assert!(rope.apply(&long).is_err());
    // f32 tables agree with f64 ones.
    let x = uniform(&[1, 1, 4, 8], 5, DType::F32)?;
    let r64 = Rope::new(4, 8, 10000.0, &Device::Cpu, DType::F64)?;
    let err = max_abs_diff(&rope.apply(&x)?, &r64.apply(&x.to_dtype(DType::F64)?)?)?;
    assert!(err < 1e-6);
    Ok(())
}
