#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions
//! The engine runs the head and the loss one source at a time: with source weights and all
//! three loss parts, its gradients and loss values equal one backward through the whole graph;
//! the head's pieces cover its parameters; the probe and the `block_done` hook see each block
//! once, in order.

use candle_core::{DType, Device, Tensor, Var};
use sepdist_config::{Bands, LossConfig, ModelConfig};
use sepdist_model::Separator;
use sepdist_model::loss::SeparationLoss;
use sepdist_train::engine::{Engine, EngineEvent};
use std::sync::{Arc, Mutex};

fn tiny_model() -> ModelConfig {
    ModelConfig {
        n_fft: 64,
        hop_length: 16,
        bands: Bands::Widths(vec![4, 4, 8, 17]),
        n_layers: 1,
        emb_dim: 8,
        n_heads: 2,
        ffn_hidden_dim: [16, 12],
        mask_hidden_dim: Some(16),
        mask_depth: 2,
    }
}

fn sources() -> Vec<String> {
    ["vocals", "bass", "drums"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn weighted_loss() -> LossConfig {
    LossConfig {
        l1_weight: 0.7,
        mse_weight: 0.4,
        multi_stft_resolution_loss_weight: 0.5,
        multi_stft_resolutions_window_sizes: vec![64, 32],
        multi_stft_hop_size: 16,
        multi_stft_min_n_fft: 32,
        source_weights: [("bass".to_string(), 2.5), ("drums".to_string(), 0.5)]
            .into_iter()
            .collect(),
    }
}

const N: usize = 320;

fn engine(recompute: bool) -> Engine {
    let sep = Separator::with_sources(&tiny_model(), &sources()).unwrap();
    let init = sep.init_params(3, &Device::Cpu, DType::F32).unwrap();
    let loss = SeparationLoss::for_sources(&weighted_loss(), &sources()).unwrap();
    Engine::new(sep, loss, &init, recompute, Device::Cpu).unwrap()
}

fn data(batch: usize) -> (Tensor, Tensor) {
    let s = sources().len();
    let stems: Vec<f32> = (0..batch * s * 2 * N)
        .map(|k| ((k as f64 * 0.0731).sin() * 0.4 + (k as f64 * 0.00913).cos() * 0.1) as f32)
        .collect();
    let stems = Tensor::from_vec(stems, (batch, s, 2, N), &Device::Cpu).unwrap();
    (stems.sum(1).unwrap(), stems)
}

fn max_rel_diff(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().map(|x| x.abs()).fold(0f32, f32::max).max(1e-12) as f64;
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() as f64 / scale)
        .fold(0.0, f64::max)
}

#[test]
fn per_source_head_with_source_weights_equals_one_backward_through_the_whole_graph() {
    let (mix, target) = data(2);
    for recompute in [false, true] {
        let e = engine(recompute);
        let mut g = vec![0.0f32; e.layout().len];
        let values = e.forward_backward(&mix, &target, &mut g).unwrap();

        // Reference: the whole separator and `compute` on all sources, one backward.
        let flat = e.flat_params().unwrap();
        let vars: Vec<Var> = e
            .layout()
            .specs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let t = Tensor::from_slice(
                    &flat[e.layout().range(i)],
                    s.shape.as_slice(),
                    &Device::Cpu,
                )
                .unwrap();
                Var::from_tensor(&t).unwrap()
            })
            .collect();
        let params = e
            .layout()
            .specs
            .iter()
            .zip(&vars)
            .map(|(s, v)| (s.name.clone(), v.as_tensor().clone()))
            .collect();
        let estimate = e.separator().forward(&params, &mix).unwrap();
        let parts = SeparationLoss::for_sources(&weighted_loss(), &sources())
            .unwrap()
            .compute(&estimate, &target)
            .unwrap();
        let scalar = |t: &Tensor| t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
        for (got, want, what) in [
            (values.total, scalar(&parts.total), "total"),
            (values.waveform, scalar(&parts.waveform), "waveform"),
            (values.mse, scalar(&parts.mse), "mse"),
            (values.multi_stft, scalar(&parts.multi_stft), "multi_stft"),
        ] {
            assert!(
                (got - want).abs() <= 1e-6 * want.abs(),
                "{what}: engine {got}, whole graph {want}"
            );
        }
        let store = parts.total.backward().unwrap();
        let mut reference = vec![0.0f32; e.layout().len];
        for (i, v) in vars.iter().enumerate() {
            let gi = store.get(v.as_tensor()).unwrap().flatten_all().unwrap();
            reference[e.layout().range(i)].copy_from_slice(&gi.to_vec1::<f32>().unwrap());
        }
        let d = max_rel_diff(&g, &reference);
        println!("recompute {recompute}: max relative gradient difference {d:e}");
        assert!(
            d < 1e-6,
            "recompute {recompute}: max relative difference {d}"
        );
        // Every mask estimator gets a gradient (none of the weights is 0).
        for s in 0..e.head_sources() {
            let own = &e.head_source_params(s)[1..];
            assert!(
                own.iter()
                    .any(|&i| g[e.layout().range(i)].iter().any(|&x| x != 0.0)),
                "source {s}'s mask estimator got no gradient"
            );
        }
    }
}

#[test]
fn head_pieces_cover_the_head_and_name_their_source() {
    let e = engine(false);
    assert_eq!(e.head_sources(), 3);
    let head: Vec<usize> = e.block_param_indices().last().unwrap().clone();
    let mut covered: Vec<usize> = Vec::new();
    for (s, name) in sources().iter().enumerate() {
        let piece = e.head_source_params(s);
        assert!(piece.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(e.layout().specs[piece[0]].name, "final_norm.gamma");
        for &i in &piece[1..] {
            let n = &e.layout().specs[i].name;
            assert!(
                n.starts_with(&format!("mask_estimators.{name}.")),
                "{name}: {n}"
            );
            assert!(head.contains(&i));
        }
        covered.extend_from_slice(piece);
    }
    assert!(e.head_source_params(3).is_empty());
    covered.sort_unstable();
    covered.dedup();
    let mut head = head;
    head.sort_unstable();
    assert_eq!(covered, head, "the pieces are the head's parameters");
}

#[test]
fn probe_and_block_hook_see_each_block_once_in_order() {
    let mut e = engine(false);
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&events);
    e.set_probe(Some(Arc::new(move |ev| sink.lock().unwrap().push(ev))));
    let (mix, target) = data(1);
    let mut g = vec![0.0f32; e.layout().len];
    let mut done = Vec::new();
    e.forward_backward_with::<sepdist_model::ModelError>(&mix, &target, &mut g, |i, _| {
        done.push(i);
        Ok(())
    })
    .unwrap();
    let blocks = e.separator().blocks().len();
    let last = blocks - 1;
    let mut want = vec![EngineEvent::ForwardStart];
    want.extend((0..blocks).map(EngineEvent::BlockForward));
    want.push(EngineEvent::BackwardStart);
    want.extend((0..blocks).rev().map(EngineEvent::BlockBackward));
    assert_eq!(*events.lock().unwrap(), want);
    assert_eq!(done, (0..=last).rev().collect::<Vec<_>>());
    // A target without the model's sources is an error, not a panic.
    let wrong = target.narrow(1, 0, 2).unwrap();
    assert!(e.forward_backward(&mix, &wrong, &mut g).is_err());
}
