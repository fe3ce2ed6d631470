//! Helpers shared by the root integration tests, which drive the real `sepdist` binary.
// Each test file compiles this module on its own and uses a different part of it.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The binary, run from the repository root, without backtraces.
pub fn sepdist() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sepdist"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("RUST_BACKTRACE");
    cmd
}

/// Runs `sepdist ARGS...` to completion.
pub fn run(args: &[&str]) -> Output {
    sepdist()
        .args(args)
        .output()
        .expect("the sepdist binary runs")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts success, showing both streams otherwise.
pub fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// `sepdist train --config CONFIG` on the dataset at `root`, writing to `out`, with `--set`
/// overrides `sets`, more arguments and environment.
pub fn train_on(
    config: &str,
    root: &Path,
    out: &Path,
    sets: &[&str],
    args: &[&str],
    env: &[(&str, &str)],
) -> Output {
    let mut cmd = sepdist();
    cmd.args(["train", "--config", config])
        .arg("--set")
        .arg(format!("training.output_dir={}", out.display()))
        .arg("--set")
        .arg(format!("dataset.root={}", root.display()))
        .args(args);
    for s in sets {
        cmd.args(["--set", s]);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// The small synthetic dataset of `tests/fixtures/tiny.yaml` (4 tracks of 1 s at 8 kHz),
/// generated once per test process under a name unique to `tag`.
pub fn tiny_dataset(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sepdist-{tag}-{}", std::process::id()));
    if !dir.join("train").is_dir() {
        let out = sepdist()
            .args(["data", "synth", "--out"])
            .arg(&dir)
            .args([
                "--tracks",
                "4",
                "--seconds",
                "1",
                "--seed",
                "5",
                "--sample-rate",
                "8000",
            ])
            .output()
            .unwrap();
        ok(&out);
    }
    dir
}

/// The flat fp32 weights of a checkpoint directory, in name order.
pub fn weights(dir: &Path) -> Vec<f32> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    names
        .iter()
        .flat_map(|n| {
            st.tensor(n)
                .unwrap()
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// `‖a − b‖ / ‖a‖` over the whole weight vector. Element-wise ratios are not meaningful
/// after AdamW: an entry whose gradient is far below `eps` moves by `lr · g / eps`, so
/// rounding-level differences in such gradients show up amplified in that entry alone.
pub fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let norm: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum();
    (diff / norm).sqrt()
}
