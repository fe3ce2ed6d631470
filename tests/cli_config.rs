#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions
//! The `sepdist config` commands through the real binary: every shipped config passes,
//! errors are one clear line with exit code 2.

mod common;
use common::{run as sepdist, text};

use std::path::{Path, PathBuf};

fn config_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("configs/ exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_shipped_config_passes_check() {
    let files = config_files();
    for name in [
        "quickstart.yaml",
        "musdb18_xlarge.yaml",
        "musdb18_memory_optimized.yaml",
        "musdb18_small.yaml",
    ] {
        assert!(
            files.iter().any(|f| f.ends_with(name)),
            "configs/{name} is missing"
        );
    }
    for file in files {
        let out = sepdist(&["config", "check", file.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}: {}",
            file.display(),
            text(&out.stderr)
        );
        assert!(text(&out.stdout).ends_with(": ok\n"));
    }
}

#[test]
fn presets_carry_the_guide_values() {
    // (file, batch_size, accumulation, segment_length, n_layers, emb_dim, n_heads, ffn, checkpointing)
    let rows = [
        ("musdb18_xlarge", 8, 2, 661500, 12, 256, 16, 1024, false),
        (
            "musdb18_memory_optimized",
            1,
            8,
            441000,
            8,
            192,
            12,
            768,
            false,
        ),
        ("musdb18_small", 1, 8, 220500, 6, 128, 8, 512, true),
    ];
    for (name, batch, accum, segment, layers, emb, heads, ffn, ckpt) in rows {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("configs/{name}.yaml"));
        let c = sepdist_config::load_file(&path, &[]).unwrap();
        assert_eq!(c.training.batch_size, batch, "{name}");
        assert_eq!(c.training.gradient_accumulation_steps, accum, "{name}");
        assert_eq!(c.dataset.segment_length, segment, "{name}");
        assert_eq!(c.model.n_layers, layers, "{name}");
        assert_eq!(c.model.emb_dim, emb, "{name}");
        assert_eq!(c.model.n_heads, heads, "{name}");
        assert_eq!(c.model.ffn_hidden_dim, [ffn, ffn], "{name}");
        assert_eq!(c.training.gradient_checkpointing, ckpt, "{name}");
    }
}

#[test]
fn every_shipped_config_creates_as_many_scalars_as_the_closed_form_parameter_count() {
    for file in config_files() {
        let c = sepdist_config::load_file(&file, &[]).unwrap();
        let sources = c.dataset.sources.len();
        let model = sepdist_model::Separator::new(&c.model, sources).unwrap();
        // The scalars actually created (one preset at a time: xlarge is 475 MB in fp32).
        let created: usize = model
            .init_params(0, &candle_core::Device::Cpu, candle_core::DType::F32)
            .unwrap()
            .values()
            .map(|t| t.elem_count())
            .sum();
        assert_eq!(
            created as u64,
            sepdist_model::param_count(&c.model, sources),
            "{}",
            file.display()
        );
        assert_eq!(model.num_params(), created as u64);
    }
}

#[test]
fn show_prints_a_loadable_resolved_config_with_derived_values() {
    let out = sepdist(&[
        "config",
        "show",
        "configs/musdb18_xlarge.yaml",
        "--set",
        "training.batch_size=2",
        "--world-size",
        "3",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(shown.contains("batch_size: 2"), "{shown}");
    assert!(
        shown.contains("frames per segment: 1292 (661500 samples, 15.00 s)"),
        "{shown}"
    );
    assert!(
        shown.contains("frequency bins: 1025 in 62 bands"),
        "{shown}"
    );
    assert!(
        shown.contains("world size 3: effective batch 2 × 2 × 3 = 12"),
        "{shown}"
    );
    assert!(
        shown.contains("world size 4: effective batch 2 × 2 × 4 = 16"),
        "{shown}"
    );
    let reloaded = sepdist_config::load_str(
        sepdist_config::ConfigSource {
            name: Path::new("shown.yaml"),
            text: &shown,
        },
        &[],
    )
    .unwrap();
    assert_eq!(reloaded.training.batch_size, 2);
    assert_eq!(reloaded.model.mask_hidden_dim, Some(1024));
}

#[test]
fn config_errors_exit_2_with_one_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "training:\n  batch_sise: 2\n").unwrap();
    let out = sepdist(&["config", "check", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert_eq!(
        err,
        format!(
            "error: {}:2:3: unknown key `training.batch_sise`; did you mean `training.batch_size`?\n",
            bad.display()
        )
    );
    assert!(!err.contains("backtrace") && !err.contains("panicked"));

    let out = sepdist(&[
        "config",
        "check",
        "configs/quickstart.yaml",
        "--set",
        "model.n_heads=5",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("model.emb_dim: 64 is not divisible by model.n_heads = 5"));

    let out = sepdist(&["config", "check", "configs/does_not_exist.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr)
            .starts_with("error: cannot read config file configs/does_not_exist.yaml: ")
    );
}

#[test]
fn usage_errors_exit_2() {
    let out = sepdist(&["config", "chek", "x.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    let out = sepdist(&[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("Usage: sepdist"));
}
