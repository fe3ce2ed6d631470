//! Forward + backward of one time-transformer block and of the whole separator (with the
//! default training loss) at the project's CPU bench size: dim 64, 2 layers, 4 heads, FFN 256,
//! mask hidden 256, n_fft 2048, hop 512, 62 bands, 2 s stereo at 44.1 kHz, batch 2.

use candle_core::{DType, Device, Tensor, Var};
use criterion::{Criterion, criterion_group, criterion_main};
use sepdist_config::{Bands, LossConfig, ModelConfig};
use sepdist_model::loss::SeparationLoss;
use sepdist_model::{ForwardContext, ModelError, Separator};
use std::collections::BTreeMap;

const SAMPLES: usize = 88_200;
const BATCH: usize = 2;

fn bench_config() -> ModelConfig {
    ModelConfig {
        n_fft: 2048,
        hop_length: 512,
        bands: Bands::BsRoformer62,
        n_layers: 2,
        emb_dim: 64,
        n_heads: 4,
        ffn_hidden_dim: [256, 256],
        mask_hidden_dim: Some(256),
        mask_depth: 2,
    }
}

struct Setup {
    sep: Separator,
    params: BTreeMap<String, Tensor>,
    mix: Tensor,
    target: Tensor,
    loss: SeparationLoss,
}

fn setup() -> Result<Setup, ModelError> {
    let dev = Device::Cpu;
    let sep = Separator::new(&bench_config(), 4)?;
    // Var-backed tensors: the backward computes parameter gradients as in training.
    let params = sep
        .init_params(0, &dev, DType::F32)?
        .into_iter()
        .map(|(k, t)| Ok((k, Var::from_tensor(&t)?.as_tensor().clone())))
        .collect::<Result<_, ModelError>>()?;
    let mix = Tensor::randn(0f32, 0.1, (BATCH, 2, SAMPLES), &dev)?;
    let target = Tensor::randn(0f32, 0.05, (BATCH, 4, 2, SAMPLES), &dev)?;
    let loss = SeparationLoss::new(&LossConfig::default())?;
    Ok(Setup {
        sep,
        params,
        mix,
        target,
        loss,
    })
}

/// Forward + backward of `layers.0.time` on a prepared input (STFT and band split excluded).
fn time_block(s: &Setup, ctx: &ForwardContext, x: &Tensor) -> Result<(), ModelError> {
    let x = Var::from_tensor(x)?;
    let block = &s.sep.blocks()[1];
    let y = block.forward(&s.sep.block_params(block, &s.params)?, x.as_tensor(), ctx)?;
    let g = y.ones_like()?;
    (y * g)?.sum_all()?.backward()?;
    Ok(())
}

/// The input of `layers.0.time`: the band-split output, detached.
fn time_block_input(s: &Setup) -> Result<(ForwardContext, Tensor), ModelError> {
    let ctx = s.sep.prepare_context(&s.mix)?;
    let split = &s.sep.blocks()[0];
    let x = split.forward(
        &s.sep.block_params(split, &s.params)?,
        ctx.first_input(),
        &ctx,
    )?;
    Ok((ctx, x.detach()))
}

fn whole_model(s: &Setup) -> Result<(), ModelError> {
    let est = s.sep.forward(&s.params, &s.mix)?;
    s.loss.compute(&est, &s.target)?.total.backward()?;
    Ok(())
}

fn benches(c: &mut Criterion) {
    let (s, ctx, x) = match setup().and_then(|s| time_block_input(&s).map(|(c, x)| (s, c, x))) {
        Ok(v) => v,
        Err(e) => panic!("bench setup failed: {e}"),
    };
    let mut g = c.benchmark_group("model");
    g.sample_size(10);
    g.bench_function("time_block_fwd_bwd", |b| {
        b.iter(|| time_block(&s, &ctx, &x).map_err(|e| e.to_string()))
    });
    g.bench_function("separator_fwd_bwd_loss", |b| {
        b.iter(|| whole_model(&s).map_err(|e| e.to_string()))
    });
    g.finish();
}

criterion_group!(model, benches);
criterion_main!(model);
