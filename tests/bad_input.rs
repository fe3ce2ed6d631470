#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions
//! Bad input everywhere, through the real binary: malformed and out-of-range option values of
//! every subcommand, broken config files and overrides, broken WAVs, broken checkpoints, and a
//! dataset folder with every kind of broken file. Each run has `RUST_BACKTRACE=1` (as on many
//! clusters and in CI) and must end with a one-paragraph `error: ...` and its exit code: never
//! a panic, never a backtrace. (The fuzz targets of the readers themselves are in
//! crates/sepdist-config/tests/fuzz.rs and crates/sepdist-data/tests/fuzz.rs.)

mod common;
use common::{ok, sepdist, text, tiny_dataset};

use std::path::{Path, PathBuf};
use std::process::Output;

const TINY: &str = "tests/fixtures/tiny.yaml";
const QUICKSTART: &str = "configs/quickstart.yaml";

/// Runs `sepdist ARGS` with backtraces requested and checks that nothing panicked and no
/// backtrace was printed.
fn run(args: &[&str]) -> Output {
    let out = sepdist()
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .env("RUST_LIB_BACKTRACE", "1")
        .output()
        .unwrap();
    no_panic(args, &out);
    out
}

fn no_panic(args: &[&str], out: &Output) {
    let err = text(&out.stderr);
    let what = format!(
        "sepdist {}: exit {:?}\nstderr:\n{err}",
        args.join(" "),
        out.status.code()
    );
    assert!(!err.contains("panicked"), "a panic: {what}");
    assert!(
        !err.to_lowercase().contains("stack backtrace") && !err.contains("RUST_BACKTRACE"),
        "a backtrace: {what}"
    );
    // A panic exits 101, an abort (allocation failure) dies of a signal.
    assert!(matches!(out.status.code(), Some(0..=2)), "crashed: {what}");
}

/// Asserts exit `code` with an `error:` message containing `fragment`.
fn fails(args: &[&str], code: i32, fragment: &str) -> String {
    let out = run(args);
    let err = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(code),
        "sepdist {}\nstderr:\n{err}",
        args.join(" ")
    );
    assert!(err.contains("error"), "sepdist {}: {err}", args.join(" "));
    assert!(
        err.contains(fragment),
        "sepdist {}: expected `{fragment}` in\n{err}",
        args.join(" ")
    );
    err
}

#[test]
fn malformed_numbers_and_choices_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let out = out.to_str().unwrap();
    let cases: &[&[&str]] = &[
        // config
        &["config", "show", QUICKSTART, "--world-size", "-1"],
        &["config", "show", QUICKSTART, "--world-size", "abc"],
        &["config", "show", QUICKSTART, "--world-size", "1.5"],
        &[
            "config",
            "show",
            QUICKSTART,
            "--world-size",
            "99999999999999999999999",
        ],
        &["config", "show", QUICKSTART, "--world-size", ""],
        // data synth
        &["data", "synth", "--out", out, "--tracks", "-1"],
        &["data", "synth", "--out", out, "--tracks", "1e3"],
        &[
            "data",
            "synth",
            "--out",
            out,
            "--tracks",
            "18446744073709551616",
        ],
        &["data", "synth", "--out", out, "--seconds", "abc"],
        &["data", "synth", "--out", out, "--seconds", "1,5"],
        &["data", "synth", "--out", out, "--seed", "-1"],
        &["data", "synth", "--out", out, "--seed", "0x10"],
        &["data", "synth", "--out", out, "--sample-rate", "44.1k"],
        &["data", "synth", "--out", out, "--sample-rate", "-8000"],
        &["data", "synth", "--out", out, "--sample-rate", "4294967296"],
        &["data", "synth", "--out", out, "--sample-rate", ""],
        // data check / convert
        &["data", "check", out, "--sample-rate", "abc"],
        &["data", "check", out, "--sample-rate", "1e5"],
        &["data", "convert", out, out, "--sample-rate", "x"],
        &["data", "convert", out, out, "--format", "wav"],
        // separate / eval
        &[
            "separate",
            "--checkpoint",
            out,
            "-o",
            out,
            "in.wav",
            "--overlap",
            "abc",
        ],
        &[
            "separate",
            "--checkpoint",
            out,
            "-o",
            out,
            "in.wav",
            "--batch",
            "-1",
        ],
        &[
            "separate",
            "--checkpoint",
            out,
            "-o",
            out,
            "in.wav",
            "--batch",
            "x",
        ],
        &[
            "separate",
            "--checkpoint",
            out,
            "-o",
            out,
            "in.wav",
            "--chunk-seconds",
            "1s",
        ],
        &["eval", "--checkpoint", out, "--overlap", "0,5"],
        &["eval", "--checkpoint", out, "--batch", "1e2"],
        &["eval", "--checkpoint", out, "--split", "validation"],
        // missing values and operands
        &["train", "--config"],
        &["config", "check"],
        &["separate", "--checkpoint", out, "-o", out],
        &["plot"],
    ];
    for args in cases {
        let out = run(args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "sepdist {}\nstderr:\n{}",
            args.join(" "),
            text(&out.stderr)
        );
        let err = text(&out.stderr);
        assert!(
            err.starts_with("error: "),
            "sepdist {}: {err}",
            args.join(" ")
        );
    }
}

#[test]
fn absurd_but_well_formed_values_are_refused_cleanly() {
    // A setting bench does not time is refused, not silently replaced.
    fails(
        &[
            "bench",
            "--config",
            QUICKSTART,
            "--set",
            "distributed.zero_stage=3",
        ],
        2,
        "distributed.zero_stage: 3",
    );
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("synth");
    let out = out.to_str().unwrap();
    // Used to overflow or try to allocate petabytes.
    fails(
        &[
            "data",
            "synth",
            "--out",
            out,
            "--seconds",
            "1e30",
            "--tracks",
            "2",
        ],
        2,
        "limit",
    );
    fails(
        &[
            "data",
            "synth",
            "--out",
            out,
            "--tracks",
            "18446744073709551615",
        ],
        2,
        "limit",
    );
    fails(
        &[
            "data",
            "synth",
            "--out",
            out,
            "--seconds",
            "1000000",
            "--sample-rate",
            "4294967295",
        ],
        2,
        "limit",
    );
    fails(
        &["data", "synth", "--out", out, "--seconds", "nan"],
        1,
        "NaN",
    );
    fails(
        &["data", "synth", "--out", out, "--sample-rate", "0"],
        1,
        "sample rate 0 Hz",
    );
    // `config show` multiplies widths, layers and world sizes.
    let show = run(&[
        "config",
        "show",
        QUICKSTART,
        "--world-size",
        "18446744073709551615",
    ]);
    ok(&show);
    for set in [
        "model.emb_dim=4611686018427387904",
        "model.n_layers=18446744073709551615",
        "model.mask_hidden_dim=18446744073709551615",
        "model.mask_depth=18446744073709551615",
    ] {
        fails(
            &["config", "show", QUICKSTART, "--set", set],
            2,
            "implausibly large",
        );
    }
    fails(
        &[
            "config",
            "show",
            QUICKSTART,
            "--set",
            "training.batch_size=18446744073709551616",
        ],
        2,
        "training.batch_size",
    );
    fails(
        &[
            "config",
            "check",
            QUICKSTART,
            "--set",
            "dataset.synthetic.seconds=1e30",
        ],
        2,
        "dataset.synthetic",
    );
    fails(
        &[
            "config",
            "check",
            QUICKSTART,
            "--set",
            "model.bands=[18446744073709551615, 18446744073709551615]",
        ],
        2,
        "model.bands",
    );
}

#[test]
fn broken_config_files_and_overrides_exit_2_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, bytes: &[u8]| -> String {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p.to_str().unwrap().to_string()
    };
    let binary = file("binary.yaml", &[0xff, 0xfe, 0x00, 0x80, 0x81]);
    let syntax = file("syntax.yaml", b"model:\n  n_fft: [256\n");
    let tabs = file("tabs.yaml", b"model:\n\tn_fft: 256\n");
    let typed = file("typed.yaml", b"training:\n  batch_size: many\n");
    let unknown = file("unknown.yaml", b"trainig:\n  batch_size: 2\n");
    let alias = file("alias.yaml", b"model: *nothing\n");
    let deep = file("deep.yaml", "[".repeat(10_000).as_bytes());
    let missing = dir.path().join("missing.yaml");
    let missing = missing.to_str().unwrap();
    let folder = dir.path().to_str().unwrap();
    for config in [
        binary.as_str(),
        &syntax,
        &tabs,
        &typed,
        &unknown,
        &alias,
        &deep,
        missing,
        folder,
    ] {
        let name = Path::new(config).file_name().unwrap().to_str().unwrap();
        fails(&["config", "check", config], 2, name);
        fails(&["train", "--config", config], 2, name);
        fails(&["data", "check", "--config", config], 2, name);
        fails(&["data", "synth", "--config", config], 2, name);
    }
    for set in [
        "training.batch_size",
        "=2",
        "training..batch_size=2",
        "training.batch_size=[",
        "training.batch_size=-1",
        "training.batch_size=1e999",
        "training.batch_size.x=1",
        "trainig.batch_size=2",
        "model.bands=[1, [2]]",
        "training.optimizer.lr=.nan",
    ] {
        let err = fails(&["config", "check", QUICKSTART, "--set", set], 2, "error: ");
        assert!(
            err.contains(set) || err.contains("training.optimizer.lr"),
            "{set}: {err}"
        );
        assert_eq!(
            err.lines().next().map(|l| l.starts_with("error: ")),
            Some(true)
        );
    }
}

/// A copy of the tiny synthetic dataset (8 kHz) with one broken file of each kind; returns the
/// root and the broken paths with a word their problem line must contain.
fn broken_dataset(dir: &Path) -> (PathBuf, Vec<(PathBuf, &'static str)>) {
    let root = dir.join("data");
    let out = run(&[
        "data",
        "synth",
        "--out",
        root.to_str().unwrap(),
        "--tracks",
        "7",
        "--seconds",
        "0.5",
        "--sample-rate",
        "8000",
        "--seed",
        "9",
    ]);
    ok(&out);
    let other_rate = dir.join("other_rate");
    let out = run(&[
        "data",
        "synth",
        "--out",
        other_rate.to_str().unwrap(),
        "--tracks",
        "2",
        "--seconds",
        "0.5",
        "--sample-rate",
        "16000",
    ]);
    ok(&out);
    let f = |track: &str, stem: &str| root.join("train").join(track).join(format!("{stem}.wav"));
    let missing = f("synth_000", "bass");
    std::fs::remove_file(&missing).unwrap();
    let empty = f("synth_001", "drums");
    std::fs::write(&empty, b"").unwrap();
    let rate = f("synth_002", "vocals");
    std::fs::copy(other_rate.join("train/synth_000/vocals.wav"), &rate).unwrap();
    let truncated = f("synth_003", "other");
    let bytes = std::fs::read(&truncated).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let text_file = f("synth_004", "mixture");
    std::fs::write(&text_file, "this is a text file, not audio\n").unwrap();
    let mp3 = f("synth_004", "drums");
    std::fs::write(&mp3, b"ID3\x04\x00\x00\x00\x00\x00\x00 not really an mp3").unwrap();
    let header_only = root.join("test/synth_006/mixture.wav");
    let bytes = std::fs::read(&header_only).unwrap();
    std::fs::write(&header_only, &bytes[..20]).unwrap();
    (
        root,
        vec![
            (missing, "missing file"),
            (empty, "empty file"),
            (rate, "sample rate 16000 Hz, expected 8000 Hz"),
            (truncated, "truncated"),
            (text_file, "not a WAV file"),
            (mp3, "not a WAV file (an MP3 file)"),
            (header_only, "unreadable"),
        ],
    )
}

#[test]
fn data_check_lists_every_broken_file_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let (root, broken) = broken_dataset(dir.path());
    let out = run(&[
        "data",
        "check",
        root.to_str().unwrap(),
        "--sample-rate",
        "8000",
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{}", text(&out.stderr));
    for (path, what) in &broken {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("{}: ", path.display())))
            .unwrap_or_else(|| panic!("{} is not listed:\n{stdout}", path.display()));
        assert!(line.contains(what), "`{what}` expected in `{line}`");
    }
    // Every line names a broken file (the wrong rate also makes a length mismatch).
    for line in stdout.lines() {
        assert!(
            broken
                .iter()
                .any(|(p, _)| line.starts_with(&format!("{}: ", p.display()))),
            "unexpected problem line `{line}`:\n{stdout}"
        );
    }
    let count = stdout.lines().count();
    assert!(count >= broken.len(), "{stdout}");
    assert_eq!(
        text(&out.stderr),
        format!("{}: {count} problem(s)\n", root.display())
    );
    // The same through a config file.
    let out = run(&[
        "data",
        "check",
        "--config",
        TINY,
        "--set",
        &format!("dataset.root={}", root.display()),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stdout), stdout);
}

/// The run folder of a tiny model trained for 4 steps (about a second), for the subcommands
/// that take a checkpoint.
fn checkpoint(dir: &Path) -> PathBuf {
    let data = tiny_dataset("bad-input");
    let run_dir = dir.join("run");
    let out = sepdist()
        .args(["train", "--config", TINY, "--set"])
        .arg(format!("training.output_dir={}", run_dir.display()))
        .arg("--set")
        .arg(format!("dataset.root={}", data.display()))
        .output()
        .unwrap();
    ok(&out);
    run_dir
}

#[test]
fn bad_audio_files_bad_checkpoints_and_bad_chunking_are_clean_errors() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = checkpoint(dir.path());
    let ckpt = std::fs::canonicalize(&ckpt).unwrap();
    let ckpt = ckpt.to_str().unwrap();
    let sep = dir.path().join("separated");
    let sep = sep.to_str().unwrap();

    // Songs: one good, the others broken in every way; the good one is still separated.
    let data = tiny_dataset("bad-input");
    let good = data.join("train/synth_000/mixture.wav");
    let songs = dir.path().join("songs");
    std::fs::create_dir_all(&songs).unwrap();
    let song = |name: &str, bytes: &[u8]| -> String {
        let p = songs.join(name);
        std::fs::write(&p, bytes).unwrap();
        p.to_str().unwrap().to_string()
    };
    let wav = std::fs::read(&good).unwrap();
    // A truncated WAV is separated up to the cut (as players do); `data check` reports it.
    let truncated = song("truncated.wav", &wav[..wav.len() / 2]);
    let bad = [
        song("empty.wav", b""),
        song("text.wav", b"not audio at all\n"),
        song("header.wav", &wav[..30]),
        song(
            "garbage.m4a",
            &[0u8, 0, 0, 0x20, b'f', b't', b'y', b'p', 0xff, 0xff],
        ),
        song("huge_box.mp4", b"\xff\xff\xff\xf0ftypisom\x00\x00\x00\x00"),
    ];
    let missing = songs.join("missing.flac");
    let mut args = vec![
        "separate",
        "--checkpoint",
        ckpt,
        "-o",
        sep,
        good.to_str().unwrap(),
    ];
    args.push(&truncated);
    args.extend(bad.iter().map(String::as_str));
    args.push(missing.to_str().unwrap());
    let err = fails(&args, 1, &format!("{} of 8 inputs failed", bad.len() + 1));
    for name in [
        "empty.wav",
        "text.wav",
        "header.wav",
        "garbage.m4a",
        "huge_box.mp4",
    ] {
        assert!(err.contains(name), "{name} is not named:\n{err}");
    }
    assert!(err.contains("missing.flac"), "{err}");
    assert!(err.contains("empty.wav: empty file (0 bytes)"), "{err}");
    assert!(
        Path::new(sep).join("truncated/vocals.wav").is_file(),
        "{err}"
    );
    assert!(Path::new(sep).join("mixture/vocals.wav").is_file(), "{err}");

    // Chunking values that parse but make no sense.
    for (flag, value) in [
        ("--overlap", "1.5"),
        ("--overlap", "-0.5"),
        ("--overlap", "nan"),
        ("--chunk-seconds", "0"),
        ("--chunk-seconds", "-1"),
        ("--chunk-seconds", "inf"),
        ("--batch", "0"),
    ] {
        let out = run(&[
            "separate",
            "--checkpoint",
            ckpt,
            "-o",
            sep,
            good.to_str().unwrap(),
            flag,
            value,
        ]);
        assert_ne!(out.status.code(), Some(0), "{flag} {value} was accepted");
        let err = text(&out.stderr);
        assert!(err.starts_with("error: "), "{flag} {value}: {err}");
    }

    // Broken checkpoints: missing, empty folder, garbage files, truncated weights.
    let broken = dir.path().join("broken");
    std::fs::create_dir_all(broken.join("empty")).unwrap();
    let garbage = broken.join("garbage");
    std::fs::create_dir_all(&garbage).unwrap();
    let best = Path::new(ckpt).join("checkpoints/best_model");
    for entry in std::fs::read_dir(&best).unwrap() {
        let p = entry.unwrap().path();
        std::fs::write(
            garbage.join(p.file_name().unwrap()),
            b"{ not json or weights",
        )
        .unwrap();
    }
    let truncated = broken.join("truncated");
    std::fs::create_dir_all(&truncated).unwrap();
    for entry in std::fs::read_dir(&best).unwrap() {
        let p = entry.unwrap().path();
        let bytes = std::fs::read(&p).unwrap();
        let keep = if p.extension().is_some_and(|e| e == "safetensors") {
            bytes.len() / 2
        } else {
            bytes.len()
        };
        std::fs::write(truncated.join(p.file_name().unwrap()), &bytes[..keep]).unwrap();
    }
    for bad_ckpt in [
        broken.join("missing"),
        broken.join("empty"),
        garbage,
        truncated,
    ] {
        let bad_ckpt = bad_ckpt.to_str().unwrap();
        fails(
            &[
                "separate",
                "--checkpoint",
                bad_ckpt,
                "-o",
                sep,
                good.to_str().unwrap(),
            ],
            1,
            "cannot load checkpoint",
        );
        fails(
            &["eval", "--checkpoint", bad_ckpt],
            1,
            "cannot load checkpoint",
        );
        let out = run(&[
            "train",
            "--config",
            TINY,
            "--set",
            &format!("dataset.root={}", data.display()),
            "--set",
            &format!("training.output_dir={}", dir.path().join("run2").display()),
            "--init-from",
            bad_ckpt,
        ]);
        assert_ne!(
            out.status.code(),
            Some(0),
            "--init-from {bad_ckpt} was accepted"
        );
    }

    // Estimates and references that are not audio.
    let est = dir.path().join("est/synth_000");
    let refs = dir.path().join("ref/synth_000");
    std::fs::create_dir_all(&est).unwrap();
    std::fs::create_dir_all(&refs).unwrap();
    for s in ["drums", "bass", "other", "vocals"] {
        std::fs::write(est.join(format!("{s}.wav")), b"junk").unwrap();
        std::fs::copy(
            data.join(format!("train/synth_000/{s}.wav")),
            refs.join(format!("{s}.wav")),
        )
        .unwrap();
    }
    let out = run(&[
        "eval",
        "--estimates",
        dir.path().join("est").to_str().unwrap(),
        "--references",
        dir.path().join("ref").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("est/synth_000/"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn plot_of_garbage_metrics_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path();
    std::fs::write(
        run_dir.join("metrics.jsonl"),
        b"{\"step\": 1, \"loss\": \"x\"}\nnot json\n\xff\xfe\n{\"step\": -1e400}\n",
    )
    .unwrap();
    let out = run(&["plot", run_dir.to_str().unwrap()]);
    if !out.status.success() {
        assert!(
            text(&out.stderr).starts_with("error: "),
            "{}",
            text(&out.stderr)
        );
    }
    fails(
        &["plot", dir.path().join("nothing").to_str().unwrap()],
        1,
        "metrics.jsonl",
    );
}

/// Chunk sizes beyond memory (`--chunk-seconds 1e300`, `100000`, a huge `--batch` with long
/// chunks) are clamped to the song: the separation runs at the song's size.
#[test]
fn chunks_beyond_memory_are_clamped_to_the_song() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = checkpoint(dir.path());
    let song = tiny_dataset("bad-input").join("train/synth_000/mixture.wav");
    let sep = dir.path().join("separated");
    for extra in [
        &["--chunk-seconds", "1e300"][..],
        &["--chunk-seconds", "100000"],
        &["--batch", "100000", "--chunk-seconds", "1000"],
    ] {
        let mut args = vec![
            "separate",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "-o",
            sep.to_str().unwrap(),
            song.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let out = run(&args);
        assert!(out.status.success(), "{extra:?}: {}", text(&out.stderr));
        assert!(sep.join("mixture/vocals.wav").is_file());
    }
}
