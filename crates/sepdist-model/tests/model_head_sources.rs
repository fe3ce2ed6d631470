//! The head and the loss run one source at a time (what the engine does) equal the head's
//! `forward` and `SeparationLoss::compute` on all sources at once: outputs, loss parts and
//! gradients.

mod model_util;

use candle_core::{DType, Device, Tensor, Var};
use sepdist_config::{Bands, LossConfig, ModelConfig};
use sepdist_model::loss::SeparationLoss;
use sepdist_model::{Block, BlockKind, ForwardContext, Separator};
use std::collections::BTreeMap;

type R<T> = Result<T, Box<dyn std::error::Error>>;

fn tiny() -> ModelConfig {
    ModelConfig {
        n_fft: 64,
        hop_length: 16,
        bands: Bands::Widths(vec![2, 2, 2, 4, 4, 8, 11]),
        n_layers: 1,
        emb_dim: 8,
        n_heads: 2,
        ffn_hidden_dim: [16, 16],
        mask_hidden_dim: Some(16),
        mask_depth: 2,
    }
}

/// Sources named out of alphabetical order, so that a piece's parameters are not the block's
/// in source order.
fn sources() -> Vec<String> {
    ["vocals", "bass", "drums"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn head(sep: &Separator) -> R<&Block> {
    sep.blocks()
        .last()
        .filter(|b| b.kind() == BlockKind::Head)
        .ok_or_else(|| "the last block is not the head".into())
}

/// The head's parameters (block order), a head input `[B, T, K, D]` and the context.
fn setup(sep: &Separator, dtype: DType) -> R<(Vec<Tensor>, Tensor, ForwardContext)> {
    let params = sep.init_params(11, &Device::Cpu, dtype)?;
    let mix = model_util::normal(&[2, 2, 96], 1.0, 1)?.to_dtype(dtype)?;
    let ctx = sep.prepare_context(&mix)?;
    let (b, t) = ctx.batch_frames()?;
    let d = sep.dims();
    let x = model_util::normal(&[b, t, d.layout.n_bands(), d.dim], 1.0, 2)?.to_dtype(dtype)?;
    Ok((sep.block_params(head(sep)?, &params)?, x, ctx))
}

fn piece(params: &[Tensor], ids: &[usize]) -> Vec<Tensor> {
    ids.iter().map(|&i| params[i].clone()).collect()
}

#[test]
fn model_head_sources_stacked_equal_the_head_forward_bitwise() -> R<()> {
    let sep = Separator::with_sources(&tiny(), &sources())?;
    let head = head(&sep)?;
    assert_eq!(head.head_sources(), 3);
    let (params, x, ctx) = setup(&sep, DType::F32)?;
    let full = head.forward(&params, &x, &ctx)?;
    let per_source = (0..3)
        .map(|s| head.head_source(&piece(&params, &head.head_source_params(s)?), s, &x, &ctx))
        .collect::<sepdist_model::Result<Vec<_>>>()?;
    for (s, y) in per_source.iter().enumerate() {
        assert_eq!(y.dims(), &[2, 1, 2, 96], "source {s}");
    }
    let stacked = Tensor::cat(&per_source, 1)?;
    assert_eq!(stacked.dims(), full.dims());
    let (a, b) = (
        stacked.flatten_all()?.to_vec1::<f32>()?,
        full.flatten_all()?.to_vec1::<f32>()?,
    );
    assert!(a.iter().any(|v| *v != 0.0), "the estimate is all zeros");
    assert_eq!(a, b, "per-source heads differ from the head's forward");
    Ok(())
}

#[test]
fn model_head_source_params_are_the_final_norm_and_one_mask_estimator() -> R<()> {
    let sep = Separator::with_sources(&tiny(), &sources())?;
    let head = head(&sep)?;
    let specs = head.param_specs();
    let mut seen = vec![0usize; specs.len()];
    for (s, name) in sources().iter().enumerate() {
        let ids = head.head_source_params(s)?;
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "not ascending: {ids:?}"
        );
        for &i in &ids {
            seen[i] += 1;
            let n = &specs[i].name;
            assert!(
                n == "final_norm.gamma" || n.starts_with(&format!("mask_estimators.{name}.")),
                "source {name}'s piece holds {n}"
            );
        }
        let own = specs
            .iter()
            .filter(|p| p.name.starts_with(&format!("mask_estimators.{name}.")))
            .count();
        assert_eq!(ids.len(), own + 1, "source {name}");
    }
    // Every parameter is in a piece; only the final norm's gamma is in all of them.
    for (i, n) in seen.iter().enumerate() {
        let expected = if specs[i].name == "final_norm.gamma" {
            3
        } else {
            1
        };
        assert_eq!(*n, expected, "{}", specs[i].name);
    }
    // Errors, not panics: another block, a source out of range, the wrong parameters.
    assert!(sep.blocks()[0].head_source_params(0).is_err());
    assert_eq!(sep.blocks()[0].head_sources(), 0);
    assert!(head.head_source_params(3).is_err());
    let (params, x, ctx) = setup(&sep, DType::F32)?;
    assert!(head.head_source(&params, 0, &x, &ctx).is_err());
    assert!(head.head_source(&params[..1], 0, &x, &ctx).is_err());
    Ok(())
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * b.abs().max(1e-12)
}

/// Σ over sources of `compute_source` against `compute` for one loss.
fn check_loss_sum(loss: &SeparationLoss, est: &Tensor, tgt: &Tensor, what: &str) -> R<()> {
    let s_count = est.dim(1)?;
    let full = loss.compute(est, tgt)?;
    let mut sums = [0.0f64; 4];
    for s in 0..s_count {
        let p = loss.compute_source(&est.narrow(1, s, 1)?, &tgt.narrow(1, s, 1)?, s, s_count)?;
        for (acc, t) in sums
            .iter_mut()
            .zip([&p.total, &p.waveform, &p.mse, &p.multi_stft])
        {
            *acc += t.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        }
    }
    let want = [&full.total, &full.waveform, &full.mse, &full.multi_stft];
    for ((got, w), part) in sums
        .iter()
        .zip(want)
        .zip(["total", "waveform", "mse", "multi_stft"])
    {
        let w = w.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        assert!(
            close(*got, w, 1e-6),
            "{what}: Σ per-source {part} {got} vs {w}"
        );
    }
    Ok(())
}

#[test]
fn model_per_source_loss_parts_sum_to_the_loss() -> R<()> {
    let names: Vec<String> = ["bass", "drums", "other", "vocals"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let base = LossConfig {
        multi_stft_resolutions_window_sizes: vec![32, 16],
        multi_stft_hop_size: 8,
        multi_stft_min_n_fft: 24,
        ..LossConfig::default()
    };
    let weights = |l1: f64, mse: f64, multi: f64| LossConfig {
        l1_weight: l1,
        mse_weight: mse,
        multi_stft_resolution_loss_weight: multi,
        ..base.clone()
    };
    let source_weights: std::collections::BTreeMap<String, f64> =
        [("vocals".to_string(), 3.0), ("bass".to_string(), 0.0)]
            .into_iter()
            .collect();
    let est = model_util::normal(&[2, 4, 2, 80], 1.0, 5)?.to_dtype(DType::F32)?;
    let tgt = model_util::normal(&[2, 4, 2, 80], 0.7, 6)?.to_dtype(DType::F32)?;
    for (l1, mse, multi) in [
        (1.0, 0.0, 1.0),
        (0.3, 2.0, 0.5),
        (0.0, 1.0, 0.0),
        (1.0, 0.0, 0.0),
    ] {
        let cfg = weights(l1, mse, multi);
        let what = format!("l1 {l1}, mse {mse}, multi {multi}");
        check_loss_sum(&SeparationLoss::new(&cfg)?, &est, &tgt, &what)?;
        check_loss_sum(
            &SeparationLoss::for_sources(&cfg, &names)?,
            &est,
            &tgt,
            &format!("{what}, all weights 1"),
        )?;
        let weighted = LossConfig {
            source_weights: source_weights.clone(),
            ..cfg
        };
        check_loss_sum(
            &SeparationLoss::for_sources(&weighted, &names)?,
            &est,
            &tgt,
            &format!("{what}, source weights"),
        )?;
    }
    // Errors: shapes differ, source out of range, weights for another number of sources.
    let loss = SeparationLoss::for_sources(
        &LossConfig {
            source_weights,
            ..base
        },
        &names,
    )?;
    let (e, t) = (est.narrow(1, 0, 1)?, tgt.narrow(1, 0, 1)?);
    assert!(loss.compute_source(&e, &t.narrow(3, 0, 79)?, 0, 4).is_err());
    assert!(loss.compute_source(&e, &t, 4, 4).is_err());
    assert!(loss.compute_source(&e, &t, 0, 3).is_err());
    Ok(())
}

/// Per-source backwards (head piece + loss part), gradients summed, equal one backward of
/// the head's forward and `compute`: every parameter's gradient and the input's.
#[test]
fn model_per_source_backward_sums_to_the_full_backward() -> R<()> {
    let sep = Separator::with_sources(&tiny(), &sources())?;
    let head = head(&sep)?;
    let (params, x, ctx) = setup(&sep, DType::F64)?;
    let vars = params
        .iter()
        .map(Var::from_tensor)
        .collect::<candle_core::Result<Vec<_>>>()?;
    let tracked: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let xv = Var::from_tensor(&x)?;
    let loss = SeparationLoss::for_sources(
        &LossConfig {
            mse_weight: 0.5,
            multi_stft_resolutions_window_sizes: vec![32, 16],
            multi_stft_hop_size: 8,
            multi_stft_min_n_fft: 32,
            source_weights: [("drums".to_string(), 2.0)].into_iter().collect(),
            ..LossConfig::default()
        },
        &sources(),
    )?;
    let target = model_util::normal(&[2, 3, 2, 96], 0.5, 3)?;

    let est = head.forward(&tracked, xv.as_tensor(), &ctx)?;
    let full = loss.compute(&est, &target)?.total.backward()?;

    let mut sums: BTreeMap<usize, Tensor> = BTreeMap::new();
    let mut dx: Option<Tensor> = None;
    for s in 0..3 {
        let ids = head.head_source_params(s)?;
        let y = head.head_source(&piece(&tracked, &ids), s, xv.as_tensor(), &ctx)?;
        let part = loss.compute_source(&y, &target.narrow(1, s, 1)?, s, 3)?;
        let grads = part.total.backward()?;
        for &i in &ids {
            let g = grads
                .get(vars[i].as_tensor())
                .ok_or("a piece parameter got no gradient")?;
            let acc = match sums.remove(&i) {
                Some(a) => (a + g)?,
                None => g.clone(),
            };
            sums.insert(i, acc);
        }
        let g = grads.get(xv.as_tensor()).ok_or("no input gradient")?;
        dx = Some(match dx {
            Some(a) => (a + g)?,
            None => g.clone(),
        });
    }
    let max_rel = |a: &Tensor, b: &Tensor| -> R<f64> {
        let scale = b.abs()?.max_all()?.to_scalar::<f64>()?.max(1e-300);
        Ok((a - b)?.abs()?.max_all()?.to_scalar::<f64>()? / scale)
    };
    assert_eq!(sums.len(), params.len(), "every parameter is in some piece");
    for (i, g) in &sums {
        let want = full.get(vars[*i].as_tensor()).ok_or("no full gradient")?;
        let e = max_rel(g, want)?;
        assert!(e < 1e-10, "{}: {e:e}", head.param_specs()[*i].name);
    }
    let want = full.get(xv.as_tensor()).ok_or("no full input gradient")?;
    let e = max_rel(&dx.ok_or("no sources")?, want)?;
    assert!(e < 1e-10, "input gradient: {e:e}");
    Ok(())
}
