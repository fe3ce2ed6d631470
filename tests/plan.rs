#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions
//! `sepdist plan` against the counting allocator: one optimizer step of small configs through
//! the real binary, the peak allocated bytes of `metrics.jsonl` (`mem_peak_allocated`)
//! compared with the planner's prediction from the same config. A larger grid is the ignored
//! `larger_grid` (`benches/plan_grid.sh`).

mod common;
use common::{ok, sepdist, text};
use sepdist_train::plan::{DeviceKind, DeviceSpec, Planner};
use std::path::{Path, PathBuf};

const TINY: &str = "tests/fixtures/tiny.yaml";

/// Allowed |predicted − measured| / measured.
const TOLERANCE: f64 = 0.10;

fn data_root() -> PathBuf {
    static ROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| common::tiny_dataset("plan-tests"))
        .clone()
}

/// A small model (2 layers, width 32) on the tiny fixture: one step, no validation, and the
/// only checkpoint written after the step's metrics.
fn base_sets() -> Vec<String> {
    [
        "dataset.validation_tracks=[]",
        "dataset.format=wav",
        "training.max_steps=1",
        "training.checkpoint_every=0",
        "model.n_layers=2",
        "model.emb_dim=32",
        "model.n_heads=2",
        "model.ffn_hidden_dim=[64,64]",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// One grid point: `--set` overrides and the number of ranks.
#[derive(Debug, Clone)]
struct Point {
    sets: Vec<String>,
    ranks: usize,
}

impl Point {
    fn new(extra: &[String], ranks: usize) -> Self {
        let mut sets = base_sets();
        sets.extend(extra.iter().cloned());
        Self { sets, ranks }
    }

    fn label(&self) -> String {
        let base = base_sets();
        let own: Vec<&String> = self.sets.iter().filter(|s| !base.contains(s)).collect();
        format!("{} rank(s), {:?}", self.ranks, own)
    }

    fn predicted(&self) -> sepdist_train::plan::Prediction {
        let mut sets = self.sets.clone();
        sets.push(format!("dataset.root={}", data_root().display()));
        let cfg = sepdist_config::load_file(Path::new(TINY), &sets).unwrap();
        // The runs below use one compute thread, as the planner is told here.
        let planner = Planner::new(&cfg, self.ranks, DeviceSpec::new(DeviceKind::Cpu, 1)).unwrap();
        planner.predict(&planner.configured())
    }

    /// Runs the step; returns the train record of `metrics.jsonl`.
    fn measured(&self) -> serde_json::Value {
        self.measured_step(1)
    }

    /// Runs the configured steps; returns the train record of step `step` of `metrics.jsonl`.
    fn measured_step(&self, step: u64) -> serde_json::Value {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let mut cmd = if self.ranks == 1 {
            sepdist()
        } else {
            mpirun(self.ranks)
        };
        cmd.env("RAYON_NUM_THREADS", "1")
            .args(["train", "--config", TINY])
            .arg("--set")
            .arg(format!("training.output_dir={}", out.display()))
            .arg("--set")
            .arg(format!("dataset.root={}", data_root().display()));
        if self.ranks > 1 {
            cmd.args(["--set", "distributed.backend=mpi"]);
        }
        for s in &self.sets {
            cmd.args(["--set", s]);
        }
        let output = cmd.output().unwrap();
        ok(&output);
        if self.ranks > 1 {
            let err = text(&output.stderr);
            assert!(
                err.contains(&format!("× {} ranks)", self.ranks)),
                "the job did not run as {} ranks:\n{err}",
                self.ranks
            );
        }
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|r| r["kind"] == "train" && r["step"] == step)
            .unwrap()
    }
}

/// `mpirun -n ranks <binary>`, from the repository root.
fn mpirun(ranks: usize) -> std::process::Command {
    let found = std::process::Command::new("mpirun")
        .arg("--version")
        .output();
    assert!(
        found.is_ok(),
        "mpirun not found: run launch/install-deps.sh (MPICH) before the MPI tests"
    );
    let mut cmd = std::process::Command::new("mpirun");
    if text(&found.unwrap().stdout).contains("Open MPI") {
        cmd.args(["--allow-run-as-root", "--oversubscribe"]);
    }
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("RUST_BACKTRACE")
        .args(["-n", &ranks.to_string()])
        .arg(env!("CARGO_BIN_EXE_sepdist"));
    cmd
}

/// Measures every point (in parallel, a few at a time) and returns
/// `(label, measured, predicted, relative error)`.
fn compare(points: &[Point]) -> Vec<(String, u64, u64, f64)> {
    let results = std::sync::Mutex::new(Vec::new());
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let Some(p) = points.get(i) else { break };
                    let measured = p.measured()["mem_peak_allocated"].as_u64().unwrap();
                    let predicted = p.predicted().peak;
                    let err = (predicted as f64 - measured as f64) / measured as f64;
                    results
                        .lock()
                        .unwrap()
                        .push((i, (p.label(), measured, predicted, err)));
                }
            });
        }
    });
    let mut r = results.into_inner().unwrap();
    r.sort_by_key(|(i, _)| *i);
    r.into_iter().map(|(_, x)| x).collect()
}

fn report_and_check(rows: &[(String, u64, u64, f64)]) {
    let mut worst: f64 = 0.0;
    for (label, m, p, e) in rows {
        println!(
            "{label}: measured {m}, predicted {p}, error {:+.2}%",
            e * 100.0
        );
        worst = worst.max(e.abs());
    }
    println!(
        "worst error {:.2}% over {} points",
        worst * 100.0,
        rows.len()
    );
    for (label, m, p, e) in rows {
        assert!(
            e.abs() <= TOLERANCE,
            "{label}: predicted {p} bytes, measured {m}: error {:+.1}% (limit {}%)",
            e * 100.0,
            TOLERANCE * 100.0
        );
    }
}

fn sets(items: &[String]) -> Vec<String> {
    items.to_vec()
}

#[test]
fn plan_predicts_the_peak_of_one_step_within_10_percent() {
    let mut points = Vec::new();
    for ckpt in [false, true] {
        for batch in [1, 2, 4] {
            for segment in [2048, 6000] {
                points.push(Point::new(
                    &sets(&[
                        format!("training.gradient_checkpointing={ckpt}"),
                        format!("training.batch_size={batch}"),
                        format!("dataset.segment_length={segment}"),
                    ]),
                    1,
                ));
            }
        }
    }
    // Accumulation: the next micro-batch is prefetched while the first one runs.
    points.push(Point::new(
        &sets(&[
            "training.batch_size=2".into(),
            "training.gradient_accumulation_steps=2".into(),
        ]),
        1,
    ));
    // ZeRO-3 on one rank: the engine holds no Vars; every piece is gathered into fresh
    // tensors (twice for recomputed blocks).
    for ckpt in [false, true] {
        points.push(Point::new(
            &sets(&[
                "distributed.zero_stage=3".into(),
                format!("training.gradient_checkpointing={ckpt}"),
            ]),
            1,
        ));
    }
    report_and_check(&compare(&points));
}

#[cfg(feature = "mpi")]
#[test]
fn plan_predicts_the_peak_of_zero_0_to_3_under_mpirun_within_10_percent() {
    let mut points: Vec<Point> = (0..=3)
        .map(|z| {
            Point::new(
                &sets(&[
                    format!("distributed.zero_stage={z}"),
                    "training.batch_size=2".into(),
                    // Small buckets: several reductions in flight during the backward.
                    "distributed.bucket_size_mb=0.05".into(),
                ]),
                2,
            )
        })
        .collect();
    // ZeRO-3 on 4 ranks with a model whose parameters outweigh its activations: the gathered
    // pieces and the collectives' buffers make most of the peak.
    for ckpt in [false, true] {
        points.push(Point::new(
            &sets(&[
                "distributed.zero_stage=3".into(),
                format!("training.gradient_checkpointing={ckpt}"),
                "training.batch_size=1".into(),
                "model.emb_dim=64".into(),
                "model.n_heads=4".into(),
                "model.ffn_hidden_dim=[256,256]".into(),
                "model.mask_hidden_dim=512".into(),
            ]),
            4,
        ));
    }
    report_and_check(&compare(&points));
}

/// The acceptance: activation checkpointing on a 4-layer config. The activations kept
/// for the backward shrink to the block inputs; the peak above the step's start also holds the
/// recomputed block's working set. Measured on the second step: the first one also allocates,
/// during its forward, what outlives it (the matmul kernels' per-thread packing buffers, about
/// 1 MB here; the planner's "runtime"), which is not activation memory.
#[test]
fn checkpointing_cuts_the_activations_of_a_4_layer_config() {
    let model = |ckpt: bool| {
        Point::new(
            &sets(&[
                "training.max_steps=2".into(),
                "model.n_layers=4".into(),
                "model.emb_dim=64".into(),
                "model.n_heads=4".into(),
                "model.ffn_hidden_dim=[64,64]".into(),
                "model.mask_hidden_dim=16".into(),
                "dataset.sources=[vocals]".into(),
                "dataset.segment_length=6000".into(),
                format!("training.gradient_checkpointing={ckpt}"),
            ]),
            1,
        )
    };
    let (keep, ckpt) = (model(false), model(true));
    let (mk, mc) = (keep.measured_step(2), ckpt.measured_step(2));
    let field = |r: &serde_json::Value, k: &str| r[k].as_u64().unwrap() as f64;
    let kept_cut = 1.0 - field(&mc, "mem_activations_kept") / field(&mk, "mem_activations_kept");
    let peak_cut = 1.0 - field(&mc, "mem_activations_peak") / field(&mk, "mem_activations_peak");
    let (pk, pc) = (keep.predicted(), ckpt.predicted());
    let predicted_kept_cut = 1.0 - pc.activations as f64 / pk.activations as f64;
    let predicted_peak_cut =
        1.0 - (pc.activations + pc.transient) as f64 / (pk.activations + pk.transient) as f64;
    println!(
        "activations kept: -{:.1}% measured, -{:.1}% predicted; peak activation memory: -{:.1}% measured, -{:.1}% predicted",
        kept_cut * 100.0,
        predicted_kept_cut * 100.0,
        peak_cut * 100.0,
        predicted_peak_cut * 100.0
    );
    assert!(
        kept_cut >= 0.80,
        "kept activations cut by {kept_cut:.3} only"
    );
    assert!(
        peak_cut >= 0.80,
        "peak activation memory cut by {peak_cut:.3} only"
    );
    assert!((kept_cut - predicted_kept_cut).abs() < 0.03);
    assert!((peak_cut - predicted_peak_cut).abs() < 0.05);
}

/// The larger grid of `benches/plan_grid.sh` (not in CI): more shapes, micro-batches,
/// segment lengths, layers, sources and, with `--features mpi`, ZeRO stages on 2 and 4 ranks.
#[test]
#[ignore = "the larger grid of benches/plan_grid.sh: 71 points, about a minute; not in CI"]
fn larger_grid() {
    let mut points = Vec::new();
    for (layers, dim, heads, ffn) in [(1, 16, 2, 32), (2, 32, 2, 64), (3, 48, 4, 192)] {
        for ckpt in [false, true] {
            for batch in [1, 3, 4] {
                for segment in [1024, 4096, 8000] {
                    points.push(Point::new(
                        &sets(&[
                            format!("model.n_layers={layers}"),
                            format!("model.emb_dim={dim}"),
                            format!("model.n_heads={heads}"),
                            format!("model.ffn_hidden_dim=[{ffn},{ffn}]"),
                            format!("training.gradient_checkpointing={ckpt}"),
                            format!("training.batch_size={batch}"),
                            format!("dataset.segment_length={segment}"),
                        ]),
                        1,
                    ));
                }
            }
        }
    }
    for sources in ["[vocals]", "[drums,bass]"] {
        for acc in [1, 3] {
            points.push(Point::new(
                &sets(&[
                    format!("dataset.sources={sources}"),
                    format!("training.gradient_accumulation_steps={acc}"),
                    "training.max_steps=2".into(),
                ]),
                1,
            ));
        }
    }
    points.push(Point::new(
        &sets(&["training.ema={momentum: 0.99}".into()]),
        1,
    ));
    if cfg!(feature = "mpi") {
        for ranks in [2, 4] {
            for z in 0..=2 {
                for ckpt in [false, true] {
                    points.push(Point::new(
                        &sets(&[
                            format!("distributed.zero_stage={z}"),
                            format!("training.gradient_checkpointing={ckpt}"),
                            "training.batch_size=1".into(),
                            "distributed.bucket_size_mb=0.1".into(),
                        ]),
                        ranks,
                    ));
                }
            }
        }
    }
    report_and_check(&compare(&points));
}

#[test]
fn plan_prints_the_breakdown_and_the_alternatives() {
    let out = common::run(&[
        "plan",
        "--config",
        "configs/musdb18_xlarge.yaml",
        "--device",
        "rtx-pro-6000",
    ]);
    ok(&out);
    let stdout = text(&out.stdout);
    for row in [
        "118,872,868 parameters",
        "parameters",
        "gradients",
        "optimizer state",
        "activations kept",
        "transient working set",
        "communication buffers",
        "does not fit 97.9 GB",
        "micro-batch 1 × 16, checkpointing on",
        "segment 10 s",
        "bf16",
    ] {
        assert!(stdout.contains(row), "missing `{row}`:\n{stdout}");
    }
}

#[test]
fn plan_fit_prints_overrides_writes_the_config_and_exits_3_when_nothing_fits() {
    let dir = tempfile::tempdir().unwrap();
    let fitted = dir.path().join("fitted.yaml");
    let args = |budget: &str| -> Vec<String> {
        [
            "plan",
            "--config",
            "configs/musdb18_xlarge.yaml",
            "--device",
            "rtx-pro-6000",
            "--world-size",
            "4",
            "--effective-batch",
            "16",
            "--fit",
            "--budget",
            budget,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let mut a = args("24GB");
    a.extend(["--write".to_string(), fitted.display().to_string()]);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let out = common::run(&a);
    ok(&out);
    let stdout = text(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("--set "))
        .unwrap_or_else(|| panic!("no overrides:\n{stdout}"));
    let sets: Vec<String> = line
        .split("--set ")
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    // The overrides keep the effective batch and fit the budget by the planner's own account.
    let cfg = sepdist_config::load_file(Path::new("configs/musdb18_xlarge.yaml"), &sets).unwrap();
    let t = &cfg.training;
    assert_eq!(t.batch_size * t.gradient_accumulation_steps * 4, 16);
    let planner = Planner::new(&cfg, 4, DeviceSpec::new(DeviceKind::RtxPro6000, 1)).unwrap();
    assert!(planner.predict(&planner.configured()).peak <= 24_000_000_000);
    // The written file is that config.
    let written = sepdist_config::load_file(&fitted, &[]).unwrap();
    assert_eq!(written, cfg);

    // 3 GB: below the closest setting (1 × 4, checkpointing, ZeRO-3, 3.9 GB).
    let a = args("3GB");
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let out = common::run(&a);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("nothing fits 3.0 GB per rank"), "{stdout}");
    assert!(stdout.contains("more)"), "{stdout}");
}

/// On a GPU the trainer keeps the flat master copy, the gradient and AdamW's moments in host
/// memory: the plan counts only the engine's weights (none under ZeRO-3), so ZeRO 1/2 change
/// nothing on the device; the CPU's plan counts all of them.
#[test]
fn on_a_gpu_the_plan_counts_only_what_the_device_holds() {
    let cfg = sepdist_config::load_file(Path::new("configs/musdb18_xlarge.yaml"), &[]).unwrap();
    let gpu = Planner::new(&cfg, 4, DeviceSpec::new(DeviceKind::RtxPro6000, 1)).unwrap();
    let base = gpu.configured();
    let p0 = gpu.predict(&base);
    assert_eq!(p0.parameters, p0.params * 4, "the weights as fp32 Vars");
    assert_eq!((p0.gradients, p0.optimizer), (0, 0));
    for stage in [1, 2] {
        let p = gpu.predict(&sepdist_train::plan::Setting {
            zero_stage: stage,
            ..base.clone()
        });
        assert_eq!(p.persistent(), p0.persistent(), "ZeRO-{stage}");
        assert_eq!(p.peak, p0.peak, "ZeRO-{stage}");
    }
    let p3 = gpu.predict(&sepdist_train::plan::Setting {
        zero_stage: 3,
        ..base.clone()
    });
    assert_eq!(p3.parameters, 0);
    let cpu = Planner::new(&cfg, 4, DeviceSpec::new(DeviceKind::Cpu, 1)).unwrap();
    let c0 = cpu.predict(&cpu.configured());
    assert!(c0.parameters > p0.parameters && c0.gradients > 0 && c0.optimizer > 0);
}
