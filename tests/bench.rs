#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions
//! `sepdist bench --profile`: the step split by block kind.

mod common;
use common::{ok, sepdist, text};
use std::path::PathBuf;

const TINY: &str = "tests/fixtures/tiny.yaml";

/// The tiny config's dataset, generated once for this file's tests (two tests generating
/// `data/musdb18hq` side by side would read each other's half-written tracks).
fn data_root() -> PathBuf {
    static ROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| common::tiny_dataset("bench-tests"))
        .clone()
}

/// A profile row: block kind, blocks, forward s, backward s, per block s, share %.
fn row(stdout: &str, kind: &str) -> (usize, f64, f64, f64, f64) {
    let line = stdout
        .lines()
        .find(|l| l.trim_start().starts_with(kind))
        .unwrap_or_else(|| panic!("no profile row '{kind}' in:\n{stdout}"));
    let fields: Vec<&str> = line[line.find(kind).unwrap() + kind.len()..]
        .split_whitespace()
        .collect();
    let num = |i: usize| -> f64 { fields[i].parse().unwrap_or_else(|_| panic!("{line}")) };
    (fields[0].parse().unwrap(), num(1), num(2), num(3), num(4))
}

#[test]
fn the_profile_splits_the_step_by_block_kind() {
    let out = sepdist()
        .args(["bench", "--config", TINY, "--steps", "2", "--warmup", "1"])
        .args(["--set", "model.n_layers=2", "--profile", "--set"])
        .arg(format!("dataset.root={}", data_root().display()))
        .output()
        .unwrap();
    ok(&out);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("device synchronized at block boundaries"),
        "{stdout}"
    );
    let mut blocks_share = 0.0;
    for (kind, count) in [
        ("band split", 1),
        ("time transformer", 2),
        ("band transformer", 2),
        ("head", 1),
    ] {
        let (blocks, forward, backward, per_block, share) = row(&stdout, kind);
        assert_eq!(blocks, count, "{kind}:\n{stdout}");
        assert!(forward > 0.0 && backward > 0.0, "{kind}:\n{stdout}");
        // Printed to 4 decimals: per block is the kind's total over its blocks.
        let expected = (forward + backward) / count as f64;
        assert!((per_block - expected).abs() <= 2e-4, "{kind}:\n{stdout}");
        blocks_share += share;
    }
    // The blocks' time is part of the step: what is left (data, optimizer) is not negative.
    let outside: f64 = stdout
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("outside the blocks"))
        .and_then(|rest| rest.trim().strip_suffix('%'))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no 'outside the blocks' row in:\n{stdout}"));
    assert!(outside >= 0.0, "{stdout}");
    assert!((blocks_share + outside - 100.0).abs() < 0.3, "{stdout}");
}

#[test]
fn without_profile_there_is_no_profile() {
    let out = sepdist()
        .args([
            "bench", "--config", TINY, "--steps", "1", "--warmup", "0", "--set",
        ])
        .arg(format!("dataset.root={}", data_root().display()))
        .output()
        .unwrap();
    ok(&out);
    assert!(
        !text(&out.stdout).contains("profile"),
        "{}",
        text(&out.stdout)
    );
}
