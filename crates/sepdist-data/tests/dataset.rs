//! Synthetic generator, MUSDB layout opening, evaluation chunks and the dataset checker.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;

use common::{SR, bits, sources, synth, tree};
use sepdist_data::check::ProblemKind;
use sepdist_data::wav::{self, SampleFormat, Stereo};
use sepdist_data::{ChunkIter, Musdb, check_dataset};
use std::path::{Path, PathBuf};

#[test]
fn synth_is_deterministic_per_seed() {
    let d = tempfile::tempdir().unwrap();
    let (a, b, c) = (d.path().join("a"), d.path().join("b"), d.path().join("c"));
    synth(&a, 3, 1.0, 11);
    synth(&b, 3, 1.0, 11);
    synth(&c, 3, 1.0, 12);
    let (ta, tb, tc) = (tree(&a), tree(&b), tree(&c));
    assert_eq!(ta.len(), 3 * 5);
    assert_eq!(ta, tb, "same seed must give identical bytes");
    let names: Vec<_> = ta.iter().map(|(p, _)| p.clone()).collect();
    assert_eq!(names, tc.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>());
    for ((p, x), (_, y)) in ta.iter().zip(&tc) {
        assert_ne!(x, y, "{} identical across seeds", p.display());
    }
    // Different tracks of one set differ too (own tempo, key, progression).
    let mix = |t: &str| std::fs::read(a.join("train").join(t).join("mixture.wav")).unwrap();
    assert_ne!(mix("synth_000"), mix("synth_001"));
}

#[test]
fn synth_layout_mixture_is_sum_and_never_clips() {
    let d = tempfile::tempdir().unwrap();
    let s = synth(d.path(), 5, 1.5, 3);
    assert_eq!(
        s.train,
        ["synth_000", "synth_001", "synth_002", "synth_003"]
    );
    assert_eq!(s.test, ["synth_004"]);
    assert_eq!((s.frames, s.sample_rate), (12_000, SR));
    for (split, names) in [("train", &s.train), ("test", &s.test)] {
        for name in names {
            let dir = d.path().join(split).join(name);
            let mut stems = Vec::new();
            for src in sources() {
                let p = dir.join(format!("{src}.wav"));
                let info = wav::info(&p).unwrap();
                assert!(info.float && info.frames == 12_000 && info.channels == 2);
                let x = wav::read(&p, Some(SR)).unwrap();
                assert!(
                    x.left.iter().any(|v| v.abs() > 1e-3),
                    "{} silent",
                    p.display()
                );
                stems.push(x);
            }
            let mix = wav::read(&dir.join("mixture.wav"), Some(SR)).unwrap();
            let mut sum = Stereo::zeros(12_000);
            for st in &stems {
                for i in 0..12_000 {
                    sum.left[i] += st.left[i];
                    sum.right[i] += st.right[i];
                }
            }
            assert_eq!(
                bits(&mix.left),
                bits(&sum.left),
                "{name}: mixture != sum of stems"
            );
            assert_eq!(bits(&mix.right), bits(&sum.right));
            let peak = mix
                .left
                .iter()
                .chain(&mix.right)
                .fold(0f32, |m, v| m.max(v.abs()));
            assert!(peak > 0.5 && peak < 1.0, "{name}: peak {peak}");
        }
    }
    assert_eq!(check_dataset(d.path(), &sources(), SR), vec![]);
}

#[test]
fn synth_with_custom_sources_and_single_track() {
    let d = tempfile::tempdir().unwrap();
    let custom: Vec<String> = ["piano", "vocals", "sub"].map(String::from).to_vec();
    let s = sepdist_data::generate(d.path(), 1, 0.5, 9, SR, &custom).unwrap();
    assert_eq!((s.train.len(), s.test.len()), (1, 0));
    for f in ["piano", "vocals", "sub", "mixture"] {
        assert!(d.path().join(format!("train/synth_000/{f}.wav")).is_file());
    }
    assert!(!d.path().join("test").exists());
    assert_eq!(check_dataset(d.path(), &custom, SR), vec![]);
    // Unusable arguments are errors, not panics.
    assert!(sepdist_data::generate(d.path(), 0, 1.0, 1, SR, &custom).is_err());
    assert!(sepdist_data::generate(d.path(), 1, -1.0, 1, SR, &custom).is_err());
    let dup: Vec<String> = ["a", "a"].map(String::from).to_vec();
    assert!(sepdist_data::generate(d.path(), 1, 1.0, 1, SR, &dup).is_err());
}

#[test]
fn open_lists_sorted_tracks_and_holds_out_validation() {
    let d = tempfile::tempdir().unwrap();
    synth(d.path(), 5, 0.5, 1);
    let valid = ["synth_001".to_string(), "Not In This Set".to_string()];
    let m = Musdb::open(d.path(), &sources(), SR, &valid).unwrap();
    let names = |t: &[sepdist_data::Track]| t.iter().map(|t| t.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&m.train), ["synth_000", "synth_002", "synth_003"]);
    assert_eq!(names(&m.valid), ["synth_001"]);
    assert_eq!(names(&m.test), ["synth_004"]);
    assert!(
        m.train
            .iter()
            .all(|t| t.frames == 4000 && t.stems.len() == 4)
    );
    assert_eq!(
        m.train[0].stems[3],
        d.path().join("train/synth_000/vocals.wav")
    );
    assert!(m.skipped.is_empty());

    // A track with a wrong-rate file is skipped with an error naming the file.
    let bad = d.path().join("train/synth_002/bass.wav");
    wav::write(&bad, &Stereo::zeros(4000), 16_000, SampleFormat::F32).unwrap();
    let m = Musdb::open(d.path(), &sources(), SR, &[]).unwrap();
    assert_eq!(names(&m.train), ["synth_000", "synth_001", "synth_003"]);
    assert_eq!(m.skipped.len(), 1);
    assert_eq!(m.skipped[0].path(), Some(bad.as_path()));

    // No train folder: an error naming it.
    let err = Musdb::open(&d.path().join("missing"), &sources(), SR, &[]).unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
}

#[test]
fn chunks_cover_whole_tracks_with_zero_padded_tail() {
    let d = tempfile::tempdir().unwrap();
    synth(d.path(), 2, 1.0, 5);
    let m = Musdb::open(d.path(), &sources(), SR, &["synth_000".into()]).unwrap();
    let tracks: Vec<_> = m.valid.iter().chain(&m.test).cloned().collect();
    let chunks: Vec<_> = ChunkIter::new(tracks, SR, 3000)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    assert_eq!(chunks.len(), 6); // 8000 frames: 3000 + 3000 + 2000, two tracks
    let order: Vec<_> = chunks
        .iter()
        .map(|c| (c.track.as_str(), c.index, c.valid_frames))
        .collect();
    assert_eq!(
        order,
        [
            ("synth_000", 0, 3000),
            ("synth_000", 1, 3000),
            ("synth_000", 2, 2000),
            ("synth_001", 0, 3000),
            ("synth_001", 1, 3000),
            ("synth_001", 2, 2000)
        ]
    );
    let full_mix = wav::read(&d.path().join("train/synth_000/mixture.wav"), None).unwrap();
    let full_vocals = wav::read(&d.path().join("train/synth_000/vocals.wav"), None).unwrap();
    let last = &chunks[2];
    assert_eq!(
        (last.frames, last.mixture.len(), last.stems.len()),
        (3000, 6000, 4 * 6000)
    );
    assert_eq!(last.mixture[..2000], full_mix.left[6000..]);
    assert!(last.mixture[2000..3000].iter().all(|&v| v == 0.0));
    assert_eq!(last.mixture[3000..5000], full_mix.right[6000..]);
    let vocals = &chunks[1].stems[3 * 6000..4 * 6000];
    assert_eq!(vocals[..3000], full_vocals.left[3000..6000]);
    assert_eq!(vocals[3000..], full_vocals.right[3000..6000]);
    assert!(ChunkIter::new(vec![], SR, 0).is_err());
}

fn rewrite(path: &Path, frames: usize, rate: u32) {
    let x = Stereo {
        left: vec![0.1; frames],
        right: vec![-0.1; frames],
    };
    wav::write(path, &x, rate, SampleFormat::F32).unwrap();
}

fn kinds(problems: &[sepdist_data::Problem]) -> Vec<(PathBuf, &'static str)> {
    problems
        .iter()
        .map(|p| {
            let k = match p.kind {
                ProblemKind::Unreadable(_) => "unreadable",
                ProblemKind::Truncated { .. } => "truncated",
                ProblemKind::MissingFile => "missing",
                ProblemKind::SampleRate { .. } => "rate",
                ProblemKind::LengthMismatch { .. } => "length",
                ProblemKind::Silent => "silent",
                ProblemKind::EmptySplit => "empty",
                ProblemKind::MissingTrainSplit => "no-train",
                ProblemKind::MissingRoot => "no-root",
                ProblemKind::InvalidArgument(_) => "argument",
            };
            (p.path.clone(), k)
        })
        .collect()
}

#[test]
fn check_reports_every_bad_file_case_with_its_path() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    synth(root, 7, 0.5, 2); // 6 train tracks, 1 test track
    let f = |t: &str, s: &str| root.join("train").join(t).join(format!("{s}.wav"));
    // Corrupted header.
    let corrupt = f("synth_000", "drums");
    let mut bytes = std::fs::read(&corrupt).unwrap();
    bytes[..12].copy_from_slice(b"JUNKJUNKJUNK");
    std::fs::write(&corrupt, bytes).unwrap();
    // Truncated: data shorter than the header says.
    let truncated = f("synth_001", "bass");
    let bytes = std::fs::read(&truncated).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    // Missing stem.
    let missing = f("synth_002", "vocals");
    std::fs::remove_file(&missing).unwrap();
    // Wrong sample rate (same length).
    let rate = f("synth_003", "other");
    rewrite(&rate, 4000, 16_000);
    // Length mismatch.
    let short = f("synth_004", "drums");
    rewrite(&short, 3000, SR);
    // Silence-only mixture.
    let silent = f("synth_005", "mixture");
    wav::write(&silent, &Stereo::zeros(4000), SR, SampleFormat::F32).unwrap();

    let problems = check_dataset(root, &sources(), SR);
    assert_eq!(
        kinds(&problems),
        vec![
            (corrupt.clone(), "unreadable"),
            (truncated.clone(), "truncated"),
            (missing.clone(), "missing"),
            (rate.clone(), "rate"),
            (short.clone(), "length"),
            (silent.clone(), "silent"),
        ]
    );
    let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
    assert!(
        text[0].starts_with(&format!("{}: unreadable WAV", corrupt.display())),
        "{}",
        text[0]
    );
    assert!(
        text[1].contains("header promises 4000 frames"),
        "{}",
        text[1]
    );
    assert!(
        text[3].ends_with("sample rate 16000 Hz, expected 8000 Hz"),
        "{}",
        text[3]
    );
    assert!(
        text[4].contains("3000 frames") && text[4].contains("4000 frames"),
        "{}",
        text[4]
    );
    match &problems[1].kind {
        ProblemKind::Truncated { decoded_frames, .. } => assert!(*decoded_frames < 2000),
        k => panic!("{k:?}"),
    }
}

#[test]
fn corrupting_one_wav_of_a_synthetic_set_reports_exactly_that_file() {
    let d = tempfile::tempdir().unwrap();
    synth(d.path(), 3, 0.5, 4);
    let victim = d.path().join("test/synth_002/other.wav");
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[8..12].copy_from_slice(b"XXXX"); // "WAVE" tag
    std::fs::write(&victim, bytes).unwrap();
    let problems = check_dataset(d.path(), &sources(), SR);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].path, victim);
}

#[test]
fn check_reports_split_level_problems() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    assert_eq!(
        kinds(&check_dataset(&root.join("nothing"), &sources(), SR)),
        [(root.join("nothing"), "no-root")]
    );
    assert_eq!(
        kinds(&check_dataset(root, &sources(), SR)),
        [(root.join("train"), "no-train")]
    );
    std::fs::create_dir_all(root.join("train")).unwrap();
    std::fs::create_dir_all(root.join("test")).unwrap();
    assert_eq!(
        kinds(&check_dataset(root, &sources(), SR)),
        [(root.join("train"), "empty"), (root.join("test"), "empty")]
    );
}
