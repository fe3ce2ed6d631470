#![cfg(feature = "mpi")]
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions
//! `sepdist train` as real processes under `mpirun` (built with `--features mpi`). Every run
//! asserts the world size the ranks report: a binary started by another MPI's mpirun runs as
//! N singletons without any error.

mod common;
use common::{rel_diff, text, weights};

fn data_root() -> PathBuf {
    static ROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| common::tiny_dataset("mpi-tests"))
        .clone()
}

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const TINY: &str = "tests/fixtures/tiny.yaml";

fn mpirun() -> Command {
    let found = Command::new("mpirun").arg("--version").output();
    assert!(
        found.is_ok(),
        "mpirun not found: run launch/install-deps.sh (MPICH) before the MPI tests"
    );
    let mut cmd = Command::new("mpirun");
    let version = text(&found.unwrap().stdout);
    if version.contains("Open MPI") {
        cmd.args(["--allow-run-as-root", "--oversubscribe"]);
    }
    cmd
}

/// `mpirun -n ranks sepdist train --config tiny.yaml ...` with one thread per rank.
fn train_command(ranks: usize, out: &Path, sets: &[&str]) -> Command {
    let mut cmd = mpirun();
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("RUST_BACKTRACE")
        .env("RAYON_NUM_THREADS", "1")
        .args(["-n", &ranks.to_string()])
        .arg(env!("CARGO_BIN_EXE_sepdist"))
        .args(["train", "--config", TINY])
        .arg("--set")
        .arg(format!("training.output_dir={}", out.display()))
        .arg("--set")
        .arg(format!("dataset.root={}", data_root().display()))
        .args([
            "--set",
            "dataset.format=wav",
            "--set",
            "distributed.backend=mpi",
        ]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    cmd
}

fn train(ranks: usize, out: &Path, sets: &[&str]) -> Output {
    run_ok(ranks, train_command(ranks, out, sets))
}

/// Runs a prepared job and checks that it succeeded as `ranks` ranks.
fn run_ok(ranks: usize, mut cmd: Command) -> Output {
    let output = cmd.output().unwrap();
    assert!(
        output.status.success(),
        "exit {:?}\n{}",
        output.status.code(),
        text(&output.stderr)
    );
    let err = text(&output.stderr);
    assert!(
        err.contains(&format!("× {ranks} ranks)")),
        "the job did not run as {ranks} ranks:\n{err}"
    );
    output
}

#[test]
fn ranks_1_2_4_equal_on_the_same_global_batch_for_zero_0_1_2() {
    let dir = tempfile::tempdir().unwrap();
    let base_dir = dir.path().join("w1");
    train(
        1,
        &base_dir,
        &["training.batch_size=4", "training.max_steps=5"],
    );
    let base = weights(&base_dir.join("checkpoints/step_00000005"));
    for zero in [0, 1, 2] {
        for (ranks, batch, accumulation) in [(2, 1, 2), (4, 1, 1)] {
            let out = dir.path().join(format!("z{zero}n{ranks}"));
            train(
                ranks,
                &out,
                &[
                    &format!("training.batch_size={batch}"),
                    &format!("training.gradient_accumulation_steps={accumulation}"),
                    &format!("distributed.zero_stage={zero}"),
                    "training.max_steps=5",
                ],
            );
            let d = rel_diff(&base, &weights(&out.join("checkpoints/step_00000005")));
            assert!(
                d <= 1e-5,
                "ZeRO {zero} on {ranks} ranks: relative difference {d}"
            );
        }
    }
}

#[test]
fn a_four_rank_checkpoint_resumes_on_two_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole");
    train(
        4,
        &whole,
        &[
            "training.batch_size=1",
            "training.max_steps=6",
            "distributed.zero_stage=1",
        ],
    );
    let split = dir.path().join("split");
    let first = train_command(
        4,
        &split,
        &[
            "training.batch_size=1",
            "training.max_steps=6",
            "distributed.zero_stage=1",
        ],
    )
    .env("SEPDIST_TEST_STOP_AFTER_STEPS", "3")
    .output()
    .unwrap();
    assert_eq!(first.status.code(), Some(143), "{}", text(&first.stderr));
    // Resumed on 2 ranks (same global batch: 1 × 2 × 2) and at ZeRO stage 0.
    let mut resume = train_command(
        2,
        &split,
        &[
            "training.batch_size=1",
            "training.gradient_accumulation_steps=2",
            "training.max_steps=6",
        ],
    );
    resume.args(["--resume", "auto"]);
    let resumed = run_ok(2, resume);
    assert!(text(&resumed.stderr).contains("written by 4 rank(s) at ZeRO stage 1"));
    let d = rel_diff(
        &weights(&whole.join("checkpoints/step_00000006")),
        &weights(&split.join("checkpoints/step_00000006")),
    );
    assert!(d <= 1e-5, "relative difference {d}");
}

#[test]
fn a_rank_with_a_different_config_stops_the_job_at_start_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = train_command(2, &dir.path().join("out"), &[])
        .env("SEPDIST_TEST_RANK_OVERRIDE", "1:training.optimizer.lr=0.5")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("rank 1 has a different resolved config from rank 0"),
        "{err}"
    );
    assert!(!dir.path().join("out/checkpoints").exists());
}

#[test]
fn killing_one_rank_ends_the_job_within_the_deadline_and_the_checkpoint_loads() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let timeout_s = 5;
    let mut child = train_command(
        2,
        &out,
        &[
            "training.max_steps=100000",
            "dataset.samples_per_epoch=1000000",
            "training.checkpoint_every=2",
            &format!("distributed.timeout_s={timeout_s}"),
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let latest = out.join("checkpoints/latest");
    let start = Instant::now();
    while !latest.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no checkpoint written"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The rank processes are the children of mpirun running the sepdist binary with this
    // run's unique output directory.
    let pattern = format!("training.output_dir={}", out.display());
    let pids = text(
        &Command::new("pgrep")
            .args(["-f", &pattern])
            .output()
            .unwrap()
            .stdout,
    );
    let victim = pids
        .lines()
        .rfind(|p| p.trim().parse::<u32>().ok() != Some(child.id()))
        .expect("a rank process")
        .trim()
        .to_string();
    let killed = Instant::now();
    assert!(
        Command::new("kill")
            .args(["-KILL", &victim])
            .status()
            .unwrap()
            .success()
    );
    while child.try_wait().unwrap().is_none() {
        assert!(
            killed.elapsed() < Duration::from_secs(timeout_s + 10),
            "the job outlived the deadline"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = child.wait().unwrap();
    assert!(!status.success());
    // The last complete checkpoint still loads.
    let resumed = Command::new(env!("CARGO_BIN_EXE_sepdist"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["train", "--config", TINY, "--resume", "auto"])
        .arg("--set")
        .arg(format!("training.output_dir={}", out.display()))
        .arg("--set")
        .arg(format!("dataset.root={}", data_root().display()))
        .args([
            "--set",
            "dataset.format=wav",
            "--set",
            "training.max_steps=1",
        ])
        .output()
        .unwrap();
    let err = text(&resumed.stderr);
    assert!(err.contains("resumed from "), "{err}");
}

/// The EMA of the weights, sharded like the optimizer state under ZeRO 2 on 2 ranks, equals
/// the single-rank EMA on the same global batch (both read back through `export --ema`,
/// which assembles the shards).
#[test]
fn ema_under_zero_2_on_two_ranks_equals_one_rank() {
    let dir = tempfile::tempdir().unwrap();
    let ema = "training.ema={momentum: 0.8, every: 1}";
    let one = dir.path().join("one");
    train(
        1,
        &one,
        &[ema, "training.batch_size=4", "training.max_steps=5"],
    );
    let two = dir.path().join("two");
    train(
        2,
        &two,
        &[
            ema,
            "training.batch_size=2",
            "training.max_steps=5",
            "distributed.zero_stage=2",
        ],
    );
    let export = |run: &Path| -> Vec<f32> {
        let file = run.join("ema.safetensors");
        let out = Command::new(env!("CARGO_BIN_EXE_sepdist"))
            .args(["export", "--ema", "--checkpoint"])
            .arg(run.join("checkpoints/step_00000005"))
            .arg("-o")
            .arg(&file)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        let dir = run.join("ema-as-checkpoint");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::rename(&file, dir.join("model.safetensors")).unwrap();
        weights(&dir)
    };
    let (a, b) = (export(&one), export(&two));
    let d = rel_diff(&a, &b);
    assert!(d <= 1e-5, "EMA relative difference {d}");
    // The EMA is not simply the weights.
    let w = weights(&one.join("checkpoints/step_00000005"));
    assert!(rel_diff(&w, &a) > 1e-4);
}

/// ZeRO-3 as real processes: 1, 2 and 4 ranks equal stage 0 on one rank after 5 steps.
#[test]
fn zero_3_on_1_2_4_ranks_equals_stage_0() {
    let dir = tempfile::tempdir().unwrap();
    let base_dir = dir.path().join("w1");
    train(
        1,
        &base_dir,
        &["training.batch_size=4", "training.max_steps=5"],
    );
    let base = weights(&base_dir.join("checkpoints/step_00000005"));
    for (ranks, batch, accumulation) in [(1, 2, 2), (2, 1, 2), (4, 1, 1)] {
        let out = dir.path().join(format!("z3n{ranks}"));
        train(
            ranks,
            &out,
            &[
                &format!("training.batch_size={batch}"),
                &format!("training.gradient_accumulation_steps={accumulation}"),
                "distributed.zero_stage=3",
                "training.max_steps=5",
            ],
        );
        let d = rel_diff(&base, &weights(&out.join("checkpoints/step_00000005")));
        assert!(
            d <= 1e-5,
            "ZeRO 3 on {ranks} ranks: relative difference {d}"
        );
    }
}

/// The memory acceptance: on 4 ranks, ZeRO-3 keeps at most 30 % of the stage-0
/// parameter, gradient and optimizer bytes per rank. Measured by the counting allocator at
/// the start of an optimizer step (`mem_step_start`: everything that outlives a step, data
/// batches included) on a model whose state outweighs its data: 4.2 M parameters.
#[test]
fn zero_3_on_4_ranks_holds_at_most_30_percent_of_the_stage_0_model_state() {
    let dir = tempfile::tempdir().unwrap();
    let step_start = |zero: usize| -> (f64, f64) {
        let out = dir.path().join(format!("mem{zero}"));
        train(
            4,
            &out,
            &[
                "model.emb_dim=64",
                "model.n_heads=4",
                "model.ffn_hidden_dim=[256,256]",
                "model.mask_hidden_dim=512",
                "training.batch_size=1",
                "training.max_steps=2",
                "training.checkpoint_every=0",
                "training.gradient_checkpointing=true",
                &format!("distributed.zero_stage={zero}"),
            ],
        );
        let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        let last: serde_json::Value = metrics
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .rfind(|r| r["kind"] == "train")
            .unwrap();
        (
            last["mem_step_start"].as_f64().unwrap(),
            last["mem_peak_allocated"].as_f64().unwrap(),
        )
    };
    let ((state0, peak0), (state3, peak3)) = (step_start(0), step_start(3));
    let ratio = state3 / state0;
    println!(
        "4 ranks, state at a step's start: ZeRO-0 {state0:.0} B, ZeRO-3 {state3:.0} B ({:.1} %); peak {:.1} %",
        ratio * 100.0,
        peak3 / peak0 * 100.0
    );
    assert!(
        ratio <= 0.30,
        "ZeRO-3 keeps {:.1} % of stage 0",
        ratio * 100.0
    );
    assert!(peak3 < peak0);
}
