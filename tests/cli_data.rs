#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions
//! `sepdist data synth` and `sepdist data check` through the real binary.

mod common;
use common::{run as sepdist, text};

use std::path::Path;

fn synth(out: &Path) {
    let out = sepdist(&[
        "data",
        "synth",
        "--out",
        out.to_str().unwrap(),
        "--tracks",
        "3",
        "--seconds",
        "1",
        "--seed",
        "7",
        "--sample-rate",
        "8000",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn synth_then_check_reports_no_problems() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("synthetic");
    let out = sepdist(&[
        "data",
        "synth",
        "--out",
        root.to_str().unwrap(),
        "--tracks",
        "3",
        "--seconds",
        "1",
        "--seed",
        "7",
        "--sample-rate",
        "8000",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!(
            "wrote {}: 2 train and 1 test tracks of 1.00 s at 8000 Hz\n",
            root.display()
        )
    );
    let out = sepdist(&[
        "data",
        "check",
        root.to_str().unwrap(),
        "--sample-rate",
        "8000",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!("{}: no problems\n", root.display())
    );
}

#[test]
fn check_reports_exactly_the_corrupted_file_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("synthetic");
    synth(&root);
    let victim = root.join("train/synth_001/bass.wav");
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[..12].copy_from_slice(b"NOT A WAVE!!");
    std::fs::write(&victim, bytes).unwrap();

    let out = sepdist(&[
        "data",
        "check",
        root.to_str().unwrap(),
        "--sample-rate",
        "8000",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    assert!(
        lines[0].starts_with(&format!("{}: ", victim.display())),
        "{stdout}"
    );
    assert_eq!(
        text(&out.stderr),
        format!("{}: 1 problem(s)\n", root.display())
    );
}

#[test]
fn check_with_the_wrong_rate_names_every_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("synthetic");
    synth(&root);
    let out = sepdist(&["data", "check", root.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    // 3 tracks × (4 stems + mixture), each at 8000 Hz instead of 44100.
    let stdout = text(&out.stdout);
    assert_eq!(stdout.lines().count(), 15, "{stdout}");
    assert!(
        stdout
            .lines()
            .all(|l| l.contains("8000") && l.contains("44100")),
        "{stdout}"
    );
}

#[test]
fn synth_takes_its_defaults_from_a_config_and_flags_win() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("from_config");
    let out = sepdist(&[
        "data",
        "synth",
        "--config",
        "configs/quickstart.yaml",
        "--set",
        &format!("dataset.root={}", root.display()),
        "--tracks",
        "2",
        "--seconds",
        "0.5",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(root.join("train/synth_000/vocals.wav").is_file());
    assert!(root.join("test/synth_001/mixture.wav").is_file());
}

#[test]
fn data_usage_errors_exit_2() {
    let out = sepdist(&["data", "synth"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--out"));
    let out = sepdist(&["data", "synth", "--out", "x", "--tracks", "many"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("invalid value 'many' for '--tracks <N>'"));
    let out = sepdist(&["data", "check"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn synth_argument_errors_are_one_line_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let out = sepdist(&[
        "data",
        "synth",
        "--out",
        dir.path().to_str().unwrap(),
        "--tracks",
        "0",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.starts_with("error: "), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}
