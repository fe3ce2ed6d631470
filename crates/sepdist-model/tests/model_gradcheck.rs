//! Whole-model gradients against central finite differences (f64, tiny config).

mod model_util;

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sepdist_config::{Bands, LossConfig, ModelConfig};
use sepdist_model::loss::SeparationLoss;
use sepdist_model::{AttentionKind, Separator};
use std::collections::BTreeMap;

type R<T> = Result<T, Box<dyn std::error::Error>>;

fn tiny() -> ModelConfig {
    ModelConfig {
        n_fft: 64,
        hop_length: 16,
        // Equal widths not adjacent: exercises the general band→group gather/scatter.
        bands: Bands::Widths(vec![2, 2, 4, 2, 4, 8, 11]),
        n_layers: 1,
        emb_dim: 8,
        n_heads: 2,
        ffn_hidden_dim: [16, 12],
        mask_hidden_dim: Some(10),
        mask_depth: 3,
    }
}

fn loss_cfg() -> LossConfig {
    LossConfig {
        multi_stft_resolution_loss_weight: 0.7,
        multi_stft_resolutions_window_sizes: vec![32, 16],
        multi_stft_hop_size: 8,
        multi_stft_min_n_fft: 32,
        ..LossConfig::default()
    }
}

fn total_loss(
    sep: &Separator,
    loss: &SeparationLoss,
    params: &BTreeMap<String, Tensor>,
    mix: &Tensor,
    target: &Tensor,
    kind: AttentionKind,
) -> R<Tensor> {
    let ctx = sep.prepare_context_with(mix, kind)?;
    let est = sep.forward_ctx(params, &ctx)?;
    Ok(loss.compute(&est, target)?.total)
}

fn check(kind: AttentionKind) -> R<()> {
    let dev = Device::Cpu;
    let sep = Separator::new(&tiny(), 2)?;
    let loss = SeparationLoss::new(&loss_cfg())?;
    // Larger than default init so that every nonlinearity is exercised off its linear regime.
    let params: BTreeMap<String, Tensor> = sep
        .init_params(3, &dev, DType::F64)?
        .into_iter()
        .map(|(n, t)| Ok((n, (t * 1.5)?)))
        .collect::<R<_>>()?;
    let n = 128;
    let mix = model_util::normal(&[2, 2, n], 1.0, 1)?;
    let target = model_util::normal(&[2, 2, 2, n], 0.5, 2)?;

    let vars: BTreeMap<String, Var> = params
        .iter()
        .map(|(k, t)| Ok((k.clone(), Var::from_tensor(t)?)))
        .collect::<R<_>>()?;
    let tracked: BTreeMap<String, Tensor> = vars
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let grads = total_loss(&sep, &loss, &tracked, &mix, &target, kind)?.backward()?;

    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let h = 1e-5;
    let mut checked = 0;
    let mut worst: f64 = 0.0;
    for block in sep.blocks() {
        for spec in block.param_specs() {
            let g = grads
                .get(vars[&spec.name].as_tensor())
                .ok_or(format!("no gradient for {}", spec.name))?
                .flatten_all()?
                .to_vec1::<f64>()?;
            let base = params[&spec.name].flatten_all()?.to_vec1::<f64>()?;
            for _ in 0..2 {
                let i = rng.random_range(0..base.len());
                let eval = |delta: f64| -> R<f64> {
                    let mut v = base.clone();
                    v[i] += delta;
                    let mut p = params.clone();
                    p.insert(
                        spec.name.clone(),
                        Tensor::from_vec(v, spec.shape.as_slice(), &dev)?,
                    );
                    Ok(total_loss(&sep, &loss, &p, &mix, &target, kind)?.to_scalar::<f64>()?)
                };
                let num = (eval(h)? - eval(-h)?) / (2.0 * h);
                let err = (num - g[i]).abs() / num.abs().max(g[i].abs()).max(1e-4);
                assert!(
                    err < 1e-3,
                    "{} [{i}]: analytic {} vs numeric {num} (rel {err:e})",
                    spec.name,
                    g[i]
                );
                worst = worst.max(err);
                checked += 1;
            }
        }
    }
    assert!(checked >= 2 * sep.param_specs().len());
    eprintln!("{checked} gradient entries checked, worst relative error {worst:e}");
    Ok(())
}

#[test]
fn model_gradients_match_finite_differences_flash() -> R<()> {
    check(AttentionKind::Flash)
}

#[test]
fn model_gradients_match_finite_differences_reference() -> R<()> {
    check(AttentionKind::Reference)
}
