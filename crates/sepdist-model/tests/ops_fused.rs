//! The fused ops (RMSNorm, QKV + RoPE, packed FlashAttention, output projection + residual,
//! the FFN's linear layers) against their compositions of candle ops: forward within 1e-6
//! relative, gradients equal to the composition's and to finite differences; and a whole
//! transformer layer of the separator against the layer composed as before the fusion.

mod ops_util;

use candle_core::{D, DType, Device, Result, Tensor, Var};
use ops_util::{fd_check, max_abs, max_abs_diff, uniform};
use sepdist_config::{Bands, ModelConfig};
use sepdist_model::ops::attn_proj::{out_proj_residual_composed, qkv_rope_composed};
use sepdist_model::ops::ffn::{gelu_linear_bias_composed, linear_bias_composed};
use sepdist_model::ops::norm::rms_norm_composed;
use sepdist_model::ops::{
    Rope, SeqLayout, flash_attention, flash_attention_packed, gelu_linear_bias, linear_bias,
    out_proj_residual, qkv_rope, rms_norm, rms_norm_groups,
};
use sepdist_model::{AttentionKind, RMS_EPS, ROPE_BASE, Separator};

/// Output and the gradients of `⟨r, f(inputs)⟩` with respect to every input.
fn value_and_grads(
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    seed: u64,
) -> Result<Vec<Tensor>> {
    let vars: Vec<Var> = inputs.iter().map(Var::from_tensor).collect::<Result<_>>()?;
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts)?;
    let r = uniform(y.dims(), seed, y.dtype())?;
    let grads = (&y * &r)?.sum_all()?.backward()?;
    let mut out = vec![y.detach()];
    for v in &vars {
        out.push(
            grads
                .get(v.as_tensor())
                .cloned()
                .ok_or_else(|| candle_core::Error::Msg("missing gradient".into()))?,
        );
    }
    Ok(out)
}

/// Max |a − e| / max(|e|, 1e-30) over the output and every gradient.
fn rel_errors(fused: &[Tensor], composed: &[Tensor]) -> Result<Vec<f64>> {
    fused
        .iter()
        .zip(composed)
        .map(|(a, e)| {
            assert_eq!(a.dims(), e.dims());
            Ok(max_abs_diff(a, e)? / max_abs(e)?.max(1e-30))
        })
        .collect()
}

/// The fused `f` and the composed `g` agree in value and gradients, in f32 and f64.
fn check_equal(
    what: &str,
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    g: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    shapes: &[&[usize]],
) -> Result<()> {
    check_equal_in(what, f, g, shapes, &[DType::F64, DType::F32])
}

fn check_equal_in(
    what: &str,
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    g: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    shapes: &[&[usize]],
    dtypes: &[DType],
) -> Result<()> {
    for &dtype in dtypes {
        let inputs: Vec<Tensor> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| uniform(s, 10 + i as u64, dtype))
            .collect::<Result<_>>()?;
        let errs = rel_errors(
            &value_and_grads(f, &inputs, 99)?,
            &value_and_grads(g, &inputs, 99)?,
        )?;
        let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
        for (i, e) in errs.iter().enumerate() {
            let part = if i == 0 {
                "value".to_string()
            } else {
                format!("gradient of input {}", i - 1)
            };
            assert!(*e < tol, "{what} {dtype:?}: {part} differs by {e:e}");
        }
        // The forward alone within 1e-6 relative even in f32.
        assert!(errs[0] < 1e-6, "{what} {dtype:?}: forward {:e}", errs[0]);
    }
    Ok(())
}

/// Gradients of `f` with respect to each input against finite differences (f64).
fn check_fd(f: &dyn Fn(&[Tensor]) -> Result<Tensor>, shapes: &[&[usize]]) -> Result<()> {
    check_fd_within(f, shapes, 1e-7)
}

fn check_fd_within(
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    shapes: &[&[usize]],
    tol: f64,
) -> Result<()> {
    let inputs: Vec<Tensor> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| uniform(s, 30 + i as u64, DType::F64))
        .collect::<Result<_>>()?;
    for i in 0..inputs.len() {
        let err = fd_check(
            |t| {
                let mut args = inputs.clone();
                args[i] = t.clone();
                f(&args)
            },
            &inputs[i],
            50 + i as u64,
        )?;
        assert!(err < tol, "input {i}: finite differences differ by {err:e}");
    }
    Ok(())
}

#[test]
fn ops_fused_rms_norm_equals_the_composition_and_finite_differences() -> Result<()> {
    let fused = |a: &[Tensor]| rms_norm(&a[0], &a[1], 1e-5);
    let composed = |a: &[Tensor]| rms_norm_composed(&a[0], &a[1], 1e-5);
    // More rows than one kernel work item (64), and a single row.
    check_equal("rms_norm", &fused, &composed, &[&[3, 70, 12], &[12]])?;
    check_equal("rms_norm", &fused, &composed, &[&[1, 5], &[5]])?;
    check_fd(&fused, &[&[2, 3, 5], &[5]])?;
    // A strided input is made contiguous first.
    let x = uniform(&[6, 4], 1, DType::F32)?.t()?;
    let g = uniform(&[6], 2, DType::F32)?;
    let err = max_abs_diff(&rms_norm(&x, &g, 1e-6)?, &rms_norm_composed(&x, &g, 1e-6)?)?;
    assert!(err < 1e-6, "{err}");
    Ok(())
}

#[test]
fn ops_fused_grouped_rms_norm_equals_norm_then_gain() -> Result<()> {
    let fused = |a: &[Tensor]| rms_norm_groups(&a[0], &a[1], 1e-6);
    let composed = |a: &[Tensor]| {
        let ones = Tensor::ones(a[0].dim(D::Minus1)?, a[0].dtype(), &Device::Cpu)?;
        rms_norm_composed(&a[0], &ones, 1e-6)?.broadcast_mul(&a[1].unsqueeze(1)?)
    };
    check_equal(
        "rms_norm_groups",
        &fused,
        &composed,
        &[&[3, 130, 8], &[3, 8]],
    )?;
    check_fd(&fused, &[&[2, 3, 4], &[2, 4]])?;
    assert!(
        rms_norm_groups(
            &uniform(&[2, 3, 4], 1, DType::F32)?,
            &uniform(&[3, 4], 1, DType::F32)?,
            1e-6
        )
        .is_err()
    );
    Ok(())
}

#[test]
fn ops_fused_qkv_rope_equals_the_composition_and_finite_differences() -> Result<()> {
    let (heads, dh, d) = (2, 4, 6);
    for seq in ops_util::layouts() {
        for dtype in [DType::F64, DType::F32] {
            let rope = Rope::new(8, dh, 10_000.0, &Device::Cpu, dtype)?;
            let fused = |a: &[Tensor]| qkv_rope(&a[0], &a[1], &rope, seq, heads);
            let composed = |a: &[Tensor]| qkv_rope_composed(&a[0], &a[1], &rope, seq, heads);
            let rows: &[usize] = &[seq.outer, seq.len, seq.inner, d];
            let shapes: [&[usize]; 2] = [rows, &[3 * heads * dh, d]];
            check_equal_in("qkv_rope", &fused, &composed, &shapes, &[dtype])?;
            if dtype == DType::F64 {
                check_fd(&fused, &[rows, &[3 * heads * dh, d]])?;
            }
        }
    }
    let rope = Rope::new(4, 4, 10_000.0, &Device::Cpu, DType::F32)?;
    let long = SeqLayout {
        outer: 1,
        len: 5,
        inner: 1,
    };
    let x = uniform(&[5, 6], 1, DType::F32)?;
    let w = uniform(&[24, 6], 2, DType::F32)?;
    assert!(
        qkv_rope(&x, &w, &rope, long, 2).is_err(),
        "longer than the tables"
    );
    assert!(
        qkv_rope(&x, &w, &rope, long, 3).is_err(),
        "wrong head count"
    );
    Ok(())
}

#[test]
fn ops_fused_packed_flash_equals_flash_on_the_parts() -> Result<()> {
    let (b, h, t, dh) = (2, 3, 70, 8);
    let scale = 0.4;
    let fused = |a: &[Tensor]| flash_attention_packed(&a[0], scale);
    let parts = |a: &[Tensor]| {
        let (q, k, v) = (a[0].get(0)?, a[0].get(1)?, a[0].get(2)?);
        let o = flash_attention(&q, &k, &v, scale)?;
        let scores = (q.matmul(&k.t()?)? * scale)?;
        let lse = sepdist_model::ops::logsumexp_last_dim(&scores)?;
        Tensor::cat(&[&o, &lse], 3)
    };
    check_equal(
        "flash_attention_packed",
        &fused,
        &parts,
        &[&[3, b, h, t, dh]],
    )?;
    Ok(())
}

#[test]
fn ops_fused_out_proj_residual_equals_the_composition_and_finite_differences() -> Result<()> {
    let (heads, dh, d) = (2, 4, 6);
    for seq in ops_util::layouts() {
        for extra in [0, 1] {
            let fused = |a: &[Tensor]| out_proj_residual(&a[0], &a[1], &a[2], seq, dh);
            let composed = |a: &[Tensor]| out_proj_residual_composed(&a[0], &a[1], &a[2], seq, dh);
            let fo: &[usize] = &[seq.sequences(), heads, seq.len, dh + extra];
            let x: &[usize] = &[seq.outer, seq.len, seq.inner, d];
            check_equal(
                "out_proj_residual",
                &fused,
                &composed,
                &[fo, &[d, heads * dh], x],
            )?;
            check_fd(&fused, &[fo, &[d, heads * dh], x])?;
        }
    }
    Ok(())
}

#[test]
fn ops_fused_linear_layers_equal_the_composition_and_finite_differences() -> Result<()> {
    let lin = |a: &[Tensor]| linear_bias(&a[0], &a[1], &a[2]);
    let lin_c = |a: &[Tensor]| linear_bias_composed(&a[0], &a[1], &a[2]);
    let gelu = |a: &[Tensor]| gelu_linear_bias(&(&a[0] * 2.0)?, &a[1], &a[2]);
    let gelu_c = |a: &[Tensor]| gelu_linear_bias_composed(&(&a[0] * 2.0)?, &a[1], &a[2]);
    let shapes: [&[usize]; 3] = [&[2, 33, 7], &[5, 7], &[5]];
    check_equal("linear_bias", &lin, &lin_c, &shapes)?;
    check_equal("gelu_linear_bias", &gelu, &gelu_c, &shapes)?;
    let small: [&[usize]; 3] = [&[3, 4], &[2, 4], &[2]];
    check_fd(&lin, &small)?;
    // candle's GELU backward (kept, so that fused and composed gradients agree) uses 0.398942
    // for 1/√(2π) = 0.39894228...: a relative error of 7e-7 in one term.
    check_fd_within(&gelu, &small, 1e-6)?;
    let x = uniform(&[3, 4], 1, DType::F32)?;
    assert!(
        linear_bias(
            &x,
            &uniform(&[2, 5], 1, DType::F32)?,
            &uniform(&[2], 1, DType::F32)?
        )
        .is_err()
    );
    Ok(())
}

fn tiny() -> ModelConfig {
    ModelConfig {
        n_fft: 64,
        hop_length: 16,
        bands: Bands::Widths(vec![2, 2, 4, 2, 4, 8, 11]),
        n_layers: 1,
        emb_dim: 8,
        n_heads: 2,
        ffn_hidden_dim: [16, 12],
        mask_hidden_dim: Some(10),
        mask_depth: 2,
    }
}

/// The transformer layer as it was composed before the fused ops: `xs` `[N, L, D]`.
#[allow(clippy::too_many_arguments)]
fn composed_layer(
    p: &std::collections::BTreeMap<String, Tensor>,
    prefix: &str,
    xs: &Tensor,
    rope: &Rope,
    heads: usize,
) -> Result<Tensor> {
    let w = |n: &str| p[&format!("{prefix}.{n}")].clone();
    let (n, len, d) = xs.dims3()?;
    let dh = d / heads;
    let hn = rms_norm_composed(xs, &w("attn.norm.gamma"), RMS_EPS)?.reshape((n * len, d))?;
    let qkv = hn
        .matmul(&w("attn.qkv.weight").t()?)?
        .reshape((n, len, 3, heads, dh))?;
    let qkv = qkv.permute((2, 0, 3, 1, 4))?;
    let q = rope.apply(&qkv.get(0)?.contiguous()?)?;
    let k = rope.apply(&qkv.get(1)?.contiguous()?)?;
    let v = qkv.get(2)?.contiguous()?;
    let o = sepdist_model::ops::reference_attention(&q, &k, &v, (dh as f64).powf(-0.5))?;
    let o = o.transpose(1, 2)?.contiguous()?.reshape((n * len, d))?;
    let xs = (xs + o.matmul(&w("attn.out.weight").t()?)?.reshape((n, len, d))?)?;
    let hn = rms_norm_composed(&xs, &w("ff.norm.gamma"), RMS_EPS)?.reshape((n * len, d))?;
    let hid = hn
        .matmul(&w("ff.fc1.weight").t()?)?
        .broadcast_add(&w("ff.fc1.bias"))?
        .gelu_erf()?;
    let out = hid
        .matmul(&w("ff.fc2.weight").t()?)?
        .broadcast_add(&w("ff.fc2.bias"))?
        .reshape((n, len, d))?;
    xs + out
}

#[test]
fn ops_fused_transformer_layers_equal_the_composed_layers()
-> std::result::Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let sep = Separator::new(&tiny(), 2)?;
    let params = sep.init_params(5, &dev, DType::F64)?;
    let mix = (uniform(&[2, 2, 200], 3, DType::F64)? * 0.5)?;
    for kind in [AttentionKind::Flash, AttentionKind::Reference] {
        let ctx = sep.prepare_context_with(&mix, kind)?;
        let split = &sep.blocks()[0];
        let x = split.forward(&sep.block_params(split, &params)?, ctx.first_input(), &ctx)?;
        let (b, t, k, d) = x.dims4()?;
        for block in &sep.blocks()[1..3] {
            let y = block.forward(&sep.block_params(block, &params)?, &x, &ctx)?;
            let time = block.name().ends_with("time");
            let expected = if time {
                let rope = Rope::new(t, d / 2, ROPE_BASE, &dev, DType::F64)?;
                let xs = x.transpose(1, 2)?.contiguous()?.reshape((b * k, t, d))?;
                composed_layer(&params, block.name(), &xs, &rope, 2)?
                    .reshape((b, k, t, d))?
                    .transpose(1, 2)?
            } else {
                let rope = Rope::new(k, d / 2, ROPE_BASE, &dev, DType::F64)?;
                let xs = x.reshape((b * t, k, d))?;
                composed_layer(&params, block.name(), &xs, &rope, 2)?.reshape((b, t, k, d))?
            };
            let err = max_abs_diff(&y, &expected)? / max_abs(&expected)?;
            assert!(err < 1e-12, "{} ({kind:?}): {err:e}", block.name());
        }
    }
    Ok(())
}

#[test]
fn ops_fused_glu_equals_the_composition_and_finite_differences() -> Result<()> {
    use sepdist_model::ops::glu::{glu_tanh, glu_tanh_composed};
    let fused = |a: &[Tensor]| glu_tanh(&(&a[0] * 3.0)?, 5);
    let composed = |a: &[Tensor]| glu_tanh_composed(&(&a[0] * 3.0)?, 5);
    check_equal("glu", &fused, &composed, &[&[3, 70, 10]])?;
    check_fd(&fused, &[&[2, 3, 10]])?;
    assert!(glu_tanh(&uniform(&[2, 9], 1, DType::F32)?, 5).is_err());
    Ok(())
}

#[test]
fn ops_fused_masked_istft_equals_the_composition_and_finite_differences() -> Result<()> {
    use sepdist_model::ops::Stft;
    use sepdist_model::ops::stft::inverse_masked_composed;
    let stft = Stft::new(16, 4, 16)?;
    let (b, s, f, t, n) = (2, 3, 9, 6, 21);
    // The mask as the head makes it, a strided view: `[B, S, 2, T, F, 2]` with T and F
    // swapped gives `[B, S, 2, F, T, 2]`.
    let strided = |m: &Tensor| m.transpose(3, 4);
    let fused = |a: &[Tensor]| stft.inverse_masked(&strided(&a[0])?, &a[1], n);
    let composed = |a: &[Tensor]| inverse_masked_composed(&stft, &strided(&a[0])?, &a[1], n);
    let shapes: [&[usize]; 2] = [&[b, s, 2, t, f, 2], &[b, 2, f, t, 2]];
    check_equal("inverse_masked", &fused, &composed, &shapes)?;
    check_fd(&fused, &shapes)?;
    let mask = uniform(&[b, s, 2, f, t, 2], 1, DType::F32)?;
    assert!(
        stft.inverse_masked(&mask, &uniform(&[b, 2, f, t + 1, 2], 1, DType::F32)?, n)
            .is_err()
    );
    Ok(())
}

#[test]
fn ops_fused_multi_stft_l1_equals_the_composition_and_finite_differences() -> Result<()> {
    use sepdist_model::ops::Stft;
    use sepdist_model::ops::stft_l1::{multi_stft_l1, multi_stft_l1_composed};
    // A window shorter than its FFT (zero-padded, centred), hops that do not divide the
    // length, and two signals of two channels: the loss' shapes, small.
    let stfts = [
        Stft::new(16, 5, 16)?,
        Stft::new(12, 5, 8)?,
        Stft::new(8, 3, 8)?,
    ];
    let fused = |a: &[Tensor]| multi_stft_l1(&a[0], &stfts);
    let composed = |a: &[Tensor]| multi_stft_l1_composed(&a[0], &stfts);
    check_equal("multi_stft_l1", &fused, &composed, &[&[2, 2, 41]])?;
    check_fd(&fused, &[&[1, 2, 23]])?;
    // A strided input is read in its logical order.
    let x = uniform(&[3, 2, 30], 7, DType::F64)?;
    let strided = x.transpose(0, 1)?;
    let (a, b) = (
        multi_stft_l1(&strided, &stfts)?.to_scalar::<f64>()?,
        multi_stft_l1_composed(&strided, &stfts)?.to_scalar::<f64>()?,
    );
    assert!((a - b).abs() <= 1e-12 * b.abs(), "{a} vs {b}");
    // No resolutions: zero; a signal too short for reflect padding: an error.
    assert_eq!(multi_stft_l1(&x, &[])?.to_scalar::<f64>()?, 0.0);
    assert!(multi_stft_l1(&x.narrow(2, 0, 8)?, &stfts).is_err());
    Ok(())
}

#[test]
fn ops_fused_grouped_linear_equals_the_composition_and_finite_differences() -> Result<()> {
    use sepdist_model::ops::grouped_linear::{grouped_linear, grouped_linear_composed};
    let shapes: [&[usize]; 3] = [&[3, 70, 6], &[3, 6, 5], &[3, 5]];
    let small: [&[usize]; 3] = [&[2, 3, 4], &[2, 4, 3], &[2, 3]];
    for tanh in [false, true] {
        // Scaled so that tanh leaves its linear range.
        let fused = |a: &[Tensor]| grouped_linear(&(&a[0] * 2.0)?, &a[1], &a[2], tanh);
        let composed = |a: &[Tensor]| grouped_linear_composed(&(&a[0] * 2.0)?, &a[1], &a[2], tanh);
        check_equal("grouped_linear", &fused, &composed, &shapes)?;
        check_fd(&fused, &small)?;
    }
    // A strided input (the mask estimators' first layer reads a narrow) is read in order.
    let x = uniform(&[5, 3, 6], 3, DType::F64)?.transpose(0, 1)?;
    let (w, b) = (
        uniform(&[3, 6, 4], 4, DType::F64)?,
        uniform(&[3, 4], 5, DType::F64)?,
    );
    let err = max_abs_diff(
        &grouped_linear(&x, &w, &b, true)?,
        &grouped_linear_composed(&x, &w, &b, true)?,
    )?;
    assert!(err < 1e-15, "{err:e}");
    assert!(grouped_linear(&x, &w, &b.narrow(1, 0, 3)?, false).is_err());
    Ok(())
}
