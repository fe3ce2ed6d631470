//! The flat-buffer side of a training step on the model of configs/bench_cpu.yaml (13.0 M
//! parameters): AdamW over the flat buffer, the global gradient norm,
//! copying the parameters out of the model into the flat buffer and back (what the trainer does
//! around every optimizer step), and splitting the flat buffer into named tensors (checkpoints).

use candle_core::{DType, Device};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sepdist_config::{LossConfig, OptimizerConfig};
use sepdist_model::Separator;
use sepdist_model::loss::SeparationLoss;
use sepdist_train::engine::Engine;
use sepdist_train::optim::{AdamW, AdamWHyper, sum_of_squares};
use std::hint::black_box;

fn engine() -> Result<Engine, Box<dyn std::error::Error>> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/bench_cpu.yaml");
    let cfg = sepdist_config::load_file(&path, &[])?;
    let sep = Separator::with_sources(&cfg.model, &cfg.dataset.sources)?;
    let init = sep.init_params(0, &Device::Cpu, DType::F32)?;
    let loss = SeparationLoss::new(&LossConfig::default())?;
    Ok(Engine::new(sep, loss, &init, false, Device::Cpu)?)
}

fn benches(c: &mut Criterion) {
    let engine = match engine() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("optimizer bench: cannot build the model: {e}");
            return;
        }
    };
    let Ok(mut flat) = engine.flat_params() else {
        eprintln!("optimizer bench: cannot read the parameters");
        return;
    };
    let n = flat.len();
    let grads: Vec<f32> = (0..n).map(|i| ((i % 97) as f32 - 48.0) * 1e-4).collect();
    let mut g = c.benchmark_group("flat");
    g.sample_size(20)
        .throughput(Throughput::Bytes((n * 4) as u64));
    let mut adam = AdamW::new(AdamWHyper::from(&OptimizerConfig::default()), n);
    g.bench_function("adamw_update", |b| {
        b.iter(|| adam.update(black_box(&mut flat), black_box(&grads), 3e-4))
    });
    g.bench_function("grad_sum_of_squares", |b| {
        b.iter(|| sum_of_squares(black_box(&grads)))
    });
    g.bench_function("flatten_params", |b| b.iter(|| engine.flat_params()));
    g.bench_function("unflatten_into_model", |b| {
        b.iter(|| engine.load_flat(black_box(&flat)))
    });
    g.bench_function("unflatten_named_tensors", |b| {
        b.iter(|| engine.layout().unflatten(black_box(&flat)))
    });
    g.finish();
}

criterion_group!(optimizer, benches);
criterion_main!(optimizer);
