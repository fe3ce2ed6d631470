#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions
//! Out of memory as a decision (issue 11), through the real binary on the tiny config with
//! `training.memory_budget`: refused before allocation with the fitted `--set` overrides,
//! which then train; `--force` stops at the step over the budget with the measured breakdown
//! and the last checkpoint intact; `training.on_oom: refit` redoes the step with the fitted
//! setting and ends where a run started with that setting ends.

mod common;
use common::{ok, rel_diff, text, weights};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;

const TINY: &str = "tests/fixtures/tiny.yaml";
/// `sepdist_cli::EXIT_OUT_OF_MEMORY`, the documented exit code.
const OOM: i32 = sepdist_cli::EXIT_OUT_OF_MEMORY as i32;
/// Four examples per optimizer step in one micro-batch (the fitted settings split it),
/// four steps over two epochs.
const BASE: [&str; 2] = ["training.batch_size=4", "training.max_steps=4"];

fn data_root() -> PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| common::tiny_dataset("oom-tests"))
        .clone()
}

/// `sepdist train` on the tiny config with BASE, writing to `out`, plus `sets` and `args`.
fn train(out: &Path, sets: &[&str], args: &[&str], env: &[(&str, &str)]) -> Output {
    let sets: Vec<&str> = BASE.iter().chain(sets).copied().collect();
    common::train_on(TINY, &data_root(), out, &sets, args, env)
}

fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A budget, in bytes, below both the planned and the measured peak of the configured 4 × 1
/// setting (so the check refuses it and a forced run goes over it at its first step), with
/// room for the settings that split the batch. Measured once: a run of two steps.
fn budget() -> u64 {
    static BUDGET: OnceLock<u64> = OnceLock::new();
    *BUDGET.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let run = train(
            &out,
            &["training.max_steps=2", "training.checkpoint_every=0"],
            &[],
            &[],
        );
        ok(&run);
        let measured = metrics(&out)
            .iter()
            .filter(|r| r["kind"] == "train")
            .flat_map(|r| {
                [
                    "mem_peak_forward",
                    "mem_peak_backward",
                    "mem_peak_communication",
                    "mem_peak_optimizer",
                ]
                .map(|k| r[k].as_u64().unwrap())
            })
            .max()
            .unwrap();
        let mut sets: Vec<String> = BASE.iter().map(|s| s.to_string()).collect();
        sets.push(format!("dataset.root={}", data_root().display()));
        let cfg = sepdist_config::load_file(Path::new(TINY), &sets).unwrap();
        let planner = sepdist_train::oom::planner(&cfg, 1).unwrap();
        let planned = planner.predict(&planner.configured()).peak;
        measured.min(planned) * 3 / 4
    })
}

fn budget_set() -> String {
    format!("training.memory_budget={}", budget())
}

/// The `--set` overrides on the line after "fitted setting" in a diagnosis.
fn fitted_overrides(stderr: &str) -> Vec<String> {
    let mut lines = stderr
        .lines()
        .skip_while(|l| !l.starts_with("fitted setting"));
    assert!(lines.next().is_some(), "no fitted setting in:\n{stderr}");
    let line = lines.next().unwrap().trim();
    assert!(line.starts_with("--set "), "{line}");
    line.split("--set ")
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

/// Final weights of a run started with `overrides` (the fitted setting), computed once per
/// setting: the reference of the refit tests.
fn fitted_reference(overrides: &[String]) -> Vec<f32> {
    /// (overrides, final weights) of the runs so far.
    type Runs = std::sync::Mutex<Vec<(Vec<String>, Vec<f32>)>>;
    static RUNS: OnceLock<Runs> = OnceLock::new();
    let runs = RUNS.get_or_init(Default::default);
    let mut runs = runs.lock().unwrap();
    if let Some((_, w)) = runs.iter().find(|(o, _)| o == overrides) {
        return w.clone();
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let sets: Vec<&str> = overrides.iter().map(String::as_str).collect();
    let run = train(&out, &sets, &[], &[]);
    ok(&run);
    let w = weights(&out.join("checkpoints/step_00000004"));
    runs.push((overrides.to_vec(), w.clone()));
    w
}

/// The output directory of the configured setting stopped after two of its four steps
/// (checkpoint `step_00000002`), copied into `into`.
fn two_steps_done(into: &Path) {
    static RUN: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, out) = RUN.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let run = train(
            &out,
            &["training.checkpoint_every=1"],
            &[],
            &[("SEPDIST_TEST_STOP_AFTER_STEPS", "2")],
        );
        assert_eq!(run.status.code(), Some(143), "{}", text(&run.stderr));
        (dir, out)
    });
    copy_dir(out, into);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[test]
fn a_config_over_the_budget_is_refused_before_allocation_and_the_fitted_overrides_train() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("refused");
    let refused = train(&out, &[&budget_set()], &[], &[]);
    let stderr = text(&refused.stderr);
    assert_eq!(refused.status.code(), Some(OOM), "{stderr}");
    for part in [
        "memory check: the predicted peak",
        "(training.memory_budget ",
        // The plan's breakdown of the configured setting.
        "per rank, 4×1, ckpt off, ZeRO 0",
        "activations kept",
        "transient working set",
        "does not fit",
        "fitted setting for ",
        "with the same effective batch 4",
        "nothing was allocated",
        "error: out of memory before training",
    ] {
        assert!(stderr.contains(part), "`{part}` missing in:\n{stderr}");
    }
    // Refused before the model, the data loader or any output existed.
    assert!(!stderr.contains("training 182148 parameters"), "{stderr}");
    assert!(!out.join("metrics.jsonl").exists());
    assert!(!out.join("checkpoints").exists());

    let fitted = fitted_overrides(&stderr);
    assert!(
        fitted.iter().any(|s| s.starts_with("training.batch_size=")
            || s.starts_with("training.gradient_checkpointing=")),
        "{fitted:?}"
    );
    let out = dir.path().join("fitted");
    let mut sets: Vec<&str> = fitted.iter().map(String::as_str).collect();
    let budget = budget_set();
    sets.push(&budget);
    let run = train(&out, &sets, &[], &[]);
    ok(&run);
    let stderr = text(&run.stderr);
    assert!(!stderr.contains("went over"), "{stderr}");
    assert!(text(&run.stdout).starts_with("finished 4 optimizer steps"));
    // Same effective batch: the same two steps per epoch.
    assert!(stderr.contains("effective batch 4 = "), "{stderr}");
    assert!(stderr.contains("epoch 2 step 2/2"), "{stderr}");
}

#[test]
fn refit_before_training_starts_with_the_fitted_setting() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let run = train(
        &out,
        &[
            &budget_set(),
            "training.on_oom=refit",
            "training.max_steps=1",
        ],
        &[],
        &[],
    );
    ok(&run);
    let stderr = text(&run.stderr);
    assert!(
        stderr.contains("training.on_oom: refit: starting with the fitted setting"),
        "{stderr}"
    );
    let fitted = fitted_overrides(&stderr);
    let resolved =
        std::fs::read_to_string(out.join("checkpoints/step_00000001/meta.json")).unwrap();
    for set in fitted {
        let (key, value) = set.split_once('=').unwrap();
        let leaf = key.rsplit('.').next().unwrap();
        assert!(
            resolved.contains(&format!("{leaf}: {value}")),
            "{set} not in the checkpoint's config:\n{resolved}"
        );
    }
}

#[test]
fn force_stops_at_the_step_over_the_budget_with_the_breakdown_and_the_last_checkpoint_loads() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    two_steps_done(&out);
    let ckpts = out.join("checkpoints");
    let before = std::fs::read(ckpts.join("step_00000002/model.safetensors")).unwrap();
    let listing = |d: &Path| {
        let mut names: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let names_before = listing(&ckpts);

    let stopped = train(
        &out,
        &[&budget_set(), "training.checkpoint_every=1"],
        &["--resume", "auto", "--force"],
        &[],
    );
    let stderr = text(&stopped.stderr);
    assert_eq!(stopped.status.code(), Some(OOM), "{stderr}");
    for part in [
        // The pre-flight check's verdict, as a warning.
        "--force: starting anyway",
        // The measured breakdown at the failure, the plan next to it, the fitted setting.
        "rank 0: optimizer step 3 went over training.memory_budget",
        "first over the budget in the ",
        "highest in the ",
        "now: allocated ",
        "phase peaks so far: ",
        "optimizer step 3 measured (this rank's heap) next to the plan of 4×1",
        "activations kept",
        "predicted peak in the",
        "the step is discarded on every rank: weights and optimizer state are those after step 2",
        "the last checkpoint is ",
        "fitted setting for ",
        "stopping (training.on_oom: stop)",
        "error: out of memory: optimizer step 3 went over training.memory_budget",
    ] {
        assert!(stderr.contains(part), "`{part}` missing in:\n{stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
    // The failed step names the forward or the backward of a block of the model.
    let at = stderr
        .lines()
        .find(|l| l.contains("first over the budget in the "))
        .unwrap();
    assert!(
        at.contains("forward of ") || at.contains("backward of "),
        "{at}"
    );
    assert!(!fitted_overrides(&stderr).is_empty());
    // Nothing written for the failed step (the resumed run first made up the validation due
    // at step 2, which may write best_model of step 2); the last checkpoint is the same bytes.
    let new: Vec<String> = listing(&ckpts)
        .into_iter()
        .filter(|n| !names_before.contains(n))
        .collect();
    assert!(new.iter().all(|n| n == "best_model"), "{new:?}");
    for name in listing(&ckpts).iter().filter(|n| *n != "latest") {
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(ckpts.join(name).join("meta.json")).unwrap())
                .unwrap();
        assert!(meta["step"].as_u64().unwrap() <= 2, "{name}: {meta}");
    }
    assert_eq!(
        std::fs::read(ckpts.join("step_00000002/model.safetensors")).unwrap(),
        before
    );
    let records = metrics(&out);
    let failure = records
        .iter()
        .find(|r| r["kind"] == "out_of_memory")
        .unwrap();
    assert_eq!(failure["step"], 3);
    assert!(failure["peak"].as_u64().unwrap() > budget());
    assert!(failure["refit"].is_null());

    // The checkpoint loads: without the budget the run resumes from it and finishes.
    let resumed = train(&out, &[], &["--resume", "auto"], &[]);
    ok(&resumed);
    let stderr = text(&resumed.stderr);
    let line = stderr
        .lines()
        .find(|l| l.starts_with("resumed from "))
        .unwrap();
    assert!(
        line.starts_with(&format!("resumed from {}", ckpts.display()))
            && line.contains(" at step 2 "),
        "{stderr}"
    );
    assert!(text(&resumed.stdout).starts_with("finished 4 optimizer steps"));
}

/// The refit run's final weights against the run started with the setting it refitted to.
fn assert_matches_fitted(out: &Path, failed_step: u64) {
    let records = metrics(out);
    let failure = records
        .iter()
        .find(|r| r["kind"] == "out_of_memory")
        .unwrap();
    assert_eq!(failure["step"], failed_step);
    let fitted: Vec<String> = failure["refit"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert!(!fitted.is_empty());
    // Four optimizer steps recorded, none twice: the failed one was redone, not added.
    let steps: Vec<u64> = records
        .iter()
        .filter(|r| r["kind"] == "train")
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2, 3, 4]);
    let refit = weights(&out.join("checkpoints/step_00000004"));
    let reference = fitted_reference(&fitted);
    let d = rel_diff(&reference, &refit);
    assert!(
        d <= 1e-5,
        "refit vs started with {fitted:?}: relative difference {d}"
    );
}

#[test]
fn refit_at_the_first_step_equals_a_run_started_with_the_fitted_setting() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let run = train(
        &out,
        &[&budget_set(), "training.on_oom=refit"],
        &["--force"],
        &[],
    );
    ok(&run);
    let stderr = text(&run.stderr);
    assert!(
        stderr.contains("training.on_oom: refit: redoing step 1 with micro-batch"),
        "{stderr}"
    );
    assert!(text(&run.stdout).starts_with("finished 4 optimizer steps"));
    assert_matches_fitted(&out, 1);
}

#[test]
fn refit_after_resuming_continues_from_the_last_step_like_the_fitted_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    two_steps_done(&out);
    let run = train(
        &out,
        &[&budget_set(), "training.on_oom=refit"],
        &["--resume", "auto", "--force"],
        &[],
    );
    ok(&run);
    let stderr = text(&run.stderr);
    assert!(
        stderr.contains("training.on_oom: refit: redoing step 3 with micro-batch"),
        "{stderr}"
    );
    // Steps 1 and 2 in one micro-batch of 4, steps 3 and 4 split: the same examples per
    // step, so the same weights up to the rounding of the gradient sum.
    assert_matches_fitted(&out, 3);
}

#[test]
fn memory_sizes_in_the_config_are_checked_with_the_key_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    for (set, expected) in [
        ("training.memory_budget=lots", "`lots` is not a size"),
        ("training.memory_budget=-3", "must not be negative"),
        (
            "training.memory_budget=0",
            "training.memory_budget: must be a positive size",
        ),
        (
            "training.memory_reserve=3 parsecs",
            "unknown unit `parsecs`",
        ),
        ("training.on_oom=retry", "unknown variant `retry`"),
    ] {
        let run = train(&out, &[set], &[], &[]);
        let stderr = text(&run.stderr);
        assert_eq!(run.status.code(), Some(2), "{set}: {stderr}");
        assert!(stderr.contains(expected), "{set}: {stderr}");
        assert!(
            stderr.contains(set.split('=').next().unwrap()),
            "{set}: {stderr}"
        );
    }
}

/// Two MPI ranks (built with `--features mpi`): the ranks refuse together before allocating,
/// and with `--force` both stop at the same step with one diagnosis naming both ranks.
#[cfg(feature = "mpi")]
mod mpi {
    use super::*;
    use std::process::Command;

    fn mpirun(out: &Path, sets: &[&str], args: &[&str]) -> Output {
        let found = Command::new("mpirun").arg("--version").output();
        assert!(
            found.is_ok(),
            "mpirun not found: run launch/install-deps.sh (MPICH) before the MPI tests"
        );
        let mut cmd = Command::new("mpirun");
        if text(&found.unwrap().stdout).contains("Open MPI") {
            cmd.args(["--allow-run-as-root", "--oversubscribe"]);
        }
        cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
            .env_remove("RUST_BACKTRACE")
            .env("RAYON_NUM_THREADS", "1")
            .args([
                "-n",
                "2",
                env!("CARGO_BIN_EXE_sepdist"),
                "train",
                "--config",
                TINY,
            ])
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
        for s in BASE.iter().chain(sets) {
            cmd.args(["--set", s]);
        }
        cmd.args(args).output().unwrap()
    }

    #[test]
    fn two_ranks_refuse_together_and_stop_together_at_the_step_over_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        // Below what the parameters and optimizer state alone take: nothing fits.
        let refused = mpirun(&dir.path().join("a"), &["training.memory_budget=1MB"], &[]);
        let stderr = text(&refused.stderr);
        assert_eq!(refused.status.code(), Some(OOM), "{stderr}");
        assert_eq!(
            stderr.matches("memory check: the predicted peak").count(),
            1,
            "{stderr}"
        );
        assert!(stderr.contains("short on rank(s) 0, 1"), "{stderr}");
        assert!(stderr.contains("no micro-batch, accumulation, checkpointing or ZeRO setting"));
        // Each rank ends with the error (the launcher may stop the second before it prints).
        assert!(
            stderr.contains("error: out of memory before training"),
            "{stderr}"
        );

        let out = dir.path().join("b");
        let stopped = mpirun(&out, &["training.memory_budget=1MB"], &["--force"]);
        let stderr = text(&stopped.stderr);
        assert_eq!(stopped.status.code(), Some(OOM), "{stderr}");
        for rank in 0..2 {
            let line = format!("rank {rank}: optimizer step 1 went over training.memory_budget");
            assert_eq!(stderr.matches(&line).count(), 1, "{stderr}");
        }
        assert!(
            stderr.contains("stopping: nothing smaller fits"),
            "{stderr}"
        );
        assert!(
            stderr.contains(
                "error: out of memory: optimizer step 1 went over training.memory_budget 1.0 MB on rank(s) 0, 1"
            ),
            "{stderr}"
        );
        assert!(!out.join("checkpoints/step_00000001").exists());
    }
}
