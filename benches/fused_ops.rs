//! The transformer layer with fused ops (`Block::forward`) against the same layer composed of
//! candle ops as before the fusion (transposed copies, composed RMSNorm and RoPE, matmul +
//! bias + GELU), forward + backward, at the CPU bench size: `[2, 173, 62, 64]` (2 s stereo at
//! 44.1 kHz, n_fft 2048, hop 512, 62 bands), 4 heads, FFN 256. Time and band layers.

use candle_core::{DType, Device, Result, Tensor, Var};
use criterion::{Criterion, criterion_group, criterion_main};
use sepdist_config::{Bands, ModelConfig};
use sepdist_model::ops::norm::rms_norm_composed;
use sepdist_model::ops::{Rope, flash_attention};
use sepdist_model::{ForwardContext, RMS_EPS, ROPE_BASE, Separator};
use std::collections::BTreeMap;

const SAMPLES: usize = 88_200;

fn bench_config() -> ModelConfig {
    ModelConfig {
        n_fft: 2048,
        hop_length: 512,
        bands: Bands::BsRoformer62,
        n_layers: 1,
        emb_dim: 64,
        n_heads: 4,
        ffn_hidden_dim: [256, 256],
        mask_hidden_dim: Some(256),
        mask_depth: 2,
    }
}

/// The layer as composed before the fused ops, over `xs` `[N, L, D]` (flash attention).
fn composed_layer(
    p: &BTreeMap<String, Tensor>,
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
    let o = flash_attention(&q, &k, &v, (dh as f64).powf(-0.5))?;
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

struct Setup {
    sep: Separator,
    params: BTreeMap<String, Tensor>,
    ctx: ForwardContext,
    x: Tensor,
}

fn setup() -> std::result::Result<Setup, Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let sep = Separator::new(&bench_config(), 4)?;
    let params = sep
        .init_params(0, &dev, DType::F32)?
        .into_iter()
        .map(|(k, t)| Ok((k, Var::from_tensor(&t)?.as_tensor().clone())))
        .collect::<Result<_>>()?;
    let mix = Tensor::randn(0f32, 0.1, (2, 2, SAMPLES), &dev)?;
    let ctx = sep.prepare_context(&mix)?;
    let (b, t) = ctx.batch_frames()?;
    let x = Tensor::randn(0f32, 1.0, (b, t, sep.dims().layout.n_bands(), 64), &dev)?;
    Ok(Setup {
        sep,
        params,
        ctx,
        x,
    })
}

/// Forward + backward of `⟨1, y⟩` with the input as a variable.
fn fwd_bwd(f: impl Fn(&Tensor) -> Result<Tensor>, x: &Tensor) -> Result<()> {
    let x = Var::from_tensor(x)?;
    let y = f(x.as_tensor())?;
    std::hint::black_box(y.sum_all()?.backward()?);
    Ok(())
}

fn benches(c: &mut Criterion) {
    let s = match setup() {
        Ok(s) => s,
        Err(e) => panic!("bench setup failed: {e}"),
    };
    let (b, t, k, d) = match s.x.dims4() {
        Ok(v) => v,
        Err(e) => panic!("{e}"),
    };
    let mut g = c.benchmark_group("fused_ops");
    g.sample_size(10);
    for (i, name) in [(1, "time"), (2, "band")] {
        let block = &s.sep.blocks()[i];
        let params = match s.sep.block_params(block, &s.params) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        g.bench_function(format!("{name}_layer_fused_fwd_bwd"), |bench| {
            bench.iter(|| {
                fwd_bwd(
                    |x| {
                        block
                            .forward(&params, x, &s.ctx)
                            .map_err(|e| candle_core::Error::Msg(e.to_string()))
                    },
                    &s.x,
                )
                .map_err(|e| e.to_string())
            })
        });
        let len = if i == 1 { t } else { k };
        let rope = match Rope::new(len, d / 4, ROPE_BASE, &Device::Cpu, DType::F32) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        };
        g.bench_function(format!("{name}_layer_composed_fwd_bwd"), |bench| {
            bench.iter(|| {
                fwd_bwd(
                    |x| {
                        if i == 1 {
                            let xs = x.transpose(1, 2)?.contiguous()?.reshape((b * k, t, d))?;
                            composed_layer(&s.params, block.name(), &xs, &rope, 4)?
                                .reshape((b, k, t, d))?
                                .transpose(1, 2)?
                                .contiguous()
                        } else {
                            let xs = x.reshape((b * t, k, d))?;
                            composed_layer(&s.params, block.name(), &xs, &rope, 4)?
                                .reshape((b, t, k, d))
                        }
                    },
                    &s.x,
                )
                .map_err(|e| e.to_string())
            })
        });
    }
    g.finish();
}

criterion_group!(fused, benches);
criterion_main!(fused);
