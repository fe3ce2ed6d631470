#![allow(clippy::unwrap_used)]
//! MUSDB18 `.stem.mp4` input: decoding the five streams, `format: stem_mp4` through the WAV
//! cache, conversion to the MUSDB18-HQ layout. Fixtures: tests/fixtures/stem_mp4/README.md.

use sepdist_config::{Config, DatasetConfig, DatasetFormat};
use sepdist_data::stem::{self, STREAMS};
use sepdist_data::wav::SampleFormat;
use sepdist_data::{DataError, Musdb, Sampler, check_dataset};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/stem_mp4")
}

fn fixture(split: &str, name: &str) -> PathBuf {
    fixtures().join(split).join(format!("{name}.stem.mp4"))
}

/// (frequency Hz, amplitude) of each stream, in file order (see the fixtures README). ffmpeg's
/// mono-to-stereo upmix scales by 1/√2.
const TONES: [(f64, f64); 5] = [
    (1000.0, 0.0625),
    (200.0, 0.125),
    (300.0, 0.03125),
    (500.0, 0.0625),
    (700.0, 0.125),
];

fn rms(x: &[f32]) -> f64 {
    (x.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / x.len() as f64).sqrt()
}

/// Frequency from the number of rising zero crossings.
fn frequency(x: &[f32], rate: u32) -> f64 {
    let crossings = x.windows(2).filter(|w| w[0] < 0.0 && w[1] >= 0.0).count();
    crossings as f64 * f64::from(rate) / x.len() as f64
}

/// A copy of the fixture dataset in a temporary folder (the cache is written into the root).
fn dataset() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("musdb18");
    for split in ["train", "test"] {
        std::fs::create_dir_all(root.join(split)).unwrap();
        for f in stem::stem_files(&fixtures().join(split)).unwrap() {
            std::fs::copy(&f, root.join(split).join(f.file_name().unwrap())).unwrap();
        }
    }
    (dir, root)
}

fn config(root: &Path, format: DatasetFormat, rate: u32) -> DatasetConfig {
    DatasetConfig {
        root: root.to_path_buf(),
        format,
        sample_rate: rate,
        segment_length: 1024,
        validation_tracks: vec!["Beta - Two".into()],
        ..DatasetConfig::default()
    }
}

fn check_streams(name: &str, rate: u32, source_rate: u32) {
    let path = fixture(
        if name == "Gamma - Three" {
            "test"
        } else {
            "train"
        },
        name,
    );
    let streams = stem::read_stems(&path, rate).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(streams.len(), 5);
    for (i, (d, &(freq, amplitude))) in streams.iter().zip(&TONES).enumerate() {
        let what = format!("{name} stream {i} ({})", STREAMS[i]);
        assert_eq!(d.source_rate, source_rate, "{what}");
        assert_eq!(d.source_channels, 2, "{what}");
        // The edit list is applied: 1 s exactly (the encoder's 1024 priming frames and the
        // padding of the last packet are gone), not 1 s + up to two AAC frames.
        let n = d.audio.frames();
        assert!(
            n.abs_diff(rate as usize) <= 2,
            "{what}: {n} frames at {rate} Hz"
        );
        let expected = amplitude / 2f64.sqrt() / 2f64.sqrt();
        let mid = &d.audio.left[n / 5..4 * n / 5];
        let level = rms(mid);
        // 15%: AAC at 32 kbit/s itself shifts these tone levels by up to 12% (ffmpeg's own
        // decoder measures the same); the stream levels differ by factors of 2.
        assert!(
            (level - expected).abs() < 0.15 * expected,
            "{what}: RMS {level}, expected {expected}"
        );
        let f = frequency(mid, rate);
        assert!((f - freq).abs() < 0.02 * freq, "{what}: {f} Hz, not {freq}");
        // Priming dropped: the tone is there from the first frames (without the edit list the
        // first 1024 frames would be the encoder's near-silent priming).
        let head = rms(&d.audio.left[64..512]);
        assert!(head > 0.7 * expected, "{what}: start RMS {head}");
        let right = rms(&d.audio.right[n / 5..4 * n / 5]);
        assert!(
            (right - level).abs() < 1e-3 * level,
            "{what}: channels differ"
        );
    }
}

#[test]
fn the_five_streams_decode_in_musdb_order_with_their_tones_and_levels() {
    check_streams("Alpha - One", 44100, 44100);
}

#[test]
fn a_48_khz_file_is_resampled() {
    check_streams("Beta - Two", 44100, 48000);
}

#[test]
fn a_stream_is_read_by_name_and_a_missing_one_names_the_file() {
    let path = fixture("train", "Alpha - One");
    let vocals = stem::read_stream(&path, "vocals", 44100).unwrap();
    let all = stem::read_stems(&path, 44100).unwrap();
    assert_eq!(vocals, all[4]);

    let e = stem::read_stream(&path, "piano", 44100).unwrap_err();
    assert!(
        e.to_string().contains("`piano` is not a MUSDB18 stream"),
        "{e}"
    );

    // A one-stream MP4 has no drums.
    let m4a =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/decode/tone_44100_stereo.m4a");
    let e = stem::read_stream(&m4a, "drums", 44100).unwrap_err();
    assert_eq!(e.path(), Some(m4a.as_path()));
    assert!(e.to_string().contains("no `drums` stream"), "{e}");
}

#[test]
fn stem_mp4_format_opens_through_the_cache_and_produces_examples() {
    let (_dir, root) = dataset();
    let data = Musdb::from_config(&config(&root, DatasetFormat::StemMp4, 8000)).unwrap();
    let names = |t: &[sepdist_data::Track]| t.iter().map(|t| t.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&data.train), ["Alpha - One"]);
    assert_eq!(names(&data.valid), ["Beta - Two"]);
    assert_eq!(names(&data.test), ["Gamma - Three"]);
    assert!(data.skipped.is_empty(), "{:?}", data.skipped);
    assert_eq!(data.root, root);
    let cache = root.join(".sepdist-wav-cache/8000");
    assert!(data.train[0].mixture.starts_with(&cache));
    assert!(cache.join("test/Gamma - Three/vocals.wav").is_file());
    for t in data.train.iter().chain(&data.valid) {
        assert!(t.frames.abs_diff(8000) <= 2, "{}: {}", t.name, t.frames);
    }

    let cfg = Config {
        dataset: config(&root, DatasetFormat::StemMp4, 8000),
        ..Config::default()
    };
    let sampler = Sampler::from_config(&data, &cfg).unwrap();
    let ex = sampler.example(0, 3).unwrap();
    assert_eq!(ex.mixture.len(), 2 * 1024);
    assert_eq!(ex.stems.len(), 4 * 2 * 1024);
    assert!(rms(&ex.stems) > 0.005, "silent example");

    // The cached WAVs pass the dataset check.
    assert_eq!(check_dataset(&cache, &cfg.dataset.sources, 8000), []);
}

fn modified(root: &Path) -> Vec<(PathBuf, SystemTime)> {
    let mut out = Vec::new();
    for split in ["train", "test"] {
        let dir = root.join(".sepdist-wav-cache/8000").join(split);
        for t in std::fs::read_dir(dir).unwrap() {
            for f in std::fs::read_dir(t.unwrap().path()).unwrap() {
                let p = f.unwrap().path();
                let m = std::fs::metadata(&p).unwrap().modified().unwrap();
                out.push((p, m));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn auto_detects_stem_files_and_the_cache_is_reused_until_a_source_changes() {
    let (_dir, root) = dataset();
    let cfg = config(&root, DatasetFormat::Auto, 8000);
    let first = Musdb::from_config(&cfg).unwrap();
    let before = modified(&root);
    assert_eq!(before.len(), 3 * 5);

    let second = Musdb::from_config(&cfg).unwrap();
    assert_eq!(modified(&root), before, "the cache was rebuilt");
    assert_eq!(first.train, second.train);

    // A newer source rebuilds that track only.
    let beta = root.join("train/Beta - Two.stem.mp4");
    let later = SystemTime::now() + Duration::from_secs(5);
    std::fs::File::options()
        .write(true)
        .open(&beta)
        .unwrap()
        .set_modified(later)
        .unwrap();
    Musdb::from_config(&cfg).unwrap();
    let after = modified(&root);
    for ((path, old), (_, new)) in before.iter().zip(&after) {
        let in_beta = path.to_string_lossy().contains("Beta - Two");
        assert_eq!(old != new, in_beta, "{}", path.display());
    }

    // A track whose file is gone leaves the cache.
    std::fs::remove_file(root.join("test/Gamma - Three.stem.mp4")).unwrap();
    let data = Musdb::from_config(&cfg).unwrap();
    assert!(data.test.is_empty());
    assert!(
        !root
            .join(".sepdist-wav-cache/8000/test/Gamma - Three")
            .exists()
    );
}

#[test]
fn a_corrupt_stem_file_is_skipped_naming_it() {
    let (_dir, root) = dataset();
    let bad = root.join("train/Delta - Bad.stem.mp4");
    let mut bytes = std::fs::read(fixture("train", "Alpha - One")).unwrap();
    bytes.truncate(bytes.len() / 3);
    std::fs::write(&bad, &bytes).unwrap();
    let data = Musdb::from_config(&config(&root, DatasetFormat::StemMp4, 8000)).unwrap();
    assert_eq!(data.train.len(), 1);
    assert_eq!(data.skipped.len(), 1, "{:?}", data.skipped);
    assert_eq!(data.skipped[0].path(), Some(bad.as_path()));
    assert!(
        !root
            .join(".sepdist-wav-cache/8000/train/Delta - Bad")
            .exists()
    );
    // Nothing half-written is left next to the splits.
    let leftovers: Vec<_> = std::fs::read_dir(root.join(".sepdist-wav-cache/8000"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 2, "{leftovers:?}");
}

#[test]
fn a_source_that_is_no_musdb_stream_is_refused() {
    let (_dir, root) = dataset();
    let mut cfg = config(&root, DatasetFormat::StemMp4, 8000);
    cfg.sources = vec!["piano".into()];
    let e = Musdb::from_config(&cfg).unwrap_err();
    assert!(matches!(e, DataError::Argument(_)), "{e:?}");
    assert!(e.to_string().contains("piano"), "{e}");
}

#[test]
fn convert_writes_the_hq_layout_skips_done_tracks_and_reports_bad_files() {
    let (_dir, root) = dataset();
    let bad = root.join("test/Broken.stem.mp4");
    std::fs::write(&bad, b"not an mp4 at all").unwrap();
    let out = root.parent().unwrap().join("hq");
    let mut lines = Vec::new();
    let report = sepdist_data::convert_dataset(
        &root,
        &out,
        44100,
        SampleFormat::I16,
        false,
        |i, n, name, p| {
            lines.push(format!(
                "{i}/{n} {name} {}",
                match p {
                    stem::Progress::Converted => "converted".to_string(),
                    stem::Progress::Skipped => "skipped".to_string(),
                    stem::Progress::Failed(e) => format!("failed: {e}"),
                }
            ))
        },
    )
    .unwrap();
    assert_eq!((report.converted, report.skipped), (3, 0), "{lines:?}");
    assert_eq!(report.failed.len(), 1);
    assert_eq!(report.failed[0].path(), Some(bad.as_path()));
    assert!(
        lines[2].starts_with("3/4 test/Broken failed: "),
        "{lines:?}"
    );
    assert!(
        lines[2].contains("Broken.stem.mp4: not an MP4 file"),
        "{lines:?}"
    );
    let sources: Vec<String> = STREAMS[1..].iter().map(|s| s.to_string()).collect();
    assert_eq!(check_dataset(&out, &sources, 44100), []);
    let info = sepdist_data::wav::info(&out.join("train/Alpha - One/bass.wav")).unwrap();
    assert_eq!((info.bits_per_sample, info.float), (16, false));

    let again = sepdist_data::convert_dataset(
        &root,
        &out,
        44100,
        SampleFormat::I16,
        false,
        |_, _, _, _| {},
    )
    .unwrap();
    assert_eq!(
        (again.converted, again.skipped, again.failed.len()),
        (0, 3, 1)
    );
    let forced =
        sepdist_data::convert_dataset(&root, &out, 44100, SampleFormat::F32, true, |_, _, _, _| {})
            .unwrap();
    assert_eq!(forced.converted, 3);
}
