//! Block-wise execution (detached inputs, upstream gradients passed back by hand) gives the
//! same parameter gradients as one backward through `Separator::forward`.

mod model_util;

use candle_core::{DType, Device, Tensor, Var};
use sepdist_config::{Bands, LossConfig, ModelConfig};
use sepdist_model::loss::SeparationLoss;
use sepdist_model::{AttentionKind, BlockKind, Separator};
use std::collections::BTreeMap;

type R<T> = Result<T, Box<dyn std::error::Error>>;

/// Asserts `max |a − b| ≤ tol · max(max |scale_of|, 1e-3)`, computed in f64.
fn assert_close(a: &Tensor, b: &Tensor, scale_of: &Tensor, tol: f64, what: &str) -> R<()> {
    let max_abs = |t: &Tensor| -> R<f64> {
        Ok(t.to_dtype(DType::F64)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f64>()?)
    };
    let diff = max_abs(&(a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?)?;
    let scale = max_abs(scale_of)?.max(1e-3);
    assert!(
        diff <= tol * scale,
        "{what}: differs by {diff} (scale {scale})"
    );
    Ok(())
}

fn tiny() -> ModelConfig {
    ModelConfig {
        n_fft: 64,
        hop_length: 16,
        bands: Bands::Widths(vec![2, 2, 2, 4, 4, 8, 11]),
        n_layers: 2,
        emb_dim: 8,
        n_heads: 2,
        ffn_hidden_dim: [16, 16],
        mask_hidden_dim: Some(16),
        mask_depth: 2,
    }
}

#[test]
fn model_blockwise_backward_matches_full_backward() -> R<()> {
    let dev = Device::Cpu;
    let sep = Separator::new(&tiny(), 2)?;
    let loss = SeparationLoss::new(&LossConfig {
        multi_stft_resolutions_window_sizes: vec![32, 16],
        multi_stft_hop_size: 8,
        multi_stft_min_n_fft: 32,
        ..LossConfig::default()
    })?;
    let kinds: Vec<BlockKind> = sep.blocks().iter().map(|b| b.kind()).collect();
    assert_eq!(kinds.len(), 2 + 2 * 2);
    assert_eq!(kinds[1], BlockKind::Time { layer: 0 });
    assert_eq!(kinds[2], BlockKind::Band { layer: 0 });
    assert_eq!(sep.blocks()[0].name(), "band_split");
    assert_eq!(sep.blocks()[3].name(), "layers.1.time");

    let vars: BTreeMap<String, Var> = sep
        .init_params(5, &dev, DType::F64)?
        .into_iter()
        .map(|(k, t)| Ok((k, Var::from_tensor(&t)?)))
        .collect::<R<_>>()?;
    let tracked: BTreeMap<String, Tensor> = vars
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let mix = model_util::normal(&[2, 2, 96], 1.0, 1)?;
    let target = model_util::normal(&[2, 2, 2, 96], 0.5, 2)?;
    let ctx = sep.prepare_context_with(&mix, AttentionKind::Flash)?;

    // One backward through the whole chain.
    let full = sep.forward_ctx(&tracked, &ctx)?;
    let full_grads = loss.compute(&full, &target)?.total.backward()?;

    // Block by block, each on a detached input.
    let mut inputs = Vec::new();
    let mut outputs = Vec::new();
    let mut x = ctx.first_input().clone();
    for b in sep.blocks() {
        let xin = Var::from_tensor(&x.detach())?;
        let y = b.forward(&sep.block_params(b, &tracked)?, xin.as_tensor(), &ctx)?;
        x = y.clone();
        inputs.push(xin);
        outputs.push(y);
    }
    let out = Var::from_tensor(&x.detach())?;
    let max_out = (out.as_tensor() - &full)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()?;
    assert!(max_out < 1e-12, "outputs differ by {max_out}");
    let mut g = loss
        .compute(out.as_tensor(), &target)?
        .total
        .backward()?
        .get(out.as_tensor())
        .ok_or("no output gradient")?
        .clone();
    let mut block_grads: BTreeMap<String, Tensor> = BTreeMap::new();
    for (i, b) in sep.blocks().iter().enumerate().rev() {
        let grads = (&outputs[i] * &g)?.sum_all()?.backward()?;
        for spec in b.param_specs() {
            let gp = grads
                .get(vars[&spec.name].as_tensor())
                .ok_or("missing param grad")?;
            block_grads.insert(spec.name.clone(), gp.clone());
        }
        if i > 0 {
            g = grads
                .get(inputs[i].as_tensor())
                .ok_or("missing input grad")?
                .clone();
        }
    }
    assert_eq!(block_grads.len(), vars.len());
    for (name, v) in &vars {
        let a = full_grads.get(v.as_tensor()).ok_or("missing full grad")?;
        let b = &block_grads[name];
        let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
        let scale = a.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?.max(1.0);
        assert!(diff <= 1e-6 * scale, "{name}: gradients differ by {diff}");
    }
    Ok(())
}

#[test]
fn model_blocks_are_pure_and_reject_wrong_params() -> R<()> {
    let dev = Device::Cpu;
    let sep = Separator::new(&tiny(), 1)?;
    let params = sep.init_params(9, &dev, DType::F32)?;
    let mix = model_util::normal(&[1, 2, 80], 1.0, 3)?.to_dtype(DType::F32)?;
    let ctx = sep.prepare_context(&mix)?;
    let a = sep.forward_ctx(&params, &ctx)?;
    let b = sep.forward_ctx(&params, &ctx)?;
    assert_eq!(
        a.flatten_all()?.to_vec1::<f32>()?,
        b.flatten_all()?.to_vec1::<f32>()?
    );
    let blk = &sep.blocks()[1];
    let p = sep.block_params(blk, &params)?;
    let x = sep.blocks()[0].forward(
        &sep.block_params(&sep.blocks()[0], &params)?,
        &ctx.spec,
        &ctx,
    )?;
    assert_eq!(x.dims(), &[1, 80 / 16 + 1, 7, 8]);
    assert!(blk.forward(&p[1..], &x, &ctx).is_err());
    let mut wrong = params.clone();
    let name = &blk.param_specs()[0].name;
    wrong.insert(name.clone(), Tensor::zeros(3, DType::F32, &dev)?);
    assert!(sep.block_params(blk, &wrong).is_err());
    // Same seed, same values; another seed, other values.
    let again = sep.init_params(9, &dev, DType::F32)?;
    let other = sep.init_params(10, &dev, DType::F32)?;
    let w = "layers.0.time.attn.qkv.weight";
    let v = |m: &BTreeMap<String, Tensor>| -> R<Vec<f32>> { Ok(m[w].flatten_all()?.to_vec1()?) };
    assert_eq!(v(&params)?, v(&again)?);
    assert_ne!(v(&params)?, v(&other)?);
    Ok(())
}

/// A transformer's hand-written backward (`forward_saved` + `backward_saved`, and the
/// checkpointing one, `backward_recomputed`) gives candle's backward of `Block::forward`'s
/// graph: the same output, input gradient and parameter gradients, for a time and a band
/// transformer, in f32 and f64.
#[test]
fn model_transformer_own_backward_matches_candle_backward() -> R<()> {
    transformer_own_backward_matches_candle_backward()
}

/// The same with the fused ops' CPU kernels off: the composed forwards and backwards a GPU
/// runs (`ops::with_composed_ops`; the attention keeps its kernel, as on a GPU), against
/// candle's backward of the composed graph; the head then takes candle's graph.
#[test]
fn model_transformer_composed_own_backward_matches_candle_backward() -> R<()> {
    sepdist_model::ops::with_composed_ops(transformer_own_backward_matches_candle_backward)
}

fn transformer_own_backward_matches_candle_backward() -> R<()> {
    for dtype in [DType::F64, DType::F32] {
        let sep = Separator::new(&tiny(), 2)?;
        let params = sep.init_params(11, &Device::Cpu, dtype)?;
        let mix = model_util::normal(&[2, 2, 96], 1.0, 4)?.to_dtype(dtype)?;
        let ctx = sep.prepare_context_with(&mix, AttentionKind::Flash)?;
        let band_split = &sep.blocks()[0];
        assert!(!band_split.has_own_backward(ctx.first_input(), &ctx));
        let x = band_split.forward(
            &sep.block_params(band_split, &params)?,
            ctx.first_input(),
            &ctx,
        )?;
        let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
        for block in &sep.blocks()[1..3] {
            assert!(block.has_own_backward(&x, &ctx), "{}", block.name());
            let p = sep.block_params(block, &params)?;
            let dy = model_util::normal(x.dims(), 1.0, 6)?.to_dtype(dtype)?;

            // Reference: candle's backward of the block's graph.
            let vars: Vec<Var> = p.iter().map(Var::from_tensor).collect::<Result<_, _>>()?;
            let tracked: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let xin = Var::from_tensor(&x)?;
            let y = block.forward(&tracked, xin.as_tensor(), &ctx)?;
            let grads = (&y * &dy)?.sum_all()?.backward()?;

            let (own_y, saved) = block.forward_saved(&p, &x, &ctx)?;
            let (dx, dparams) = block.backward_saved(&p, saved, dy.clone(), &ctx)?;
            let close = |a: &Tensor, b: &Tensor, what: &str| {
                let label = format!("{} {what} ({dtype:?})", block.name());
                assert_close(a, b, a, tol, &label)
            };
            close(&own_y, &y, "output")?;
            close(
                &dx,
                grads.get(xin.as_tensor()).ok_or("no input gradient")?,
                "dx",
            )?;
            assert_eq!(dparams.len(), p.len());
            for ((v, g), spec) in vars.iter().zip(&dparams).zip(block.param_specs()) {
                assert_eq!(g.dims(), spec.shape.as_slice(), "{}", spec.name);
                close(
                    g,
                    grads.get(v.as_tensor()).ok_or("no gradient")?,
                    &spec.name,
                )?;
            }
            // Checkpointing's backward from the input alone: the same gradients.
            let (dx2, dparams2) = block.backward_recomputed(&p, &x, dy, &ctx)?;
            close(&dx2, &dx, "dx (recomputed)")?;
            for ((a, b), spec) in dparams2.iter().zip(&dparams).zip(block.param_specs()) {
                close(a, b, &format!("{} (recomputed)", spec.name))?;
            }
        }
        // Not a transformer: refused with a message, not a panic.
        let head = sep.blocks().last().ok_or("no head")?;
        let hp = sep.block_params(head, &params)?;
        assert!(head.forward_saved(&hp, &x, &ctx).is_err());
        assert!(head.backward_recomputed(&hp, &x, x.clone(), &ctx).is_err());
    }
    Ok(())
}

/// The head's hand-written backward (`head_source_saved`, the iSTFT from the mask,
/// `head_source_backward`) gives candle's backward of `Block::head_source`'s graph: the same
/// estimate, input gradient and parameter gradients, per source, in f32 and f64; also for
/// band groups split into several runs and a deeper mask estimator.
#[test]
fn model_head_own_backward_matches_candle_backward() -> R<()> {
    head_own_backward_matches_candle_backward()
}

/// The same with the fused ops' CPU kernels off (`ops::with_composed_ops`): the composed
/// forwards and backwards a GPU runs.
#[test]
fn model_head_composed_own_backward_matches_candle_backward() -> R<()> {
    sepdist_model::ops::with_composed_ops(head_own_backward_matches_candle_backward)
}

fn head_own_backward_matches_candle_backward() -> R<()> {
    let interleaved = ModelConfig {
        bands: Bands::Widths(vec![2, 4, 2, 4, 21]),
        mask_depth: 3,
        ..tiny()
    };
    for (cfg, dtype) in [
        (tiny(), DType::F64),
        (tiny(), DType::F32),
        (interleaved.clone(), DType::F64),
        (interleaved, DType::F32),
    ] {
        let sep = Separator::new(&cfg, 2)?;
        let params = sep.init_params(13, &Device::Cpu, dtype)?;
        let mix = model_util::normal(&[2, 2, 96], 1.0, 4)?.to_dtype(dtype)?;
        let ctx = sep.prepare_context_with(&mix, AttentionKind::Flash)?;
        let head = sep.blocks().last().ok_or("no head")?;
        let frames = ctx.first_input().dim(3)?;
        let n_bands = sep.dims().layout.widths.len();
        let x = model_util::normal(&[2, frames, n_bands, cfg.emb_dim], 1.0, 5)?.to_dtype(dtype)?;
        assert!(head.has_own_backward(&x, &ctx));
        let hp = sep.block_params(head, &params)?;
        let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
        for s in 0..head.head_sources() {
            let p: Vec<Tensor> = head
                .head_source_params(s)?
                .iter()
                .map(|&i| hp[i].clone())
                .collect();
            let dest = model_util::normal(&[2, 1, 2, 96], 1.0, 7 + s as u64)?.to_dtype(dtype)?;

            // Reference: candle's backward of the piece's graph.
            let vars: Vec<Var> = p.iter().map(Var::from_tensor).collect::<Result<_, _>>()?;
            let tracked: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let xin = Var::from_tensor(&x)?;
            let est = head.head_source(&tracked, s, xin.as_tensor(), &ctx)?;
            let grads = (&est * &dest)?.sum_all()?.backward()?;

            let (mask, saved) = head.head_source_saved(&p, s, &x)?;
            let mask = Var::from_tensor(&mask)?;
            let own_est = head.head_estimate(mask.as_tensor(), &ctx)?;
            let dmask = (&own_est * &dest)?.sum_all()?.backward()?;
            let dmask = dmask.get(mask.as_tensor()).ok_or("no mask gradient")?;
            let (dx, dparams) = head.head_source_backward(&p, s, saved, dmask.clone(), &x)?;
            let close = |a: &Tensor, b: &Tensor, what: &str| {
                assert_close(a, b, b, tol, &format!("source {s} {what} ({dtype:?})"))
            };
            close(&own_est, &est, "estimate")?;
            close(
                &dx,
                grads.get(xin.as_tensor()).ok_or("no input gradient")?,
                "dx",
            )?;
            assert_eq!(dparams.len(), p.len());
            for (v, g) in vars.iter().zip(&dparams) {
                let reference = grads.get(v.as_tensor()).ok_or("no gradient")?;
                assert_eq!(g.dims(), reference.dims());
                close(g, reference, "parameter gradient")?;
            }
            // A gradient of the wrong shape is refused, not a panic.
            let (_, saved) = head.head_source_saved(&p, s, &x)?;
            assert!(
                head.head_source_backward(&p, s, saved, x.clone(), &x)
                    .is_err()
            );
        }
    }
    Ok(())
}
