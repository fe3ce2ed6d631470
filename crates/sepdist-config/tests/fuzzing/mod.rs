//! A small fuzzing harness on top of proptest, shared by the fuzz targets of sepdist-config
//! and sepdist-data (the latter includes this file by path).
//!
//! A normal `cargo test` runs each target for a modest number of cases (a few seconds).
//! Environment variables make the same targets fuzz for longer:
//!
//! - `SEPDIST_FUZZ_SECS=60`: run each target for (at least) 60 s, in rounds of
//!   `SEPDIST_FUZZ_CASES` cases with a fresh seed per round;
//! - `SEPDIST_FUZZ_CASES=N`: cases per round (default: the target's own, small);
//! - `SEPDIST_FUZZ_SEED=K`: seed of the first round (default: from the clock), printed on a
//!   finding so that it can be replayed;
//! - `SEPDIST_FUZZ_HANG_SECS=S`: a single case running longer than this (default 120 s) is a
//!   hang: its input is printed and the process aborts (a test cannot interrupt it otherwise).
//!
//! Each target prints `fuzz target NAME: C cases in S s (seeds K..L)` on stderr (visible with
//! `--nocapture`). A finding fails the test with proptest's minimised input and the seed.
#![allow(dead_code, clippy::unwrap_used)]

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestError, TestRunner};
use std::fmt::Debug;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The case each running target is on: (target, start, input).
static RUNNING: Mutex<Vec<(String, Instant, String)>> = Mutex::new(Vec::new());

/// Starts (once) a thread that aborts the process when a case hangs.
fn watchdog() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let limit = Duration::from_secs_f64(env("SEPDIST_FUZZ_HANG_SECS").unwrap_or(120.0));
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(Duration::from_secs(1));
                let running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
                for (name, start, input) in running.iter() {
                    if start.elapsed() > limit {
                        eprintln!(
                            "fuzz target {name}: a case has run for {:.0} s (hang); input: {input}",
                            start.elapsed().as_secs_f64()
                        );
                        std::process::abort();
                    }
                }
            }
        });
    });
}

/// Marks `name` as running `input` until dropped.
struct Running(String);

impl Running {
    fn new(name: &str, input: String) -> Self {
        let mut running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
        running.retain(|(n, _, _)| n != name);
        running.push((name.to_string(), Instant::now(), input));
        Running(name.to_string())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
        running.retain(|(n, _, _)| *n != self.0);
    }
}

fn env<T: std::str::FromStr>(name: &str) -> Option<T> {
    let text = std::env::var(name).ok()?;
    match text.trim().parse() {
        Ok(v) => Some(v),
        Err(_) => panic!("{name}={text:?} is not a number"),
    }
}

/// What a finished target did.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    pub cases: u64,
    pub elapsed: Duration,
}

/// Runs `property` on values of `strategy`: `default_cases` cases, or rounds of cases until
/// `SEPDIST_FUZZ_SECS` have passed. Panics inside `property` are findings (proptest catches
/// them), as is an `Err` it returns.
pub fn fuzz<S>(
    name: &str,
    default_cases: u32,
    strategy: S,
    property: impl Fn(S::Value) -> Result<(), TestCaseError>,
) -> Report
where
    S: Strategy,
    S::Value: Debug,
{
    let budget: Option<f64> = env("SEPDIST_FUZZ_SECS");
    let cases: u32 = env("SEPDIST_FUZZ_CASES").unwrap_or(default_cases).max(1);
    let first_seed: u64 = env("SEPDIST_FUZZ_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    });
    watchdog();
    let property = |value: S::Value| {
        let mut input = format!("{value:?}");
        if input.len() > 4_000 {
            let cut = (0..=4_000)
                .rev()
                .find(|&i| input.is_char_boundary(i))
                .unwrap_or(0);
            input.truncate(cut);
        }
        let _running = Running::new(name, input);
        property(value)
    };
    let property = &property;
    let start = Instant::now();
    let mut done = 0u64;
    let mut seed = first_seed;
    loop {
        let config = Config {
            cases,
            rng_seed: RngSeed::Fixed(seed),
            // Findings are reported with their seed; no regression files in the tree.
            failure_persistence: None,
            max_shrink_iters: 2_000,
            max_shrink_time: 120_000,
            ..Config::default()
        };
        let mut runner = TestRunner::new(config);
        match runner.run(&strategy, property) {
            Ok(()) => done += u64::from(cases),
            Err(TestError::Fail(why, value)) => panic!(
                "fuzz target {name}: finding after {done} cases (replay: SEPDIST_FUZZ_SEED={seed} \
                 SEPDIST_FUZZ_CASES={cases}): {why}\nminimal input: {value:?}"
            ),
            Err(TestError::Abort(why)) => panic!("fuzz target {name}: aborted: {why}"),
        }
        let enough = match budget {
            Some(secs) => start.elapsed().as_secs_f64() >= secs,
            None => true,
        };
        if enough {
            break;
        }
        seed = seed.wrapping_add(1);
    }
    let report = Report {
        cases: done,
        elapsed: start.elapsed(),
    };
    eprintln!(
        "fuzz target {name}: {} cases in {:.1} s (seeds {first_seed}..={seed}, {cases} per round)",
        report.cases,
        report.elapsed.as_secs_f64()
    );
    report
}

#[allow(unused_imports)] // each target file uses a part
pub use mutate::{Endian, Mutation, apply, mutations};

/// Mutations of valid inputs: bit flips, byte overwrites, truncation, insertion, deletion,
/// duplication of a range, and length/count fields set to extreme values.
mod mutate {
    use proptest::prelude::*;
    use proptest::sample::Index;

    /// Byte order of the format's integer fields.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Endian {
        Little,
        Big,
    }

    #[derive(Debug, Clone)]
    pub enum Mutation {
        Flip {
            at: Index,
            bit: u8,
        },
        Set {
            at: Index,
            byte: u8,
        },
        Truncate {
            at: Index,
        },
        Insert {
            at: Index,
            bytes: Vec<u8>,
        },
        Remove {
            at: Index,
            len: usize,
        },
        Duplicate {
            from: Index,
            len: usize,
            to: Index,
        },
        /// An integer field of `width` bytes overwritten with `value`: at one of the target's
        /// known field offsets (sizes, counts, rates) when `known`, anywhere otherwise.
        Field {
            at: Index,
            known: bool,
            width: u8,
            value: u64,
        },
    }

    /// Values that break length arithmetic: 0, 1, small, powers of two around the integer
    /// limits, and the limits themselves.
    fn extreme() -> impl Strategy<Value = u64> {
        prop_oneof![
            Just(0u64),
            Just(1),
            0u64..64,
            Just(0x7FFF),
            Just(0x8000),
            Just(0xFFFF),
            Just(0x7FFF_FFFF),
            Just(0x8000_0000),
            Just(0xFFFF_FFFE),
            Just(0xFFFF_FFFF),
            Just(0x1_0000_0000),
            Just(i64::MAX as u64),
            Just(u64::MAX),
            any::<u64>(),
        ]
    }

    pub fn mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            3 => (any::<Index>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
            2 => (any::<Index>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Set { at, byte }),
            1 => any::<Index>().prop_map(|at| Mutation::Truncate { at }),
            1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..64))
                .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
            1 => (any::<Index>(), 1usize..256).prop_map(|(at, len)| Mutation::Remove { at, len }),
            1 => (any::<Index>(), 1usize..512, any::<Index>())
                .prop_map(|(from, len, to)| Mutation::Duplicate { from, len, to }),
            4 => (any::<Index>(), prop::bool::weighted(0.8), prop::sample::select(vec![1u8, 2, 4, 8]), extreme())
                .prop_map(|(at, known, width, value)| Mutation::Field { at, known, width, value }),
        ]
    }

    /// 1 to `max` mutations.
    pub fn mutations(max: usize) -> impl Strategy<Value = Vec<Mutation>> {
        prop::collection::vec(mutation(), 1..=max.max(1))
    }

    /// Applies `mutations` in order. `fields(bytes)`: offsets of the integer fields worth
    /// breaking in the current bytes (recomputed after every mutation).
    pub fn apply(
        base: &[u8],
        mutations: &[Mutation],
        endian: Endian,
        fields: impl Fn(&[u8]) -> Vec<usize>,
    ) -> Vec<u8> {
        let mut b = base.to_vec();
        for m in mutations {
            let n = b.len();
            match m {
                Mutation::Flip { at, bit } if n > 0 => b[at.index(n)] ^= 1 << bit,
                Mutation::Set { at, byte } if n > 0 => b[at.index(n)] = *byte,
                Mutation::Truncate { at } => b.truncate(at.index(n + 1)),
                Mutation::Insert { at, bytes } => {
                    let i = at.index(n + 1);
                    b.splice(i..i, bytes.iter().copied());
                }
                Mutation::Remove { at, len } if n > 0 => {
                    let i = at.index(n);
                    b.drain(i..(i + len).min(n));
                }
                Mutation::Duplicate { from, len, to } if n > 0 => {
                    let i = from.index(n);
                    let part = b[i..(i + len).min(n)].to_vec();
                    let j = to.index(n + 1);
                    b.splice(j..j, part);
                }
                Mutation::Field {
                    at,
                    known,
                    width,
                    value,
                } => {
                    let w = usize::from(*width);
                    let offsets = if *known { fields(&b) } else { Vec::new() };
                    let pos = if offsets.is_empty() {
                        if n < w {
                            continue;
                        }
                        at.index(n - w + 1)
                    } else {
                        offsets[at.index(offsets.len())]
                    };
                    if pos + w > n {
                        continue;
                    }
                    let bytes = match endian {
                        Endian::Little => value.to_le_bytes()[..w].to_vec(),
                        Endian::Big => value.to_be_bytes()[8 - w..].to_vec(),
                    };
                    b[pos..pos + w].copy_from_slice(&bytes);
                }
                _ => {}
            }
        }
        b
    }
}
