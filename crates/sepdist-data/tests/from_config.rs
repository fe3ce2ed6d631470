#![allow(clippy::unwrap_used)]
//! Opening a dataset from its config section.

use sepdist_config::{DatasetConfig, DatasetFormat};
use sepdist_data::Musdb;

fn synthetic_config(root: &std::path::Path) -> DatasetConfig {
    let mut cfg = DatasetConfig {
        root: root.to_path_buf(),
        format: DatasetFormat::Synthetic,
        sample_rate: 8000,
        validation_tracks: vec!["synth_000".into()],
        ..DatasetConfig::default()
    };
    cfg.synthetic.tracks = 5;
    cfg.synthetic.seconds = 0.5;
    cfg
}

#[test]
fn synthetic_format_generates_a_missing_dataset_then_opens_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("synthetic");
    let cfg = synthetic_config(&root);
    let data = Musdb::from_config(&cfg).unwrap();
    assert!(root.join("train/synth_000/mixture.wav").is_file());
    let names = |tracks: &[sepdist_data::Track]| -> Vec<String> {
        tracks.iter().map(|t| t.name.clone()).collect()
    };
    assert_eq!(names(&data.valid), ["synth_000"]);
    assert_eq!(names(&data.train), ["synth_001", "synth_002", "synth_003"]);
    assert_eq!(names(&data.test), ["synth_004"]);
    assert!(data.skipped.is_empty());

    // An existing dataset is opened as it is, not regenerated.
    let marker = root.join("train/synth_001/mixture.wav");
    let before = std::fs::metadata(&marker).unwrap().modified().unwrap();
    Musdb::from_config(&cfg).unwrap();
    assert_eq!(
        std::fs::metadata(&marker).unwrap().modified().unwrap(),
        before
    );
}

#[test]
fn wav_format_with_a_missing_root_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = synthetic_config(&dir.path().join("absent"));
    cfg.format = DatasetFormat::Wav;
    let e = Musdb::from_config(&cfg).unwrap_err().to_string();
    assert!(e.contains("absent"), "{e}");
    assert!(!dir.path().join("absent").exists());
}
