#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions
//! `sepdist train` through the real binary on a tiny config: resume, accumulation,
//! non-finite steps, corrupted checkpoints, fingerprint mismatch, interrupts.

mod common;
use common::{ok, rel_diff, sepdist, text, weights};

/// One synthetic dataset for every test of this file.
fn data_root() -> PathBuf {
    static ROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| common::tiny_dataset("train-tests"))
        .clone()
}

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

const TINY: &str = "tests/fixtures/tiny.yaml";

struct Run {
    dir: tempfile::TempDir,
}

impl Run {
    fn new() -> Self {
        Run {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn out(&self) -> PathBuf {
        self.dir.path().join("out")
    }
    fn ckpt(&self, name: &str) -> PathBuf {
        self.out().join("checkpoints").join(name)
    }
    fn command(&self, extra: &[&str]) -> Command {
        let mut cmd = sepdist();
        cmd.args(["train", "--config", TINY])
            .arg("--set")
            .arg(format!("training.output_dir={}", self.out().display()))
            .arg("--set")
            .arg(format!("dataset.root={}", data_root().display()))
            .args(extra);
        cmd
    }
    fn train(&self, extra: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = self.command(extra);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    }
}

/// `(loss, grad_norm)` of every training step in the metrics file.
fn step_metrics(run: &Run) -> Vec<(f64, f64)> {
    std::fs::read_to_string(run.out().join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["kind"] == "train")
        .map(|r| {
            (
                r["loss"].as_f64().unwrap(),
                r["grad_norm"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn a_short_run_writes_metrics_checkpoints_and_reports_progress() {
    let run = Run::new();
    let out = run.train(&["--set", "training.eval_every=2"], &[]);
    ok(&out);
    let stderr = text(&out.stderr);
    assert!(stderr.contains("epoch 1 step 4/4: loss="), "{stderr}");
    assert!(stderr.contains("mem="), "{stderr}");
    assert!(stderr.contains("samples/s"), "{stderr}");
    assert!(stderr.contains("validation loss"), "{stderr}");
    assert!(text(&out.stdout).starts_with("finished 4 optimizer steps; checkpoint "));
    for name in ["step_00000004", "checkpoint_epoch1", "best_model"] {
        assert!(run.ckpt(name).join("meta.json").is_file(), "{name}");
    }
    let metrics = std::fs::read_to_string(run.out().join("metrics.jsonl")).unwrap();
    let records: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let train: Vec<&serde_json::Value> = records.iter().filter(|r| r["kind"] == "train").collect();
    assert_eq!(train.len(), 4);
    for key in [
        "loss",
        "loss_waveform",
        "loss_multi_stft",
        "lr",
        "grad_norm",
        "skipped_steps",
        "samples_per_s",
        "mem_allocated",
        "mem_peak_allocated",
        "mem_reserved",
    ] {
        assert!(train[3][key].is_number(), "{key} missing in {}", train[3]);
    }
    assert!(train[3]["mem_peak_allocated"].as_u64().unwrap() > 0);
    // Validation reports uSDR per source; best_model is the validation with the best mean.
    let validations: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["kind"] == "validation")
        .collect();
    assert!(!validations.is_empty());
    for v in &validations {
        for source in ["drums", "bass", "other", "vocals"] {
            assert!(
                v[format!("usdr_{source}")].as_f64().unwrap().is_finite(),
                "{v}"
            );
        }
    }
    let best = validations
        .iter()
        .filter(|v| v["step"].as_u64().unwrap() > 0)
        .max_by(|a, b| {
            a["usdr_mean"]
                .as_f64()
                .unwrap()
                .total_cmp(&b["usdr_mean"].as_f64().unwrap())
        })
        .unwrap();
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run.ckpt("best_model").join("meta.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(meta["step"], best["step"]);
    assert_eq!(meta["trainer"]["best_usdr"], best["usdr_mean"]);
    // TensorBoard events beside the metrics: a TFRecord file of several records.
    let events: Vec<PathBuf> = std::fs::read_dir(run.out().join("tb"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    let name = events[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(name.starts_with("events.out.tfevents."), "{name}");
    let bytes = std::fs::read(&events[0]).unwrap();
    let text = String::from_utf8_lossy(&bytes);
    for tag in [
        "train/loss",
        "train/lr",
        "validation/usdr_mean",
        "validation/audio/vocals",
    ] {
        assert!(text.contains(tag), "{tag} missing from the event file");
    }
}

#[test]
fn interrupted_and_resumed_is_bitwise_identical_to_uninterrupted() {
    let whole = Run::new();
    ok(&whole.train(&[], &[]));
    let split = Run::new();
    let out = split.train(&[], &[("SEPDIST_TEST_STOP_AFTER_STEPS", "2")]);
    assert_eq!(out.status.code(), Some(143), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("stopped by signal 15 after step 2"));
    let out = split.train(&["--resume", "auto"], &[]);
    ok(&out);
    assert!(text(&out.stderr).contains("at step 2"));
    for name in ["step_00000004", "best_model"] {
        let a = std::fs::read(whole.ckpt(name).join("model.safetensors")).unwrap();
        let b = std::fs::read(split.ckpt(name).join("model.safetensors")).unwrap();
        assert!(a == b, "{name}: weights differ");
        let a = std::fs::read(whole.ckpt(name).join("optimizer-00000.safetensors")).unwrap();
        let b = std::fs::read(split.ckpt(name).join("optimizer-00000.safetensors")).unwrap();
        assert!(a == b, "{name}: optimizer state differs");
    }
}

#[test]
fn accumulated_micro_batches_equal_one_large_batch() {
    let large = Run::new();
    ok(&large.train(&["--set", "training.batch_size=4"], &[]));
    let micro = Run::new();
    ok(&micro.train(
        &[
            "--set",
            "training.batch_size=1",
            "--set",
            "training.gradient_accumulation_steps=4",
        ],
        &[],
    ));
    // Same losses and gradient norms at every step, then the same weights.
    for ((la, ga), (lb, gb)) in step_metrics(&large).into_iter().zip(step_metrics(&micro)) {
        // The loss is a mean over more or fewer f32 values: rounding differs in the 7th digit.
        assert!((la - lb).abs() <= 1e-5 * la.abs(), "loss {la} vs {lb}");
        assert!(
            (ga - gb).abs() <= 1e-6 * ga.abs(),
            "gradient norm {ga} vs {gb}"
        );
    }
    // The same update (the acceptance: 1e-6 after one optimizer step).
    let d = rel_diff(
        &weights(&large.ckpt("step_00000001")),
        &weights(&micro.ckpt("step_00000001")),
    );
    assert!(d <= 1e-6, "relative difference after one step {d}");
    // Later steps compound it through AdamW: an entry whose gradient is near `eps` moves by
    // up to lr per step whatever the rounding of its gradient (measured: 1.9e-6 after 4).
    let d = rel_diff(
        &weights(&large.ckpt("step_00000004")),
        &weights(&micro.ckpt("step_00000004")),
    );
    assert!(d <= 1e-5, "relative difference after four steps {d}");
}

#[test]
fn gradient_checkpointing_does_not_change_the_weights() {
    let keep = Run::new();
    ok(&keep.train(&[], &[]));
    let recompute = Run::new();
    ok(&recompute.train(&["--set", "training.gradient_checkpointing=true"], &[]));
    assert_eq!(step_metrics(&keep), step_metrics(&recompute));
    let d = rel_diff(
        &weights(&keep.ckpt("step_00000004")),
        &weights(&recompute.ckpt("step_00000004")),
    );
    assert!(d <= 1e-6, "relative difference {d}");
}

#[test]
fn a_non_finite_step_is_skipped_without_touching_weights_or_optimizer() {
    let run = Run::new();
    let out = run.train(&[], &[("SEPDIST_TEST_NAN_AT_STEPS", "3")]);
    ok(&out);
    assert!(
        text(&out.stderr).contains(
            "step 3: non-finite loss or gradient, step skipped (1 consecutive, 1 in all)"
        )
    );
    for file in ["model.safetensors", "optimizer-00000.safetensors"] {
        let before = std::fs::read(run.ckpt("step_00000002").join(file)).unwrap();
        let after = std::fs::read(run.ckpt("step_00000003").join(file)).unwrap();
        assert!(before == after, "{file} changed in the skipped step");
    }
    assert_ne!(
        weights(&run.ckpt("step_00000003")),
        weights(&run.ckpt("step_00000004"))
    );
    let metrics = std::fs::read_to_string(run.out().join("metrics.jsonl")).unwrap();
    let skipped: Vec<bool> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["kind"] == "train")
        .map(|r| r["skipped"].as_bool().unwrap())
        .collect();
    assert_eq!(skipped, [false, false, true, false]);
}

#[test]
fn consecutive_non_finite_steps_stop_training_naming_the_step() {
    let run = Run::new();
    let out = run.train(
        &["--set", "training.max_consecutive_skips=2"],
        &[("SEPDIST_TEST_NAN_AT_STEPS", "2,3")],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains(
            "error: step 3: 2 consecutive optimizer steps had a non-finite loss or gradient"
        ),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_corrupted_checkpoint_is_refused_and_auto_falls_back_to_the_previous() {
    let run = Run::new();
    let out = run.train(&[], &[("SEPDIST_TEST_STOP_AFTER_STEPS", "3")]);
    assert_eq!(out.status.code(), Some(143));
    let newest = run.ckpt("step_00000003");
    let victim = newest.join("model.safetensors");
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    std::fs::write(&victim, bytes).unwrap();

    let out = run.train(&["--resume", newest.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!(
            "error: {}: checksum mismatch (the file is corrupted or was changed after saving)\n",
            victim.display()
        )
    );
    let out = run.train(&["--resume", "auto"], &[]);
    ok(&out);
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!(
            "resumed from {} at step 2",
            run.ckpt("step_00000002").display()
        )),
        "{err}"
    );
}

#[test]
fn a_checkpoint_of_another_model_is_refused_listing_the_parameters() {
    let run = Run::new();
    ok(&run.train(&["--set", "training.max_steps=1"], &[]));
    let out = run.train(
        &["--resume", "auto", "--set", "model.ffn_hidden_dim=[32,24]"],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("the checkpoint's parameters differ from the model's:"),
        "{err}"
    );
    assert!(
        err.contains(
            "layers.0.band.ff.fc1.weight: f32 [32, 16] in the checkpoint, f32 [24, 16] in the model"
        ),
        "{err}"
    );
    assert!(err.contains("layers.0.band.ff.fc1.bias"), "{err}");
    assert!(!err.contains("layers.0.time"), "{err}");
}

#[test]
fn init_from_loads_matching_weights_and_names_the_rest() {
    let run = Run::new();
    ok(&run.train(&["--set", "training.max_steps=1"], &[]));
    let source = run.ckpt("step_00000001");
    let tuned = Run::new();
    let out = tuned.train(
        &[
            "--init-from",
            source.to_str().unwrap(),
            "--set",
            "model.mask_hidden_dim=24",
            "--set",
            "training.max_steps=1",
        ],
        &[],
    );
    ok(&out);
    let err = text(&out.stderr);
    assert!(err.contains("initialised "), "{err}");
    assert!(
        err.contains("not loaded (kept their fresh initialisation):"),
        "{err}"
    );
    assert!(
        err.contains("mask_estimators.drums.groups.0.layers.0.weight"),
        "{err}"
    );
    assert!(!err.contains("  layers.0.time.attn.qkv.weight"), "{err}");
}

#[test]
fn sigint_writes_a_checkpoint_at_the_next_step_and_exits_130() {
    let run = Run::new();
    let child = run
        .command(&[
            "--set",
            "training.max_steps=100000",
            "--set",
            "training.checkpoint_every=0",
            "--set",
            "dataset.samples_per_epoch=1000000",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until training has made progress, then interrupt.
    let metrics = run.out().join("metrics.jsonl");
    let start = std::time::Instant::now();
    while !std::fs::read_to_string(&metrics).is_ok_and(|m| m.lines().count() >= 2) {
        assert!(start.elapsed().as_secs() < 120, "training did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("stopped by signal 2 after step "),
        "{stdout}"
    );
    let pointer = std::fs::read_to_string(run.out().join("checkpoints/latest")).unwrap();
    let resumed = run.train(
        &[
            "--resume",
            "latest",
            "--set",
            &format!(
                "training.max_steps={}",
                1 + pointer.trim_start_matches("step_").parse::<u64>().unwrap()
            ),
        ],
        &[],
    );
    ok(&resumed);
    // Nothing half-written is left behind.
    let hidden: Vec<String> = std::fs::read_dir(run.out().join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(hidden.is_empty(), "{hidden:?}");
}

#[test]
fn the_quickstart_config_trains_a_few_steps() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sepdist"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["--config", "configs/quickstart.yaml"])
        .arg("--set")
        .arg(format!(
            "training.output_dir={}",
            dir.path().join("out").display()
        ))
        .arg("--set")
        .arg(format!(
            "dataset.root={}",
            dir.path().join("data").display()
        ))
        .args([
            "--set",
            "dataset.synthetic.tracks=3",
            "--set",
            "dataset.synthetic.seconds=2",
            "--set",
            "training.max_steps=2",
            "--set",
            "training.batch_size=2",
        ])
        .output()
        .unwrap();
    ok(&out);
    let err = text(&out.stderr);
    assert!(err.contains("generated the synthetic dataset"), "{err}");
    assert!(err.contains("step 0: validation loss"), "{err}");
    let metrics = std::fs::read_to_string(dir.path().join("out/metrics.jsonl")).unwrap();
    assert_eq!(
        metrics.lines().filter(|l| l.contains("\"train\"")).count(),
        2
    );
    assert!(
        dir.path()
            .join("out/checkpoints/step_00000002/model.safetensors")
            .is_file()
    );
}

#[test]
fn settings_this_build_cannot_honour_are_refused_with_exit_2() {
    let run = Run::new();
    let out = run.train(&["--set", "distributed.backend=nccl"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).starts_with("error: distributed.backend: nccl is not available"));
    assert!(!run.out().join("checkpoints").exists());
}
