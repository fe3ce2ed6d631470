//! Every op wrapper with bf16 inputs on the CPU (mixed precision): it runs (the fused kernels
//! are f32/f64, so it takes its composed twin, or computes in f32 where autocast would),
//! returns bf16, and agrees with the f32 result of the same (bf16-rounded) inputs within bf16's
//! tolerance, in value and in the gradient of every input: max |bf16 − f32| / max |f32| ≤ 1e-2.

mod ops_util;

use candle_core::{DType, Result, Tensor, Var};
use ops_util::{max_abs, max_abs_diff, uniform};
use sepdist_model::ops::{
    Rope, Stft, flash_attention, flash_attention_packed, gelu_linear_bias, glu_tanh,
    grouped_linear, linear_bias, logsumexp_last_dim, multi_stft_l1, out_proj_residual, qkv_rope,
    reference_attention, rms_norm, rms_norm_groups, softmax_last_dim,
};

/// bf16's tolerance: a few roundings of 2⁻⁹ relative each, with sums over rows.
const TOL: f64 = 1e-2;

type Op<'a> = &'a dyn Fn(&[Tensor]) -> Result<Tensor>;

/// Output and the gradients of `⟨r, f(inputs)⟩` for every input (each a `Var`).
fn value_and_grads(f: Op, inputs: &[Tensor], r_seed: u64) -> Result<Vec<Tensor>> {
    let vars: Vec<Var> = inputs.iter().map(Var::from_tensor).collect::<Result<_>>()?;
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts)?;
    // The same projection in both precisions: bf16-rounded values.
    let r = uniform(y.dims(), r_seed, DType::BF16)?.to_dtype(y.dtype())?;
    let grads = (&y * &r)?.sum_all()?.backward()?;
    let mut out = vec![y.detach()];
    for (i, v) in vars.iter().enumerate() {
        let g = grads
            .get(v.as_tensor())
            .ok_or_else(|| candle_core::Error::Msg(format!("no gradient for input {i}")))?;
        out.push(g.clone());
    }
    Ok(out)
}

/// `f` on bf16 inputs against `f` on the same values in f32: seeded uniform inputs of `shapes`
/// (times `scales`, to push softmax and tanh off their linear ranges), rounded to bf16 first.
/// Returns the worst relative difference.
fn check(what: &str, f: Op, shapes: &[&[usize]], scales: &[f64]) -> Result<f64> {
    let bf16: Vec<Tensor> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let x =
                (uniform(s, 20 + i as u64, DType::F32)? * scales.get(i).copied().unwrap_or(1.0))?;
            x.to_dtype(DType::BF16)
        })
        .collect::<Result<_>>()?;
    let f32s: Vec<Tensor> = bf16
        .iter()
        .map(|t| t.to_dtype(DType::F32))
        .collect::<Result<_>>()?;
    let expected = value_and_grads(f, &f32s, 7)?;
    let got = value_and_grads(f, &bf16, 7)?;
    let mut worst: f64 = 0.0;
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        let part = if i == 0 {
            "value".to_string()
        } else {
            format!("gradient of input {}", i - 1)
        };
        assert_eq!(g.dims(), e.dims(), "{what}: {part} shape");
        assert_eq!(g.dtype(), DType::BF16, "{what}: {part} is not bf16");
        assert_eq!(e.dtype(), DType::F32, "{what}: {part} of the f32 run");
        let err = max_abs_diff(g, e)? / max_abs(e)?.max(1e-30);
        assert!(
            err <= TOL,
            "{what} {shapes:?}: {part} in bf16 differs from f32 by {err:e} (relative)"
        );
        worst = worst.max(err);
    }
    println!("{what} {shapes:?}: worst relative difference {worst:e}");
    Ok(worst)
}

#[test]
fn ops_bf16_norms_softmax_and_rope_match_f32() -> Result<()> {
    let norm = |a: &[Tensor]| rms_norm(&a[0], &a[1], 1e-6);
    check("rms_norm", &norm, &[&[3, 70, 64], &[64]], &[])?;
    let groups = |a: &[Tensor]| rms_norm_groups(&a[0], &a[1], 1e-6);
    check("rms_norm_groups", &groups, &[&[3, 130, 16], &[3, 16]], &[])?;
    let softmax = |a: &[Tensor]| softmax_last_dim(&a[0]);
    check("softmax_last_dim", &softmax, &[&[4, 70, 300]], &[5.0])?;
    let lse = |a: &[Tensor]| logsumexp_last_dim(&a[0]);
    check("logsumexp_last_dim", &lse, &[&[4, 70, 300]], &[5.0])?;
    // f32 tables (as the model builds them) rotating a bf16 input.
    let rope = |a: &[Tensor]| Rope::new(40, 8, 10_000.0, a[0].device(), DType::F32)?.apply(&a[0]);
    check("rope", &rope, &[&[2, 3, 40, 8]], &[])?;
    Ok(())
}

#[test]
fn ops_bf16_attention_and_its_projections_match_f32() -> Result<()> {
    for &(b, h, t, dh) in &[(1, 1, 1, 8), (2, 3, 70, 16)] {
        let scale = (dh as f64).powf(-0.5);
        let shape: &[usize] = &[b, h, t, dh];
        let flash = |a: &[Tensor]| flash_attention(&a[0], &a[1], &a[2], scale);
        check("flash_attention", &flash, &[shape; 3], &[3.0, 3.0, 1.0])?;
        let reference = |a: &[Tensor]| reference_attention(&a[0], &a[1], &a[2], scale);
        check(
            "reference_attention",
            &reference,
            &[shape; 3],
            &[3.0, 3.0, 1.0],
        )?;
        let packed = |a: &[Tensor]| flash_attention_packed(&a[0], scale);
        check(
            "flash_attention_packed",
            &packed,
            &[&[3, b, h, t, dh]],
            &[3.0],
        )?;
    }
    let (heads, dh, d) = (2, 8, 16);
    // The time-like and band-like layouts.
    for seq in ops_util::layouts().into_iter().take(2) {
        let qkv = |a: &[Tensor]| {
            let rope = Rope::new(8, dh, 10_000.0, a[0].device(), DType::F32)?;
            qkv_rope(&a[0], &a[1], &rope, seq, heads)
        };
        let rows: &[usize] = &[seq.outer, seq.len, seq.inner, d];
        check("qkv_rope", &qkv, &[rows, &[3 * heads * dh, d]], &[])?;
        let out = |a: &[Tensor]| out_proj_residual(&a[0], &a[1], &a[2], seq, dh);
        let fo: &[usize] = &[seq.sequences(), heads, seq.len, dh + 1];
        check(
            "out_proj_residual",
            &out,
            &[fo, &[d, heads * dh], rows],
            &[],
        )?;
    }
    Ok(())
}

#[test]
fn ops_bf16_linear_layers_and_mask_estimator_ops_match_f32() -> Result<()> {
    let shapes: [&[usize]; 3] = [&[2, 33, 24], &[40, 24], &[40]];
    let lin = |a: &[Tensor]| linear_bias(&a[0], &a[1], &a[2]);
    check("linear_bias", &lin, &shapes, &[])?;
    let gelu = |a: &[Tensor]| gelu_linear_bias(&a[0], &a[1], &a[2]);
    check("gelu_linear_bias", &gelu, &shapes, &[2.0])?;
    // A bias over 20 000 rows: its gradient is a sum that a bf16 accumulator would get wrong
    // by far more than 1e-2 (it stops growing at 2⁹ times a term).
    check(
        "linear_bias (many rows)",
        &lin,
        &[&[20_000, 8], &[4, 8], &[4]],
        &[],
    )?;
    let f = |a: &[Tensor]| grouped_linear(&a[0], &a[1], &a[2], false);
    check(
        "grouped_linear (many rows)",
        &f,
        &[&[2, 20_000, 8], &[2, 8, 4], &[2, 4]],
        &[],
    )?;
    let glu = |a: &[Tensor]| glu_tanh(&a[0], 5);
    check("glu_tanh", &glu, &[&[3, 70, 10]], &[3.0])?;
    for tanh in [false, true] {
        let f = |a: &[Tensor]| grouped_linear(&a[0], &a[1], &a[2], tanh);
        check(
            "grouped_linear",
            &f,
            &[&[3, 70, 24], &[3, 24, 20], &[3, 20]],
            &[2.0],
        )?;
    }
    Ok(())
}

#[test]
fn ops_bf16_stft_family_matches_f32() -> Result<()> {
    let (n_fft, hop, n) = (256, 64, 2048);
    let stft = Stft::new(n_fft, hop, n_fft)?;
    let fwd = |a: &[Tensor]| stft.forward(&a[0]);
    check("stft", &fwd, &[&[2, 2, n]], &[])?;
    let (f, t) = (n_fft / 2 + 1, stft.n_frames(n));
    let inv = |a: &[Tensor]| stft.inverse(&a[0], n);
    check("istft", &inv, &[&[2, 2, f, t, 2]], &[])?;
    let masked = |a: &[Tensor]| stft.inverse_masked(&a[0], &a[1], n);
    check(
        "inverse_masked",
        &masked,
        &[&[2, 3, 2, f, t, 2], &[2, 2, f, t, 2]],
        &[],
    )?;
    let resolutions = [Stft::new(256, 64, 256)?, Stft::new(128, 64, 128)?];
    let l1 = |a: &[Tensor]| multi_stft_l1(&a[0], &resolutions);
    check("multi_stft_l1", &l1, &[&[2, 2, n]], &[])?;
    Ok(())
}
