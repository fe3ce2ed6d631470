//! Complex masking + iSTFT, and behaviour on silent input.

mod model_util;

use candle_core::{DType, Device, Tensor, Var};
use sepdist_config::{Bands, LossConfig, ModelConfig};
use sepdist_model::loss::SeparationLoss;
use sepdist_model::{Separator, apply_mask_istft};

type R<T> = Result<T, Box<dyn std::error::Error>>;

fn max_abs(t: &Tensor) -> R<f32> {
    Ok(t.abs()?
        .flatten_all()?
        .max(0)?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()?)
}

fn identity_mask_returns_mixture(cfg: &ModelConfig, n: usize) -> R<()> {
    let dev = Device::Cpu;
    let s = 3;
    let sep = Separator::new(cfg, s)?;
    let mix = model_util::normal(&[2, 2, n], 1.0, 1)?.to_dtype(DType::F32)?;
    let ctx = sep.prepare_context(&mix)?;
    let (b, c, f, t, _) = ctx.spec.dims5()?;
    let ones = Tensor::ones((b, s, c, f, t, 1), DType::F32, &dev)?;
    let mask = Tensor::cat(&[&ones, &ones.zeros_like()?], 5)?;
    let out = apply_mask_istft(sep.stft(), &mask, &ctx.spec, n)?;
    assert_eq!(out.dims(), &[2, s, 2, n]);
    let err = max_abs(&out.broadcast_sub(&mix.unsqueeze(1)?)?)?;
    assert!(err < 1e-5, "identity mask error {err}");
    Ok(())
}

#[test]
fn model_identity_mask_returns_mixture() -> R<()> {
    let tiny = ModelConfig {
        n_fft: 64,
        hop_length: 16,
        bands: Bands::Widths(vec![16, 17]),
        n_layers: 0,
        emb_dim: 4,
        n_heads: 1,
        ffn_hidden_dim: [4, 4],
        mask_hidden_dim: Some(4),
        mask_depth: 2,
    };
    identity_mask_returns_mixture(&tiny, 200)?;
    // The real STFT geometry (n_fft 2048, hop 512), length not a multiple of the hop.
    identity_mask_returns_mixture(&ModelConfig::default(), 5000)
}

#[test]
fn model_silent_input_gives_finite_output_and_loss() -> R<()> {
    let dev = Device::Cpu;
    let cfg = ModelConfig {
        n_fft: 64,
        hop_length: 16,
        bands: Bands::Widths(vec![2, 2, 4, 8, 17]),
        n_layers: 1,
        emb_dim: 8,
        n_heads: 2,
        ffn_hidden_dim: [16, 16],
        mask_hidden_dim: Some(16),
        mask_depth: 2,
    };
    let sep = Separator::new(&cfg, 2)?;
    let params = sep.init_params(1, &dev, DType::F32)?;
    let vars = params
        .iter()
        .map(|(k, t)| Ok((k.clone(), Var::from_tensor(t)?)))
        .collect::<R<Vec<_>>>()?;
    let tracked = vars
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let mix = Tensor::zeros((1, 2, 160), DType::F32, &dev)?;
    let out = sep.forward(&tracked, &mix)?;
    assert_eq!(out.dims(), &[1, 2, 2, 160]);
    assert!(max_abs(&out)?.is_finite());
    let loss = SeparationLoss::new(&LossConfig {
        multi_stft_resolutions_window_sizes: vec![64, 32],
        multi_stft_min_n_fft: 64,
        ..LossConfig::default()
    })?;
    let parts = loss.compute(&out, &out.zeros_like()?)?;
    let total = parts.total.to_scalar::<f32>()?;
    assert!(total.is_finite());
    let grads = parts.total.backward()?;
    for (name, v) in &vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            assert!(max_abs(g)?.is_finite(), "{name}");
        }
    }
    Ok(())
}
