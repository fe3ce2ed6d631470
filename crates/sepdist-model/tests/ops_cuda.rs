//! The custom ops and the whole separator on a CUDA device against the CPU: forward values and
//! the gradients of `⟨r, f(inputs)⟩` (fp32: 1e-5 relative, max |cuda − cpu| / max |cpu|; the
//! same op in bf16 on CUDA against the CPU's fp32: 1e-2), and the model's loss and every
//! parameter's gradient (1e-4 relative).
//!
//! On the CPU the ops run their fused kernels; on CUDA they take the device path (the
//! attention's CUDA kernels, the other ops' `*_composed` twins of candle ops, a round trip
//! through the CPU for the STFT), so these tests check that path against the kernels the CPU
//! tests check. Each test prints `skipped:`
//! and passes when no CUDA device opens, unless `SEPDIST_REQUIRE_CUDA=1` (set by
//! `launch/gpu-check.sh`), which makes that a failure.
#![cfg(feature = "cuda")]

mod model_util;
mod ops_util;

use candle_core::{DType, Device, Result, Tensor, Var};
use ops_util::{max_abs, max_abs_diff, uniform};
use sepdist_config::{Bands, LossConfig, ModelConfig};
use sepdist_model::loss::SeparationLoss;
use sepdist_model::ops::{
    Rope, Stft, flash_attention, flash_attention_packed, gelu_linear_bias, glu_tanh,
    grouped_linear, linear_bias, logsumexp_last_dim, multi_stft_l1, out_proj_residual, qkv_rope,
    reference_attention, rms_norm, rms_norm_groups, softmax_last_dim,
};
use sepdist_model::{AttentionKind, Separator};
use std::collections::BTreeMap;

/// fp32 tolerance of an op, relative to the CPU result's largest magnitude.
const OP_TOL: f64 = 1e-5;
/// Tolerance of an op in bf16 on CUDA against the CPU in fp32 (the ops' bf16 bound on the CPU).
const BF16_TOL: f64 = 1e-2;
/// fp32 tolerance of the whole model's loss and gradients.
const MODEL_TOL: f64 = 1e-4;

/// The first CUDA device, or `None` (after saying so) where none opens. Plain fp32 GEMMs:
/// TF32 would be a 1e-3 relative difference, not a bug of the op.
fn cuda() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(dev) => {
            candle_core::cuda::set_gemm_reduced_precision_f32(false);
            Some(dev)
        }
        Err(e) => {
            // candle appends a backtrace to the message: its first line says it all.
            let e = e.to_string();
            let e = e.lines().next().unwrap_or_default().to_string();
            let required = std::env::var("SEPDIST_REQUIRE_CUDA").is_ok_and(|v| v == "1");
            assert!(
                !required,
                "SEPDIST_REQUIRE_CUDA=1 but no CUDA device opens: {e}"
            );
            println!("skipped: no CUDA device opens here ({e})");
            None
        }
    }
}

/// An op of some inputs, built on the device it is given (for tables such as RoPE's).
type Op<'a> = &'a dyn Fn(&[Tensor], &Device) -> Result<Tensor>;

/// Output and the gradients of `⟨r, f(inputs)⟩` with respect to every input, computed on
/// `dev` from the CPU tensors `inputs` and `r`'s seed, all brought back to the CPU.
/// With `r_in_bf16` the projection `r` is rounded to bf16 (the same values in either precision).
fn value_and_grads(
    f: Op,
    inputs: &[Tensor],
    dev: &Device,
    seed: u64,
    r_in_bf16: bool,
) -> Result<Vec<Tensor>> {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(&t.to_device(dev)?))
        .collect::<Result<_>>()?;
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts, dev)?;
    if !y.device().same_device(dev) {
        return Err(candle_core::Error::Msg(format!(
            "the op's output is on {:?}, its inputs on {:?}",
            y.device(),
            dev
        )));
    }
    let r_dtype = if r_in_bf16 { DType::BF16 } else { y.dtype() };
    let r = uniform(y.dims(), seed, r_dtype)?
        .to_dtype(y.dtype())?
        .to_device(dev)?;
    let grads = (&y * &r)?.sum_all()?.backward()?;
    let mut out = vec![y.detach().to_device(&Device::Cpu)?];
    for (i, v) in vars.iter().enumerate() {
        let g = grads
            .get(v.as_tensor())
            .ok_or_else(|| candle_core::Error::Msg(format!("no gradient for input {i}")))?;
        out.push(g.to_device(&Device::Cpu)?);
    }
    Ok(out)
}

/// `f` on CUDA equals `f` on the CPU in fp32, in value and in the gradient of every input:
/// seeded uniform inputs of `shapes`, each multiplied by its `scales` entry (to push softmax
/// and tanh off their linear ranges). Then `f` on CUDA in bf16 against the CPU's fp32 on the
/// same bf16-rounded inputs (as `ops_bf16.rs` compares on the CPU), within [`BF16_TOL`]: a
/// bf16 miss is recorded, not raised, so that the fp32 checks after it still run, and
/// [`no_bf16_misses`] fails the test at its end. Returns the largest fp32 relative error.
fn check_op(what: &str, dev: &Device, f: Op, shapes: &[&[usize]], scales: &[f64]) -> Result<f64> {
    let inputs: Vec<Tensor> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            uniform(s, 10 + i as u64, DType::F32)? * scales.get(i).copied().unwrap_or(1.0)
        })
        .collect::<Result<_>>()?;
    let cpu = value_and_grads(f, &inputs, &Device::Cpu, 99, false)?;
    let gpu = value_and_grads(f, &inputs, dev, 99, false)?;
    let worst = compare(what, shapes, "fp32", &gpu, &cpu, OP_TOL)?;
    let halves: Vec<Tensor> = inputs
        .iter()
        .map(|t| t.to_dtype(DType::BF16))
        .collect::<Result<_>>()?;
    let rounded: Vec<Tensor> = halves
        .iter()
        .map(|t| t.to_dtype(DType::F32))
        .collect::<Result<_>>()?;
    let cpu16 = value_and_grads(f, &rounded, &Device::Cpu, 99, true)?;
    let gpu16 = value_and_grads(f, &halves, dev, 99, true)?;
    let worst16 = compare(what, shapes, "bf16", &gpu16, &cpu16, BF16_TOL)?;
    println!(
        "{what} {shapes:?}: worst relative difference {worst:e}; bf16 against the CPU's fp32 {worst16:e}"
    );
    Ok(worst)
}

thread_local! {
    /// bf16 comparisons of the running test beyond [`BF16_TOL`] (each test has its thread).
    static BF16_MISSES: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Fails the test if any of its bf16 comparisons missed [`BF16_TOL`].
fn no_bf16_misses() {
    let misses = BF16_MISSES.with(|m| m.take());
    assert!(
        misses.is_empty(),
        "bf16 on CUDA beyond {BF16_TOL:e} of the CPU's fp32:\n{}",
        misses.join("\n")
    );
}

/// The largest relative difference of `gpu` (value, then gradients; any dtype) from `cpu`:
/// an fp32 one beyond `tol` fails at once, a bf16 one is recorded for [`no_bf16_misses`].
fn compare(
    what: &str,
    shapes: &[&[usize]],
    precision: &str,
    gpu: &[Tensor],
    cpu: &[Tensor],
    tol: f64,
) -> Result<f64> {
    let mut worst: f64 = 0.0;
    for (i, (g, c)) in gpu.iter().zip(cpu).enumerate() {
        let part = if i == 0 {
            "value".to_string()
        } else {
            format!("gradient of input {}", i - 1)
        };
        assert_eq!(g.dims(), c.dims(), "{what}: {part} shape");
        let err = max_abs_diff(&g.to_dtype(DType::F32)?, c)? / max_abs(c)?.max(1e-30);
        let message = format!(
            "{what} {shapes:?}: {part} on CUDA in {precision} differs from the CPU's fp32 by {err:e} (relative)"
        );
        if precision == "fp32" {
            assert!(err < tol, "{message}");
        } else if err >= tol {
            println!("MISS: {message}");
            BF16_MISSES.with(|m| m.borrow_mut().push(message));
        }
        worst = worst.max(err);
    }
    Ok(worst)
}

#[test]
fn ops_cuda_rms_norm_equals_the_cpu() -> Result<()> {
    let Some(dev) = cuda() else { return Ok(()) };
    let norm = |a: &[Tensor], _: &Device| rms_norm(&a[0], &a[1], 1e-5);
    check_op("rms_norm", &dev, &norm, &[&[3, 70, 12], &[12]], &[])?;
    check_op("rms_norm", &dev, &norm, &[&[1, 5], &[5]], &[])?;
    // A strided input (the transpose of a contiguous one).
    let strided = |a: &[Tensor], _: &Device| rms_norm(&a[0].t()?, &a[1], 1e-6);
    check_op("rms_norm (strided)", &dev, &strided, &[&[6, 4], &[6]], &[])?;
    let groups = |a: &[Tensor], _: &Device| rms_norm_groups(&a[0], &a[1], 1e-6);
    check_op(
        "rms_norm_groups",
        &dev,
        &groups,
        &[&[3, 130, 8], &[3, 8]],
        &[],
    )?;
    no_bf16_misses();
    Ok(())
}

#[test]
fn ops_cuda_softmax_rope_equal_the_cpu() -> Result<()> {
    let Some(dev) = cuda() else { return Ok(()) };
    let softmax = |a: &[Tensor], _: &Device| softmax_last_dim(&a[0]);
    check_op("softmax_last_dim", &dev, &softmax, &[&[4, 70, 33]], &[5.0])?;
    let lse = |a: &[Tensor], _: &Device| logsumexp_last_dim(&a[0]);
    check_op("logsumexp_last_dim", &dev, &lse, &[&[4, 70, 33]], &[5.0])?;
    let rope = |a: &[Tensor], d: &Device| Rope::new(16, 8, 10_000.0, d, DType::F32)?.apply(&a[0]);
    check_op("rope", &dev, &rope, &[&[2, 3, 10, 8]], &[])?;
    no_bf16_misses();
    Ok(())
}

#[test]
fn ops_cuda_qkv_rope_equals_the_cpu() -> Result<()> {
    let Some(dev) = cuda() else { return Ok(()) };
    let (heads, dh, d) = (2, 4, 6);
    for seq in ops_util::layouts() {
        let f = |a: &[Tensor], dv: &Device| {
            let rope = Rope::new(8, dh, 10_000.0, dv, DType::F32)?;
            qkv_rope(&a[0], &a[1], &rope, seq, heads)
        };
        let rows: &[usize] = &[seq.outer, seq.len, seq.inner, d];
        check_op("qkv_rope", &dev, &f, &[rows, &[3 * heads * dh, d]], &[])?;
    }
    no_bf16_misses();
    Ok(())
}

#[test]
fn ops_cuda_attention_equals_the_cpu() -> Result<()> {
    let Some(dev) = cuda() else { return Ok(()) };
    // T below, above and not a multiple of the kernels' 64-row blocks; every head size the
    // CUDA kernels are instantiated for (16, 32, 64, 128), also padded (8, 24, 100).
    for &(b, h, t, dh) in &[
        (1, 1, 1, 8),
        (2, 3, 70, 16),
        (1, 2, 129, 32),
        (1, 2, 5, 64),
        (1, 2, 300, 24),
        (2, 1, 70, 100),
        (1, 1, 33, 128),
    ] {
        let scale = (dh as f64).powf(-0.5);
        let shape: &[usize] = &[b, h, t, dh];
        let flash = |a: &[Tensor], _: &Device| flash_attention(&a[0], &a[1], &a[2], scale);
        check_op(
            "flash_attention",
            &dev,
            &flash,
            &[shape; 3],
            &[3.0, 3.0, 1.0],
        )?;
        let reference = |a: &[Tensor], _: &Device| reference_attention(&a[0], &a[1], &a[2], scale);
        check_op(
            "reference_attention",
            &dev,
            &reference,
            &[shape; 3],
            &[3.0, 3.0, 1.0],
        )?;
        // Packed q, k, v: output ‖ log-sum-exp, and a gradient flowing into the lse column.
        let packed = |a: &[Tensor], _: &Device| flash_attention_packed(&a[0], scale);
        check_op(
            "flash_attention_packed",
            &dev,
            &packed,
            &[&[3, b, h, t, dh]],
            &[3.0],
        )?;
    }
    // Inputs made by a transpose, as in the model.
    let strided = |a: &[Tensor], _: &Device| {
        let q = a[0].transpose(1, 2)?;
        flash_attention(&q, &(&q * 0.5)?, &q.sin()?, 0.25)
    };
    check_op(
        "flash_attention (strided)",
        &dev,
        &strided,
        &[&[2, 33, 3, 16]],
        &[3.0],
    )?;
    no_bf16_misses();
    Ok(())
}

#[test]
fn ops_cuda_out_proj_residual_equals_the_cpu() -> Result<()> {
    let Some(dev) = cuda() else { return Ok(()) };
    let (heads, dh, d) = (2, 4, 6);
    for seq in ops_util::layouts() {
        // E = Dh (plain output) and Dh + 1 (output ‖ lse, whose last column is ignored).
        for extra in [0, 1] {
            let f = |a: &[Tensor], _: &Device| out_proj_residual(&a[0], &a[1], &a[2], seq, dh);
            let fo: &[usize] = &[seq.sequences(), heads, seq.len, dh + extra];
            let x: &[usize] = &[seq.outer, seq.len, seq.inner, d];
            check_op(
                "out_proj_residual",
                &dev,
                &f,
                &[fo, &[d, heads * dh], x],
                &[],
            )?;
        }
    }
    no_bf16_misses();
    Ok(())
}

#[test]
fn ops_cuda_ffn_linear_layers_equal_the_cpu() -> Result<()> {
    let Some(dev) = cuda() else { return Ok(()) };
    let shapes: [&[usize]; 3] = [&[2, 33, 7], &[5, 7], &[5]];
    let lin = |a: &[Tensor], _: &Device| linear_bias(&a[0], &a[1], &a[2]);
    check_op("linear_bias", &dev, &lin, &shapes, &[])?;
    let gelu = |a: &[Tensor], _: &Device| gelu_linear_bias(&a[0], &a[1], &a[2]);
    check_op("gelu_linear_bias", &dev, &gelu, &shapes, &[2.0])?;
    no_bf16_misses();
    Ok(())
}

#[test]
fn ops_cuda_mask_estimator_ops_equal_the_cpu() -> Result<()> {
    let Some(dev) = cuda() else { return Ok(()) };
    let glu = |a: &[Tensor], _: &Device| glu_tanh(&a[0], 5);
    check_op("glu_tanh", &dev, &glu, &[&[3, 70, 10]], &[3.0])?;
    for tanh in [false, true] {
        let f = |a: &[Tensor], _: &Device| grouped_linear(&a[0], &a[1], &a[2], tanh);
        check_op(
            "grouped_linear",
            &dev,
            &f,
            &[&[3, 70, 6], &[3, 6, 5], &[3, 5]],
            &[2.0],
        )?;
        // A strided input (the first layer reads a narrow of the band features).
        let strided =
            |a: &[Tensor], _: &Device| grouped_linear(&a[0].transpose(0, 1)?, &a[1], &a[2], tanh);
        check_op(
            "grouped_linear (strided)",
            &dev,
            &strided,
            &[&[5, 3, 6], &[3, 6, 4], &[3, 4]],
            &[2.0],
        )?;
    }
    no_bf16_misses();
    Ok(())
}

#[test]
fn ops_cuda_stft_and_istft_equal_the_cpu() -> Result<()> {
    let Some(dev) = cuda() else { return Ok(()) };
    // (n_fft, hop, win_length, length): small, a window shorter than its FFT, and the model's
    // and the loss' real sizes.
    for &(n_fft, hop, win, n) in &[
        (16, 4, 16, 50),
        (32, 5, 20, 101),
        (2048, 512, 2048, 12_000),
        (4096, 147, 4096, 9001),
    ] {
        let stft = Stft::new(n_fft, hop, win)?;
        let fwd = |a: &[Tensor], _: &Device| stft.forward(&a[0]);
        check_op("stft", &dev, &fwd, &[&[2, 2, n]], &[])?;
        let frames = stft.n_frames(n);
        let inv = |a: &[Tensor], _: &Device| stft.inverse(&a[0], n);
        check_op(
            "istft",
            &dev,
            &inv,
            &[&[2, 2, n_fft / 2 + 1, frames, 2]],
            &[],
        )?;
    }
    no_bf16_misses();
    Ok(())
}

#[test]
fn ops_cuda_masked_istft_equals_the_cpu() -> Result<()> {
    let Some(dev) = cuda() else { return Ok(()) };
    for &(n_fft, hop, n, s) in &[(16, 4, 21, 3), (2048, 512, 9000, 4)] {
        let stft = Stft::new(n_fft, hop, n_fft)?;
        let (f, t) = (n_fft / 2 + 1, stft.n_frames(n));
        // The mask as the head makes it: `[B, S, 2, T, F, 2]` seen as `[B, S, 2, F, T, 2]`.
        let masked =
            |a: &[Tensor], _: &Device| stft.inverse_masked(&a[0].transpose(3, 4)?, &a[1], n);
        check_op(
            "inverse_masked",
            &dev,
            &masked,
            &[&[2, s, 2, t, f, 2], &[2, 2, f, t, 2]],
            &[],
        )?;
    }
    no_bf16_misses();
    Ok(())
}

#[test]
fn ops_cuda_multi_stft_l1_equals_the_cpu() -> Result<()> {
    let Some(dev) = cuda() else { return Ok(()) };
    let small = [
        Stft::new(16, 5, 16)?,
        Stft::new(12, 5, 8)?,
        Stft::new(8, 3, 8)?,
    ];
    let f = |a: &[Tensor], _: &Device| multi_stft_l1(&a[0], &small);
    check_op("multi_stft_l1", &dev, &f, &[&[2, 2, 41]], &[])?;
    let strided = |a: &[Tensor], _: &Device| multi_stft_l1(&a[0].transpose(0, 1)?, &small);
    check_op(
        "multi_stft_l1 (strided)",
        &dev,
        &strided,
        &[&[3, 2, 30]],
        &[],
    )?;
    // The loss' resolutions (windows 4096..256, hop 147) on a 0.25 s stereo pair.
    let loss_sizes = [4096, 2048, 1024, 512, 256]
        .iter()
        .map(|&w| Stft::new(w, 147, w))
        .collect::<Result<Vec<_>>>()?;
    let f = |a: &[Tensor], _: &Device| multi_stft_l1(&a[0], &loss_sizes);
    check_op(
        "multi_stft_l1 (loss sizes)",
        &dev,
        &f,
        &[&[2, 2, 11_025]],
        &[],
    )?;
    no_bf16_misses();
    // The loss' defaults (windows below 2048 centred in n_fft 2048) on 3.6 s: the CUDA path's
    // DFT matmuls then run in several chunks of frames per resolution. In f64: the gradient of
    // an L1 sum jumps where a bin crosses zero, and at this size some bins sit within fp32
    // rounding of zero (the CPU's own fp32 FFT kernel differs from its f64 result by 8e-4 in
    // the gradient there, measured), so fp32 is compared by value.
    let loss_defaults = [4096, 2048, 1024, 512, 256]
        .iter()
        .map(|&w| Stft::new(w.max(2048), 147, w))
        .collect::<Result<Vec<_>>>()?;
    let f = |a: &[Tensor], _: &Device| multi_stft_l1(&a[0], &loss_defaults);
    let x = uniform(&[2, 2, 160_000], 10, DType::F64)?;
    let cpu = value_and_grads(&f, std::slice::from_ref(&x), &Device::Cpu, 99, false)?;
    let gpu = value_and_grads(&f, std::slice::from_ref(&x), &dev, 99, false)?;
    for (part, (g, c)) in ["value", "gradient"].iter().zip(gpu.iter().zip(&cpu)) {
        let err = max_abs_diff(g, c)? / max_abs(c)?.max(1e-300);
        println!(
            "multi_stft_l1 (loss defaults, several chunks, f64): {part} worst relative difference {err:e}"
        );
        assert!(
            err < 1e-10,
            "{part} on CUDA in f64 differs from the CPU by {err:e}"
        );
    }
    let x32 = x.to_dtype(DType::F32)?;
    let value = |dev: &Device| -> Result<f64> {
        f(&[x32.to_device(dev)?], dev)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()
    };
    let (c, g) = (value(&Device::Cpu)?, value(&dev)?);
    let err = ((g - c) / c).abs();
    println!(
        "multi_stft_l1 (loss defaults, several chunks, fp32): value worst relative difference {err:e}"
    );
    assert!(
        err < OP_TOL,
        "the fp32 value on CUDA differs from the CPU by {err:e}"
    );
    Ok(())
}

/// The largest relative difference of each CUDA result from its CPU twin, and its name; a
/// difference of [`MODEL_TOL`] or more fails, naming the result.
fn worst_difference<'a>(
    results: impl IntoIterator<Item = (String, &'a Tensor, &'a Tensor)>,
) -> Result<(f64, String)> {
    let mut worst = (0.0f64, String::new());
    for (what, gpu, cpu) in results {
        assert_eq!(gpu.dims(), cpu.dims(), "{what}");
        let err = max_abs_diff(gpu, cpu)? / max_abs(cpu)?.max(1e-30);
        assert!(
            err < MODEL_TOL,
            "{what} on CUDA differs from the CPU by {err:e} (relative)"
        );
        if err > worst.0 {
            worst = (err, what);
        }
    }
    Ok(worst)
}

fn tiny() -> ModelConfig {
    ModelConfig {
        n_fft: 64,
        hop_length: 16,
        // Equal widths not adjacent: the general band→group gather/scatter.
        bands: Bands::Widths(vec![2, 2, 4, 2, 4, 8, 11]),
        n_layers: 2,
        emb_dim: 16,
        n_heads: 2,
        ffn_hidden_dim: [32, 24],
        mask_hidden_dim: Some(20),
        mask_depth: 2,
    }
}

fn loss_cfg() -> LossConfig {
    LossConfig {
        multi_stft_resolution_loss_weight: 0.7,
        multi_stft_resolutions_window_sizes: vec![64, 32],
        multi_stft_hop_size: 16,
        multi_stft_min_n_fft: 64,
        ..LossConfig::default()
    }
}

/// The loss and the gradient of every parameter, computed on `dev` (parameters and data
/// copied from the CPU), brought back to the CPU.
fn loss_and_grads(
    sep: &Separator,
    loss: &SeparationLoss,
    params: &BTreeMap<String, Tensor>,
    mix: &Tensor,
    target: &Tensor,
    kind: AttentionKind,
    dev: &Device,
) -> std::result::Result<(f64, BTreeMap<String, Tensor>), Box<dyn std::error::Error>> {
    let vars: BTreeMap<String, Var> = params
        .iter()
        .map(|(k, t)| Ok((k.clone(), Var::from_tensor(&t.to_device(dev)?)?)))
        .collect::<Result<_>>()?;
    let tracked: BTreeMap<String, Tensor> = vars
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let ctx = sep.prepare_context_with(&mix.to_device(dev)?, kind)?;
    let est = sep.forward_ctx(&tracked, &ctx)?;
    let total = loss.compute(&est, &target.to_device(dev)?)?.total;
    let grads = total.backward()?;
    let mut out = BTreeMap::new();
    for (name, var) in &vars {
        let g = grads
            .get(var.as_tensor())
            .ok_or_else(|| format!("no gradient for {name} on {dev:?}"))?;
        out.insert(name.clone(), g.to_device(&Device::Cpu)?);
    }
    Ok((total.to_dtype(DType::F64)?.to_scalar::<f64>()?, out))
}

/// The separator's forward, loss and backward on CUDA equal the CPU's (fp32): the loss and
/// every parameter's gradient within 1e-4 relative, with FlashAttention and the reference.
#[test]
fn ops_cuda_separator_loss_and_gradients_equal_the_cpu()
-> std::result::Result<(), Box<dyn std::error::Error>> {
    let Some(dev) = cuda() else { return Ok(()) };
    let sep = Separator::new(&tiny(), 2)?;
    let loss = SeparationLoss::new(&loss_cfg())?;
    let params = sep.init_params(3, &Device::Cpu, DType::F32)?;
    let n = 400;
    let mix = model_util::normal(&[2, 2, n], 1.0, 1)?.to_dtype(DType::F32)?;
    let target = model_util::normal(&[2, 2, 2, n], 0.5, 2)?.to_dtype(DType::F32)?;
    for kind in [AttentionKind::Flash, AttentionKind::Reference] {
        let (l_cpu, g_cpu) =
            loss_and_grads(&sep, &loss, &params, &mix, &target, kind, &Device::Cpu)?;
        let (l_gpu, g_gpu) = loss_and_grads(&sep, &loss, &params, &mix, &target, kind, &dev)?;
        let rel = (l_gpu - l_cpu).abs() / l_cpu.abs().max(1e-30);
        assert!(
            rel < MODEL_TOL,
            "{kind:?}: loss {l_gpu} on CUDA, {l_cpu} on the CPU (relative {rel:e})"
        );
        assert_eq!(g_cpu.len(), params.len());
        let worst = worst_difference(
            g_cpu
                .iter()
                .map(|(name, c)| (format!("{kind:?}: gradient of {name}"), &g_gpu[name], c)),
        )?;
        println!(
            "separator ({kind:?}): loss {l_cpu} (relative difference {rel:e}); {} gradients, worst {:e} ({})",
            g_cpu.len(),
            worst.0,
            worst.1
        );
    }
    Ok(())
}

/// The blocks' hand-written backwards on CUDA (the transformers' and the head's: the fused
/// ops' composed forwards and backwards, the attention's CUDA kernels) equal the CPU's fused
/// ones (fp32): each transformer's output, input gradient and parameter gradients, kept and
/// checkpointed, and each head piece's mask and gradients, within 1e-4 relative.
#[test]
fn ops_cuda_blocks_own_backward_equals_the_cpu()
-> std::result::Result<(), Box<dyn std::error::Error>> {
    let Some(dev) = cuda() else { return Ok(()) };
    let sep = Separator::new(&tiny(), 2)?;
    let params = sep.init_params(5, &Device::Cpu, DType::F32)?;
    let mix = model_util::normal(&[2, 2, 400], 1.0, 1)?.to_dtype(DType::F32)?;
    // Every result of the blocks' forwards and backwards on `dev`, labelled, on the CPU.
    let run =
        |dev: &Device| -> std::result::Result<Vec<(String, Tensor)>, Box<dyn std::error::Error>> {
            let params: BTreeMap<String, Tensor> = params
                .iter()
                .map(|(k, t)| Ok((k.clone(), t.to_device(dev)?)))
                .collect::<Result<_>>()?;
            let ctx = sep.prepare_context_with(&mix.to_device(dev)?, AttentionKind::Flash)?;
            let blocks = sep.blocks();
            let band_split = &blocks[0];
            let mut x = band_split.forward(
                &sep.block_params(band_split, &params)?,
                ctx.first_input(),
                &ctx,
            )?;
            let mut out = Vec::new();
            let mut push = |what: String, t: &Tensor| -> Result<()> {
                out.push((what, t.to_device(&Device::Cpu)?));
                Ok(())
            };
            for (i, block) in blocks[1..blocks.len() - 1].iter().enumerate() {
                let name = block.name();
                assert!(block.has_own_backward(&x, &ctx), "{name} on {dev:?}");
                let p = sep.block_params(block, &params)?;
                let dy = model_util::normal(x.dims(), 1.0, 6 + i as u64)?
                    .to_dtype(DType::F32)?
                    .to_device(dev)?;
                let (y, saved) = block.forward_saved(&p, &x, &ctx)?;
                let (dx, dp) = block.backward_saved(&p, saved, dy.clone(), &ctx)?;
                let (dx2, dp2) = block.backward_recomputed(&p, &x, dy, &ctx)?;
                push(format!("{name} output"), &y)?;
                push(format!("{name} dx"), &dx)?;
                push(format!("{name} dx (recomputed)"), &dx2)?;
                for (j, (g, g2)) in dp.iter().zip(&dp2).enumerate() {
                    push(format!("{name} parameter {j}"), g)?;
                    push(format!("{name} parameter {j} (recomputed)"), g2)?;
                }
                x = y;
            }
            let head = &blocks[blocks.len() - 1];
            assert!(head.has_own_backward(&x, &ctx), "head on {dev:?}");
            let hp = sep.block_params(head, &params)?;
            for s in 0..head.head_sources() {
                let p: Vec<Tensor> = head
                    .head_source_params(s)?
                    .iter()
                    .map(|&i| hp[i].clone())
                    .collect();
                let (mask, saved) = head.head_source_saved(&p, s, &x)?;
                let dmask = model_util::normal(mask.dims(), 1.0, 20 + s as u64)?
                    .to_dtype(DType::F32)?
                    .to_device(dev)?;
                let (dx, dp) = head.head_source_backward(&p, s, saved, dmask, &x)?;
                push(format!("head source {s} mask"), &mask)?;
                push(format!("head source {s} dx"), &dx)?;
                for (j, g) in dp.iter().enumerate() {
                    push(format!("head source {s} parameter {j}"), g)?;
                }
            }
            Ok(out)
        };
    let cpu = run(&Device::Cpu)?;
    let gpu = run(&dev)?;
    assert_eq!(cpu.len(), gpu.len());
    let worst = worst_difference(
        cpu.iter()
            .zip(&gpu)
            .map(|((what, c), (_, g))| (what.clone(), g, c)),
    )?;
    println!(
        "blocks' own backward: {} results, worst relative difference {:e} ({})",
        cpu.len(),
        worst.0,
        worst.1
    );
    Ok(())
}
