//! Helpers shared by the engine tests: a tiny model and loss, deterministic pseudo-audio, one
//! micro-batch's loss and flat gradient.
// Each test file compiles this module on its own and uses a different part of it.
#![allow(dead_code, clippy::unwrap_used)]

use candle_core::{Device, Tensor};
use sepdist_config::{Bands, LossConfig, ModelConfig};
use sepdist_train::engine::Engine;

/// Sources of the tiny model.
pub const SOURCES: usize = 2;

pub fn tiny_model() -> ModelConfig {
    ModelConfig {
        n_fft: 64,
        hop_length: 16,
        bands: Bands::Widths(vec![4, 4, 8, 17]),
        n_layers: 2,
        emb_dim: 8,
        n_heads: 2,
        ffn_hidden_dim: [16, 12],
        mask_hidden_dim: Some(16),
        mask_depth: 2,
    }
}

pub fn tiny_loss() -> LossConfig {
    LossConfig {
        multi_stft_resolution_loss_weight: 0.5,
        multi_stft_resolutions_window_sizes: vec![64, 32],
        multi_stft_hop_size: 16,
        multi_stft_min_n_fft: 32,
        ..LossConfig::default()
    }
}

/// Deterministic pseudo-audio without an RNG dependency: the mixture `[B, 2, n]` and its
/// [`SOURCES`] sources `[B, S, 2, n]`.
pub fn pseudo_audio(batch: usize, seed: u64, n: usize) -> (Tensor, Tensor) {
    let wave = |k: usize, phase: f64| -> f32 {
        ((k as f64 * 0.173 + phase).sin() * 0.3 + (k as f64 * 0.0137 * phase).cos() * 0.2) as f32
    };
    let mut stems = Vec::with_capacity(batch * SOURCES * 2 * n);
    for b in 0..batch {
        for s in 0..SOURCES {
            for c in 0..2 {
                let phase = (seed as usize * 31 + b * 7 + s * 3 + c) as f64;
                stems.extend((0..n).map(|k| wave(k, phase)));
            }
        }
    }
    let stems = Tensor::from_vec(stems, (batch, SOURCES, 2, n), &Device::Cpu).unwrap();
    let mixture = stems.sum(1).unwrap();
    (mixture, stems)
}

/// One micro-batch's loss and flat gradient.
pub fn grads(e: &Engine, mixture: &Tensor, target: &Tensor) -> (f64, Vec<f32>) {
    let mut g = vec![0.0; e.layout().len];
    let loss = e.forward_backward(mixture, target, &mut g).unwrap();
    (loss.total, g)
}
