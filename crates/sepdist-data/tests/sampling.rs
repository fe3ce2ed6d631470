//! Sampler determinism (across world sizes, processes and runs), augmentation, bad files, and
//! the background loader.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;

use common::{SR, bits, sources, synth};
use sepdist_config::AugmentConfig;
use sepdist_data::wav;
use sepdist_data::{DataError, Loader, Musdb, Sampler, Schedule};
use std::path::Path;
use std::sync::Arc;

const SEG: usize = 2000;

fn sampler(root: &Path, augment: AugmentConfig, seed: u64) -> Sampler {
    let m = Musdb::open(root, &sources(), SR, &[]).unwrap();
    Sampler::new(m.train, SR, SEG, augment, seed).unwrap()
}

/// All examples of optimizer step `step`, concatenated in rank then micro-step order.
fn global_step(s: &Sampler, sched: &Schedule, step: u64) -> (Vec<(u64, u64)>, Vec<u32>, Vec<u32>) {
    let (mut ids, mut mix, mut stems) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..sched.world_size {
        for m in 0..sched.accumulation {
            let b = s.batch(sched, step, r, m).unwrap();
            assert_eq!(b.mixture_shape, [sched.batch_size, 2, SEG]);
            assert_eq!(b.stems_shape, [sched.batch_size, 4, 2, SEG]);
            assert_eq!(b.mixture.len(), sched.batch_size * 2 * SEG);
            assert_eq!(b.stems.len(), sched.batch_size * 4 * 2 * SEG);
            ids.extend(b.ids);
            mix.extend(bits(&b.mixture));
            stems.extend(bits(&b.stems));
        }
    }
    (ids, mix, stems)
}

#[test]
fn world_sizes_1_2_4_see_bitwise_identical_global_batches() {
    let d = tempfile::tempdir().unwrap();
    synth(d.path(), 5, 1.0, 21);
    let s = sampler(d.path(), AugmentConfig::default(), 7);
    // G = 8 everywhere; 20 samples per epoch -> 3 steps per epoch; steps 0..5 cross into epoch 1.
    let configs = [(8, 1, 1), (2, 2, 2), (1, 2, 4)];
    for step in 0..5u64 {
        let runs: Vec<_> = configs
            .iter()
            .map(|&(b, a, w)| global_step(&s, &Schedule::new(b, a, w, 20).unwrap(), step))
            .collect();
        let epoch = step / 3;
        let first = (step % 3) * 8;
        assert_eq!(
            runs[0].0,
            (first..first + 8).map(|i| (epoch, i)).collect::<Vec<_>>()
        );
        for r in &runs[1..] {
            assert_eq!(r.0, runs[0].0, "step {step}: ids");
            assert!(r.1 == runs[0].1, "step {step}: mixture differs");
            assert!(r.2 == runs[0].2, "step {step}: stems differ");
        }
    }
    // Epochs differ: (epoch 1, index 0) is not (epoch 0, index 0).
    assert_ne!(
        s.example(0, 0).unwrap().stems,
        s.example(1, 0).unwrap().stems
    );
    // The same example from a fresh sampler, asked in another order, is identical.
    let fresh = sampler(d.path(), AugmentConfig::default(), 7);
    let _ = fresh.example(3, 3).unwrap();
    assert_eq!(
        bits(&fresh.example(1, 5).unwrap().stems),
        bits(&s.example(1, 5).unwrap().stems)
    );
    // Another seed gives other examples.
    let other = sampler(d.path(), AugmentConfig::default(), 8);
    assert_ne!(
        other.example(0, 0).unwrap().stems,
        s.example(0, 0).unwrap().stems
    );
}

const CHILD_OUT: &str = "SEPDIST_DATA_TEST_CHILD_OUT";
const CHILD_ROOT: &str = "SEPDIST_DATA_TEST_CHILD_ROOT";

fn example_bytes(root: &Path) -> Vec<u8> {
    let s = sampler(root, AugmentConfig::default(), 99);
    let e = s.example(2, 1234).unwrap();
    e.mixture
        .iter()
        .chain(&e.stems)
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

#[test]
fn same_example_in_a_new_process() {
    // Child mode: compute the example and write its bytes where the parent said.
    if let (Ok(out), Ok(root)) = (std::env::var(CHILD_OUT), std::env::var(CHILD_ROOT)) {
        std::fs::write(out, example_bytes(Path::new(&root))).unwrap();
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("data");
    synth(&root, 4, 1.0, 5);
    // The parent computes other examples first: no hidden state may leak into the result.
    let warm = sampler(&root, AugmentConfig::default(), 99);
    for i in 0..5 {
        warm.example(0, i).unwrap();
    }
    let mine = example_bytes(&root);
    let out = d.path().join("child.bin");
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "same_example_in_a_new_process",
            "--exact",
            "--test-threads=1",
        ])
        .env(CHILD_OUT, &out)
        .env(CHILD_ROOT, &root)
        .output()
        .unwrap();
    assert!(
        child.status.success(),
        "child failed: {}{}",
        String::from_utf8_lossy(&child.stdout),
        String::from_utf8_lossy(&child.stderr)
    );
    let theirs = std::fs::read(&out).expect("the child wrote its example");
    assert_eq!(theirs.len(), (2 + 4 * 2) * SEG * 4);
    assert!(theirs == mine, "example differs between processes");
}

/// Full stereo audio of every stem of every train track.
fn stems_of(root: &Path) -> Vec<Vec<wav::Stereo>> {
    let m = Musdb::open(root, &sources(), SR, &[]).unwrap();
    m.train
        .iter()
        .map(|t| {
            t.stems
                .iter()
                .map(|p| wav::read(p, None).unwrap())
                .collect()
        })
        .collect()
}

#[test]
fn without_remix_all_stems_share_track_and_offset_and_gain_applies() {
    let d = tempfile::tempdir().unwrap();
    synth(d.path(), 4, 1.0, 8);
    let aug = AugmentConfig {
        remix: false,
        gain: [0.5, 0.5],
        channel_swap: false,
        polarity_flip: false,
    };
    let s = sampler(d.path(), aug, 3);
    let audio = stems_of(d.path());
    for index in 0..4 {
        let e = s.example(0, index).unwrap();
        let stem = |k: usize, c: usize| &e.stems[(2 * k + c) * SEG..(2 * k + c + 1) * SEG];
        // Find the track and offset: every stem, both channels, must be 0.5 × the source.
        let found = audio.iter().any(|track| {
            let n = track[0].frames();
            (0..=n - SEG).any(|o| {
                track.iter().enumerate().all(|(k, st)| {
                    stem(k, 0)
                        .iter()
                        .zip(&st.left[o..o + SEG])
                        .all(|(a, b)| *a == 0.5 * b)
                        && stem(k, 1)
                            .iter()
                            .zip(&st.right[o..o + SEG])
                            .all(|(a, b)| *a == 0.5 * b)
                })
            })
        });
        assert!(found, "example {index} is not one track at one offset");
        // Mixture = sum of the augmented stems.
        for i in 0..2 * SEG {
            let sum: f32 = (0..4).fold(0.0, |acc, k| acc + e.stems[k * 2 * SEG + i]);
            assert_eq!(e.mixture[i].to_bits(), sum.to_bits());
        }
    }
}

#[test]
fn augmentation_flips_swaps_and_scales_within_range() {
    let d = tempfile::tempdir().unwrap();
    synth(d.path(), 3, 1.0, 8);
    let s = sampler(d.path(), AugmentConfig::default(), 4);
    let audio = stems_of(d.path());
    let (mut flips, mut swaps, mut checked) = (0, 0, 0);
    for index in 0..16 {
        let e = s.example(0, index).unwrap();
        for k in 0..4 {
            let left = &e.stems[2 * k * SEG..(2 * k + 1) * SEG];
            let right = &e.stems[(2 * k + 1) * SEG..(2 * k + 2) * SEG];
            if left.iter().all(|v| v.abs() < 0.1) {
                continue; // a rest in this stem: nothing to locate
            }
            checked += 1;
            // Locate the source window by the ratio to the stem of each track (gain unknown).
            let mut hit = None;
            'search: for track in &audio {
                let st = &track[k];
                for o in 0..=st.frames() - SEG {
                    for (swap, a, b) in [(false, &st.left, &st.right), (true, &st.right, &st.left)]
                    {
                        let (src_l, src_r) = (&a[o..o + SEG], &b[o..o + SEG]);
                        let Some(j) = src_l.iter().position(|v| v.abs() > 0.05) else {
                            continue;
                        };
                        let g = left[j] / src_l[j];
                        if !g.is_finite() || g.abs() < 0.2 {
                            continue;
                        }
                        let close = |x: &[f32], y: &[f32]| {
                            x.iter().zip(y).all(|(p, q)| (p - g * q).abs() <= 1e-6)
                        };
                        if close(left, src_l) && close(right, src_r) {
                            hit = Some((g, swap));
                            break 'search;
                        }
                    }
                }
            }
            let (g, swap) =
                hit.unwrap_or_else(|| panic!("example {index} stem {k}: no source window"));
            assert!((0.25 - 1e-5..=1.25 + 1e-5).contains(&g.abs()), "gain {g}");
            flips += (g < 0.0) as usize;
            swaps += swap as usize;
        }
    }
    // Each 50 %: both outcomes must occur, in plausible proportions.
    assert!(checked >= 40, "only {checked} non-silent stems");
    assert!(
        flips >= checked / 6 && flips <= checked * 5 / 6,
        "flips {flips}/{checked}"
    );
    assert!(
        swaps >= checked / 6 && swaps <= checked * 5 / 6,
        "swaps {swaps}/{checked}"
    );
}

#[test]
fn bad_file_is_replaced_deterministically_and_reported_once() {
    let d = tempfile::tempdir().unwrap();
    synth(d.path(), 5, 1.0, 13);
    let bad = d.path().join("train/synth_001/vocals.wav");
    let bytes = std::fs::read(&bad).unwrap();
    std::fs::write(&bad, &bytes[..bytes.len() / 10]).unwrap(); // header intact, data cut short
    let run = || {
        let s = sampler(d.path(), AugmentConfig::default(), 17);
        let examples: Vec<Vec<u32>> = (0..24)
            .map(|i| {
                let e = s.example(0, i).unwrap();
                bits(&e.stems).into_iter().chain(bits(&e.mixture)).collect()
            })
            .collect();
        (examples, s.bad_files())
    };
    let (a, bad_a) = run();
    let (b, bad_b) = run();
    assert_eq!(bad_a, vec![bad.clone()], "reported exactly once");
    assert_eq!(bad_b, vec![bad]);
    assert!(a == b, "replacements differ between runs");
}

#[test]
fn unreadable_data_gives_an_error_after_bounded_attempts() {
    let d = tempfile::tempdir().unwrap();
    synth(d.path(), 2, 0.5, 1);
    let s = sampler(d.path(), AugmentConfig::default(), 1).with_max_attempts(3);
    std::fs::remove_dir_all(d.path().join("train")).unwrap();
    match s.example(0, 0) {
        Err(DataError::TooManyBadFiles {
            attempts: 3, last, ..
        }) => {
            assert!(
                last.path().is_some_and(|p| p.starts_with(d.path())),
                "{last}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn loader_delivers_direct_batches_in_order_from_any_step() {
    let d = tempfile::tempdir().unwrap();
    synth(d.path(), 4, 1.0, 30);
    let s = Arc::new(sampler(d.path(), AugmentConfig::default(), 5));
    let sched = Schedule::new(2, 2, 2, 10).unwrap(); // 2 steps per epoch
    let got: Vec<_> = Loader::new(Arc::clone(&s), sched, 1, 3, Some(6), 3, 2)
        .unwrap()
        .map(|b| b.unwrap())
        .collect();
    let order: Vec<_> = got.iter().map(|b| (b.step, b.micro)).collect();
    assert_eq!(order, [(3, 0), (3, 1), (4, 0), (4, 1), (5, 0), (5, 1)]);
    for b in &got {
        assert_eq!(*b, s.batch(&sched, b.step, 1, b.micro).unwrap());
    }
    // Without an end: take a few and drop; the workers stop (the test would hang otherwise).
    let mut endless = Loader::new(Arc::clone(&s), sched, 0, 0, None, 2, 1).unwrap();
    let first = endless.next().unwrap().unwrap();
    assert_eq!(first, s.batch(&sched, 0, 0, 0).unwrap());
    assert!(endless.next().unwrap().is_ok());
    drop(endless);
    assert!(
        Loader::new(s, sched, 2, 0, None, 1, 1).is_err(),
        "rank out of range"
    );
}

#[test]
fn loader_worker_error_reaches_the_consumer() {
    let d = tempfile::tempdir().unwrap();
    synth(d.path(), 2, 0.5, 2);
    let s = Arc::new(sampler(d.path(), AugmentConfig::default(), 5).with_max_attempts(2));
    std::fs::remove_dir_all(d.path().join("train")).unwrap();
    let sched = Schedule::new(1, 1, 1, 10).unwrap();
    let items: Vec<_> = Loader::new(s, sched, 0, 0, Some(2), 2, 2)
        .unwrap()
        .collect();
    assert_eq!(items.len(), 2);
    for item in items {
        assert!(
            matches!(item, Err(DataError::TooManyBadFiles { .. })),
            "{item:?}"
        );
    }
}
