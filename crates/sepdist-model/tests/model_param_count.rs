//! The closed-form parameter count equals the scalars the model creates.

use candle_core::{DType, Device};
use sepdist_config::{Bands, ModelConfig};
use sepdist_model::params::count_scalars;
use sepdist_model::{Separator, flops_per_sample, param_count};

type R<T> = Result<T, Box<dyn std::error::Error>>;

fn preset(n_layers: usize, emb_dim: usize, n_heads: usize, ffn: usize) -> ModelConfig {
    ModelConfig {
        n_fft: 2048,
        hop_length: 512,
        bands: Bands::BsRoformer62,
        n_layers,
        emb_dim,
        n_heads,
        ffn_hidden_dim: [ffn, ffn],
        mask_hidden_dim: Some(4 * emb_dim),
        mask_depth: 2,
    }
}

#[test]
fn model_param_count_matches_presets() -> R<()> {
    for (name, cfg) in [
        ("musdb18_xlarge", preset(12, 256, 16, 1024)),
        ("musdb18_memory_optimized", preset(8, 192, 12, 768)),
        ("musdb18_small", preset(6, 128, 8, 512)),
    ] {
        let sep = Separator::new(&cfg, 4)?;
        let specs = sep.param_specs();
        assert_eq!(count_scalars(&specs), param_count(&cfg, 4), "{name}");
        assert_eq!(sep.num_params(), param_count(&cfg, 4), "{name}");
        // Names are unique and sorted; per-block specs partition the whole list.
        assert!(specs.windows(2).all(|w| w[0].name < w[1].name), "{name}");
        let per_block: usize = sep.blocks().iter().map(|b| b.param_specs().len()).sum();
        assert_eq!(per_block, specs.len());
        // bs_roformer_62 has 7 distinct band widths, hence 7 batched groups.
        assert_eq!(sep.dims().layout.groups.len(), 7);
        assert!(flops_per_sample(&cfg, 4, 441_000) > 0.0);
        let shape = |n: &str| specs.iter().find(|s| s.name == n).map(|s| s.shape.clone());
        let d = cfg.emb_dim;
        assert_eq!(
            shape("band_split.groups.0.linear.weight"),
            Some(vec![24, 8, d])
        );
        assert_eq!(shape("band_split.groups.6.norm.gamma"), Some(vec![1, 516]));
        assert_eq!(shape("layers.0.band.attn.qkv.weight"), Some(vec![3 * d, d]));
        assert_eq!(
            shape("layers.1.time.ff.fc1.bias"),
            Some(vec![cfg.ffn_hidden_dim[0]])
        );
        assert_eq!(
            shape("mask_estimators.3.groups.6.layers.1.weight"),
            Some(vec![1, 4 * d, 2 * 516])
        );
        assert_eq!(shape("final_norm.gamma"), Some(vec![d]));
    }
    assert_eq!(param_count(&preset(12, 256, 16, 1024), 4), 118_872_868);
    Ok(())
}

#[test]
fn model_param_count_matches_allocated_tensors() -> R<()> {
    // Odd shapes: mask depth 1 and 3, unequal FFN widths, default mask width.
    for depth in [1, 3] {
        let cfg = ModelConfig {
            n_fft: 64,
            hop_length: 16,
            bands: Bands::Widths(vec![3, 2, 3, 25]),
            n_layers: 2,
            emb_dim: 12,
            n_heads: 3,
            ffn_hidden_dim: [20, 8],
            mask_hidden_dim: None,
            mask_depth: depth,
        };
        let sep = Separator::new(&cfg, 3)?;
        let params = sep.init_params(0, &Device::Cpu, DType::F32)?;
        let created: usize = params.values().map(|t| t.elem_count()).sum();
        assert_eq!(created as u64, param_count(&cfg, 3));
        assert_eq!(params.len(), sep.param_specs().len());
    }
    Ok(())
}

#[test]
fn model_flops_closed_form_small_case() -> R<()> {
    // One band of 3 bins (n_fft 4), no layers, mask depth 1: band split + mask + FFTs only.
    let cfg = ModelConfig {
        n_fft: 4,
        hop_length: 2,
        bands: Bands::Widths(vec![3]),
        n_layers: 0,
        emb_dim: 2,
        n_heads: 1,
        ffn_hidden_dim: [4, 4],
        mask_hidden_dim: Some(4),
        mask_depth: 1,
    };
    let t = 5.0; // 8 samples / hop 2 + 1
    let fft = 5.0 * 4.0 * 2.0;
    let expected = (2.0 + 2.0) * t * fft + 2.0 * t * 12.0 * 2.0 + t * 2.0 * 2.0 * 24.0;
    assert!((flops_per_sample(&cfg, 1, 8) - expected).abs() < 1e-9);
    // A transformer layer adds its matmuls: qkv, QKᵀ, PV, out, two FFN linears per axis.
    let one = ModelConfig {
        n_layers: 1,
        ..cfg.clone()
    };
    let (d, i, k) = (2.0, 2.0, 1.0);
    let time = 2.0 * t * d * 3.0 * i + 4.0 * t * t * i + 2.0 * t * i * d + 2.0 * t * 2.0 * d * 4.0;
    let band =
        2.0 * t * d * 3.0 * i + 4.0 * t * k * k * i + 2.0 * t * i * d + 2.0 * t * 2.0 * d * 4.0;
    let diff = flops_per_sample(&one, 1, 8) - flops_per_sample(&cfg, 1, 8);
    assert!(
        (diff - time - band).abs() < 1e-9,
        "{diff} vs {}",
        time + band
    );
    Ok(())
}
