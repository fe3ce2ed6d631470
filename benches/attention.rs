//! Custom-op benches: flash attention vs the reference (forward and forward+backward) over the
//! sequence length at B·H = 16, Dh = 16, and STFT / iSTFT forward+backward of a 2 s stereo
//! batch at n_fft 2048, hop 512.

use candle_core::{DType, Device, Result, Tensor, Var};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use sepdist_model::ops::{Stft, flash_attention, reference_attention};

type AttnFn = fn(&Tensor, &Tensor, &Tensor, f64) -> Result<Tensor>;

const BH: usize = 16;
const DH: usize = 16;
/// The reference materialises several `BH×T×T` score tensors: skip it above this length.
const REFERENCE_MAX_T: usize = 1024;

fn qkv(t: usize) -> Result<(Var, Var, Var)> {
    let dev = Device::Cpu;
    let make = || Var::from_tensor(&Tensor::randn(0f32, 1., (1, BH, t, DH), &dev)?);
    Ok((make()?, make()?, make()?))
}

fn fwd(f: AttnFn, q: &Var, k: &Var, v: &Var) -> Result<Tensor> {
    f(q, k, v, (DH as f64).powf(-0.5))
}

fn fwd_bwd(f: AttnFn, q: &Var, k: &Var, v: &Var) -> Result<()> {
    let grads = fwd(f, q, k, v)?.sum_all()?.backward()?;
    std::hint::black_box(grads);
    Ok(())
}

fn bench_attention(c: &mut Criterion) {
    let mut group = c.benchmark_group("attention");
    group.sample_size(10);
    for t in [128usize, 256, 512, 1024] {
        let Ok((q, k, v)) = qkv(t) else {
            eprintln!("attention bench: could not build inputs for T = {t}");
            continue;
        };
        let mut impls: Vec<(&str, AttnFn)> = vec![("flash", flash_attention)];
        if t <= REFERENCE_MAX_T {
            impls.push(("reference", reference_attention));
        }
        for (name, f) in impls {
            group.bench_with_input(BenchmarkId::new(format!("{name}/fwd"), t), &t, |b, _| {
                b.iter(|| fwd(f, &q, &k, &v).map(std::hint::black_box))
            });
            group.bench_with_input(
                BenchmarkId::new(format!("{name}/fwd+bwd"), t),
                &t,
                |b, _| b.iter(|| fwd_bwd(f, &q, &k, &v)),
            );
        }
    }
    group.finish();
}

fn stft_fwd_bwd(stft: &Stft, x: &Var) -> Result<()> {
    let spec = stft.forward(x)?;
    let y = stft.inverse(&spec, x.dim(2)?)?;
    let grads = y.sqr()?.sum_all()?.backward()?;
    std::hint::black_box(grads);
    Ok(())
}

fn bench_stft(c: &mut Criterion) {
    let mut group = c.benchmark_group("stft");
    group.sample_size(10);
    let setup = || -> Result<(Stft, Var)> {
        // 2 s of stereo at 44.1 kHz, batch 2.
        let x = Tensor::randn(0f32, 1., (2, 2, 88_200), &Device::Cpu)?;
        Ok((
            Stft::new(2048, 512, 2048)?,
            Var::from_tensor(&x.to_dtype(DType::F32)?)?,
        ))
    };
    match setup() {
        Ok((stft, x)) => {
            group.bench_function("stft/fwd 2x2x88200 n_fft2048 hop512", |b| {
                b.iter(|| stft.forward(&x).map(std::hint::black_box))
            });
            group.bench_function("stft+istft/fwd+bwd 2x2x88200 n_fft2048 hop512", |b| {
                b.iter(|| stft_fwd_bwd(&stft, &x))
            });
        }
        Err(e) => eprintln!("stft bench setup failed: {e}"),
    }
    group.finish();
}

criterion_group!(benches, bench_attention, bench_stft);
criterion_main!(benches);
