#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions
//! MUSDB18 `.stem.mp4` datasets through the real binary: `sepdist data convert` to the
//! MUSDB18-HQ layout, `sepdist data check` on the result and on the stem files themselves.
//! Fixtures: crates/sepdist-data/tests/fixtures/stem_mp4 (README there).

mod common;
use common::{run as sepdist, text};

use std::path::{Path, PathBuf};
use std::process::Command;

/// A copy of the fixture dataset plus a corrupt `.stem.mp4` in train/.
fn dataset(dir: &Path) -> (PathBuf, PathBuf) {
    let root = clean_dataset(dir);
    let bad = root.join("train/Broken - Track.stem.mp4");
    let mut bytes = std::fs::read(root.join("train/Alpha - One.stem.mp4")).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&bad, bytes).unwrap();
    (root, bad)
}

/// A copy of the fixture dataset (three tracks, one in test/).
fn clean_dataset(dir: &Path) -> PathBuf {
    let fixtures =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/sepdist-data/tests/fixtures/stem_mp4");
    let root = dir.join("musdb18");
    for split in ["train", "test"] {
        std::fs::create_dir_all(root.join(split)).unwrap();
        for e in std::fs::read_dir(fixtures.join(split)).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, root.join(split).join(p.file_name().unwrap())).unwrap();
        }
    }
    root
}

#[test]
fn convert_writes_the_hq_layout_that_check_accepts_and_reports_a_corrupt_file() {
    let dir = tempfile::tempdir().unwrap();
    let (root, bad) = dataset(dir.path());
    let out = dir.path().join("hq");
    let (src, dst) = (root.to_str().unwrap(), out.to_str().unwrap());

    let run = sepdist(&["data", "convert", src, dst, "--format", "pcm16"]);
    let err = text(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{err}");
    // The corrupt file is named and the tracks after it are still converted.
    assert!(err.contains(&format!("{}:", bad.display())), "{err}");
    assert!(err.contains("[3/4] train/Broken - Track: error: "), "{err}");
    assert!(err.contains("[4/4] test/Gamma - Three: converted"), "{err}");
    assert_eq!(
        text(&run.stdout),
        format!("{dst}: 3 converted, 0 skipped, 1 failed\n")
    );
    for track in [
        "train/Alpha - One",
        "train/Beta - Two",
        "test/Gamma - Three",
    ] {
        for stem in ["mixture", "drums", "bass", "other", "vocals"] {
            let wav = out.join(track).join(format!("{stem}.wav"));
            assert!(wav.is_file(), "{}", wav.display());
        }
    }
    assert!(!out.join("train/Broken - Track").exists());

    let check = sepdist(&["data", "check", dst]);
    assert!(check.status.success(), "{}", text(&check.stdout));
    assert_eq!(text(&check.stdout), format!("{dst}: no problems\n"));

    // A second run skips what is done; --force converts again.
    std::fs::remove_file(&bad).unwrap();
    let again = sepdist(&["data", "convert", src, dst]);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert!(
        text(&again.stderr).contains("[1/3] train/Alpha - One: already converted, skipped"),
        "{}",
        text(&again.stderr)
    );
    assert_eq!(
        text(&again.stdout),
        format!("{dst}: 0 converted, 3 skipped, 0 failed\n")
    );
    let forced = sepdist(&["data", "convert", src, dst, "--force"]);
    assert!(forced.status.success(), "{}", text(&forced.stderr));
    assert_eq!(
        text(&forced.stdout),
        format!("{dst}: 3 converted, 0 skipped, 0 failed\n")
    );
}

#[test]
fn check_reads_stem_files_directly_and_names_a_corrupt_one() {
    let dir = tempfile::tempdir().unwrap();
    let (root, bad) = dataset(dir.path());
    let check = sepdist(&["data", "check", root.to_str().unwrap()]);
    let out = text(&check.stdout);
    assert_eq!(check.status.code(), Some(1), "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "{out}");
    assert!(
        lines[0].starts_with(&format!("{}: ", bad.display())),
        "{out}"
    );
}

#[test]
fn a_training_run_reads_a_stem_mp4_dataset_with_validation_tracks() {
    let dir = tempfile::tempdir().unwrap();
    let root = clean_dataset(dir.path());
    let out = dir.path().join("out");
    let run = Command::new(env!("CARGO_BIN_EXE_sepdist"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("RUST_BACKTRACE")
        .args(["train", "--config", "tests/fixtures/tiny.yaml"])
        .args(["--set", "dataset.format=stem_mp4"])
        .arg("--set")
        .arg(format!("dataset.root={}", root.display()))
        .args(["--set", r#"dataset.validation_tracks=["Beta - Two"]"#])
        .arg("--set")
        .arg(format!("training.output_dir={}", out.display()))
        .args(["--set", "training.eval_every=2"])
        .output()
        .unwrap();
    let err = text(&run.stderr);
    assert!(run.status.success(), "{err}");
    // The cache is built once, at 8 kHz (the config's rate), and reported once.
    assert_eq!(err.matches("into the WAV cache").count(), 1, "{err}");
    assert!(
        root.join(".sepdist-wav-cache/8000/test/Gamma - Three/vocals.wav")
            .is_file()
    );
    assert!(err.contains("validation loss"), "{err}");
    assert!(
        text(&run.stdout).starts_with("finished 4 optimizer steps"),
        "{}",
        text(&run.stdout)
    );
}
