#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions
//! The block-wise engine against one backward through the whole graph, with and without
//! activation checkpointing, and micro-batch accumulation against one large batch.

use candle_core::{DType, Device, Tensor};
use sepdist_model::Separator;
use sepdist_model::loss::SeparationLoss;
use sepdist_train::engine::Engine;

mod engine_util;
use engine_util::{SOURCES, grads, pseudo_audio, tiny_loss, tiny_model};

const N: usize = 320;

fn engine(recompute: bool) -> Engine {
    let sep = Separator::new(&tiny_model(), SOURCES).unwrap();
    let init = sep.init_params(7, &Device::Cpu, DType::F32).unwrap();
    let loss = SeparationLoss::new(&tiny_loss()).unwrap();
    Engine::new(sep, loss, &init, recompute, Device::Cpu).unwrap()
}

fn data(batch: usize, seed: u64) -> (Tensor, Tensor) {
    pseudo_audio(batch, seed, N)
}

fn max_rel_diff(a: &[f32], b: &[f32]) -> f64 {
    let scale = a.iter().map(|x| x.abs()).fold(0f32, f32::max).max(1e-12) as f64;
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() as f64 / scale)
        .fold(0.0, f64::max)
}

#[test]
fn blockwise_gradients_equal_one_backward_through_the_whole_graph() {
    let e = engine(false);
    let (mix, target) = data(2, 1);
    let (loss, g) = grads(&e, &mix, &target);

    // Reference: the whole separator as one graph, one backward.
    let sep = e.separator();
    let vars: Vec<candle_core::Var> = e
        .layout()
        .specs
        .iter()
        .zip(e.layout().offsets.iter())
        .map(|(s, _)| {
            let flat = e.flat_params().unwrap();
            let i = e
                .layout()
                .specs
                .iter()
                .position(|x| x.name == s.name)
                .unwrap();
            let t =
                Tensor::from_slice(&flat[e.layout().range(i)], s.shape.as_slice(), &Device::Cpu)
                    .unwrap();
            candle_core::Var::from_tensor(&t).unwrap()
        })
        .collect();
    let params = e
        .layout()
        .specs
        .iter()
        .zip(&vars)
        .map(|(s, v)| (s.name.clone(), v.as_tensor().clone()))
        .collect();
    let estimate = sep.forward(&params, &mix).unwrap();
    let parts = SeparationLoss::new(&tiny_loss())
        .unwrap()
        .compute(&estimate, &target)
        .unwrap();
    let reference_loss = parts.total.to_scalar::<f32>().unwrap() as f64;
    let store = parts.total.backward().unwrap();
    let mut reference = vec![0.0f32; e.layout().len];
    for (i, v) in vars.iter().enumerate() {
        let gi = store.get(v.as_tensor()).unwrap().flatten_all().unwrap();
        reference[e.layout().range(i)].copy_from_slice(&gi.to_vec1::<f32>().unwrap());
    }
    assert!((loss - reference_loss).abs() <= 1e-6 * reference_loss.abs());
    let d = max_rel_diff(&g, &reference);
    assert!(d < 1e-6, "max relative difference {d}");
    assert!(g.iter().any(|&x| x != 0.0));
}

#[test]
fn checkpointing_gives_identical_gradients() {
    let (mix, target) = data(2, 2);
    let (l0, g0) = grads(&engine(false), &mix, &target);
    let (l1, g1) = grads(&engine(true), &mix, &target);
    assert_eq!(l0, l1);
    let d = max_rel_diff(&g0, &g1);
    assert!(d < 1e-6, "max relative difference {d}");
}

/// The GPU's path on the CPU (`ops::with_composed_ops`: the fused ops' composed twins, the
/// blocks' composed hand-written backwards) gives the
/// fused path's loss and gradients, kept and checkpointed.
#[test]
fn the_composed_path_gives_the_fused_paths_gradients() {
    let (mix, target) = data(2, 3);
    for recompute in [false, true] {
        let (l0, g0) = grads(&engine(recompute), &mix, &target);
        let (l1, g1) =
            sepdist_model::ops::with_composed_ops(|| grads(&engine(recompute), &mix, &target));
        assert!((l0 - l1).abs() <= 1e-6 * l0.abs(), "loss {l0} against {l1}");
        let d = max_rel_diff(&g0, &g1);
        assert!(
            d < 1e-5,
            "recompute {recompute}: max relative difference {d}"
        );
        assert!(g1.iter().any(|&x| x != 0.0));
    }
}

#[test]
fn micro_batches_accumulate_to_the_large_batch_gradient() {
    let e = engine(false);
    let (mix, target) = data(4, 3);
    let (_, whole) = grads(&e, &mix, &target);
    let mut acc = vec![0.0f32; e.layout().len];
    for k in 0..2 {
        let m = mix.narrow(0, 2 * k, 2).unwrap();
        let t = target.narrow(0, 2 * k, 2).unwrap();
        e.forward_backward(&m, &t, &mut acc).unwrap();
    }
    let acc: Vec<f32> = acc.iter().map(|x| x / 2.0).collect();
    let d = max_rel_diff(&whole, &acc);
    assert!(d < 1e-6, "max relative difference {d}");
}

#[test]
fn flat_parameters_round_trip() {
    let e = engine(false);
    let flat = e.flat_params().unwrap();
    let shifted: Vec<f32> = flat.iter().map(|x| x + 1.0).collect();
    e.load_flat(&shifted).unwrap();
    assert_eq!(e.flat_params().unwrap(), shifted);
}
