//! Real multi-process tests of the MPI backend: `mpirun -n K sepdist-comm-selftest`.
//!
//! Needs an MPI whose `mpirun` matches the library the crate was built against (MPICH by
//! default: `launch/install-deps.sh`). Every rank's reported world size is asserted: a binary
//! started by another MPI's `mpirun` would run as K singletons without any error.
#![cfg(feature = "mpi")]

use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const SELFTEST: &str = env!("CARGO_BIN_EXE_sepdist-comm-selftest");

/// One job at a time: the ranks busy-poll, and CI machines have few cores.
static SERIAL: Mutex<()> = Mutex::new(());

/// `mpirun` (or `$MPIRUN`) and the flags its flavour needs to run as root, oversubscribed.
fn mpirun() -> Command {
    let prog = std::env::var("MPIRUN").unwrap_or_else(|_| "mpirun".into());
    let version = Command::new(&prog)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `{prog}` ({e}): the MPI tests need an MPI launcher; run \
             launch/install-deps.sh (installs MPICH), or set MPIRUN"
            )
        });
    let text = String::from_utf8_lossy(&version.stdout).to_string()
        + &String::from_utf8_lossy(&version.stderr);
    let mut cmd = Command::new(&prog);
    if text.contains("Open MPI") || text.contains("OpenRTE") {
        cmd.args(["--allow-run-as-root", "--oversubscribe"]);
    }
    cmd
}

/// Runs `mpirun -n k SELFTEST args...`, killed after `limit`.
fn run(k: usize, args: &[&str], limit: Duration) -> (Output, Duration) {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let start = Instant::now();
    let mut child = mpirun()
        .arg("-n")
        .arg(k.to_string())
        .arg(SELFTEST)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mpirun");
    while child.try_wait().expect("wait mpirun").is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("collect output");
            panic!(
                "mpirun -n {k} did not finish within {limit:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("collect output");
    (out, start.elapsed())
}

fn selftest_world(k: usize) {
    let (out, _) = run(k, &[], Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "mpirun -n {k} failed: {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    let mut ranks: Vec<usize> = Vec::new();
    for line in stdout.lines().filter(|l| l.starts_with("rank ")) {
        // "rank R/N ok"
        let body = line.trim_start_matches("rank ").trim_end_matches(" ok");
        let (r, n) = body
            .split_once('/')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let n: usize = n.parse().unwrap_or_else(|_| panic!("bad line {line:?}"));
        assert_eq!(
            n, k,
            "a rank reports world size {n} under `mpirun -n {k}`: the binary and mpirun come from \
             different MPI installations (set MPICC/MPIRUN consistently; see BUILD-NOTES)\n{stdout}"
        );
        assert!(line.ends_with(" ok"), "{line}");
        ranks.push(r.parse().unwrap_or_else(|_| panic!("bad line {line:?}")));
    }
    ranks.sort_unstable();
    assert_eq!(
        ranks,
        (0..k).collect::<Vec<_>>(),
        "every rank reports once\n{stdout}\n{stderr}"
    );
}

#[test]
fn selftest_1_rank() {
    selftest_world(1);
}

#[test]
fn selftest_2_ranks() {
    selftest_world(2);
}

#[test]
fn selftest_4_ranks() {
    selftest_world(4);
}

#[test]
fn a_rank_that_never_joins_ends_the_job_at_the_deadline() {
    let timeout = 2.0;
    // Rank 1 sleeps far past the deadline: only MPI_Abort from rank 0 can end the job in time.
    let (out, elapsed) = run(
        2,
        &["--timeout-s", "2", "--sleep-rank", "1", "--sleep-s", "60"],
        Duration::from_secs(90),
    );
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the job must fail\n{text}");
    assert!(
        elapsed < Duration::from_secs_f64(timeout + 10.0),
        "job took {elapsed:?}, deadline {timeout} s\n{text}"
    );
    assert!(
        text.contains("all_reduce_f32") && text.contains("timed out"),
        "the message names the collective\n{text}"
    );
    assert!(text.contains("rank 0/2"), "{text}");
}

#[test]
fn srun_without_pmi_is_reported_not_run_as_singletons() {
    // Started directly (an MPI singleton) in an environment that claims two srun tasks: what
    // `srun` without `--mpi=pmix` produces on every node.
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let out = Command::new(SELFTEST)
        .env("SLURM_PROCID", "0")
        .env("SLURM_NTASKS", "2")
        .env_remove("SLURM_STEP_NUM_TASKS")
        .output()
        .expect("run selftest");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("SLURM_NTASKS") && text.contains("srun --mpi=pmix"),
        "{text}"
    );
}
