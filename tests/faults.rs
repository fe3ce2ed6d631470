#![cfg(feature = "mpi")]
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions
//! Faults, simulated on CPU (built with `--features mpi`): a SLURM allocation of 2 tasks under
//! `mpirun` receiving SIGUSR1 on one rank (stop at one step, checkpoint, requeue code, resume),
//! a rank stopped with SIGSTOP (collective deadline), an unwritable or full output directory at
//! checkpoint time, truncated or corrupted checkpoints, and a NaN on one rank. SIGKILL of one
//! rank is in tests/mpi.rs.

mod common;
use common::{ok, rel_diff, sepdist, text, weights};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const TINY: &str = "tests/fixtures/tiny.yaml";
const BIN: &str = env!("CARGO_BIN_EXE_sepdist");
/// `sepdist_cli::EXIT_REQUEUE`, the code the slurm/ templates requeue on.
const REQUEUE: i32 = sepdist_cli::EXIT_REQUEUE as i32;
const JOB_ID: &str = "4242";

fn data_root() -> PathBuf {
    static ROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| common::tiny_dataset("faults-tests"))
        .clone()
}

fn mpirun() -> Command {
    let found = Command::new("mpirun").arg("--version").output();
    assert!(
        found.is_ok(),
        "mpirun not found: run launch/install-deps.sh (MPICH) before the MPI tests"
    );
    let mut cmd = Command::new("mpirun");
    let version = text(&found.unwrap().stdout);
    if version.contains("Open MPI") {
        cmd.args(["--allow-run-as-root", "--oversubscribe"]);
    }
    cmd
}

/// The `--set` arguments of a tiny run writing into `out`, then `sets`.
fn train_args(out: &Path, sets: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["train", "--config", TINY].map(String::from).to_vec();
    for s in [
        format!("training.output_dir={}", out.display()),
        format!("dataset.root={}", data_root().display()),
        "dataset.format=wav".into(),
    ]
    .into_iter()
    .chain(sets.iter().map(|s| s.to_string()))
    {
        args.push("--set".into());
        args.push(s);
    }
    args
}

/// `sepdist train` on `ranks` MPI ranks inside a simulated SLURM allocation of as many tasks:
/// the job's variables as sbatch/srun set them, and per rank `SLURM_PROCID`/`SLURM_LOCALID`
/// from the MPI launcher's own (a shell exports them and execs the binary, so each rank's
/// process is the sepdist binary itself).
fn slurm_job(ranks: usize, out: &Path, sets: &[&str]) -> Command {
    let n = ranks.to_string();
    let mut cmd = mpirun();
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("RUST_BACKTRACE")
        .envs([
            ("SLURM_JOB_ID", JOB_ID),
            ("SLURM_JOB_NAME", "sepdist-faults"),
            ("SLURM_NNODES", "1"),
            ("SLURM_NODEID", "0"),
            ("SLURM_NTASKS", &n),
            ("SLURM_NTASKS_PER_NODE", &n),
            ("SLURM_STEP_NUM_TASKS", &n),
            ("SLURM_CPUS_PER_TASK", "1"),
            ("OMP_NUM_THREADS", "1"),
            ("RAYON_NUM_THREADS", "1"),
        ])
        .args(["-n", &n, "sh", "-c"])
        .arg(
            "SLURM_PROCID=${PMI_RANK:-$OMPI_COMM_WORLD_RANK}; \
             SLURM_LOCALID=${MPI_LOCALRANKID:-$OMPI_COMM_WORLD_LOCAL_RANK}; \
             export SLURM_PROCID SLURM_LOCALID; exec \"$0\" \"$@\"",
        )
        .arg(BIN)
        .args(train_args(out, sets))
        .args(["--set", "distributed.backend=mpi"]);
    cmd
}

/// Kills what a test started when it ends, also on a failed assertion: the job (mpirun) and
/// any rank process it stopped.
struct Cleanup {
    job: Option<Child>,
    stopped: Vec<u32>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for pid in &self.stopped {
            signal(*pid, "CONT");
            signal(*pid, "KILL");
        }
        if let Some(job) = self.job.as_mut() {
            let _ = job.kill();
            let _ = job.wait();
        }
    }
}

fn spawn(mut cmd: Command) -> Cleanup {
    let job = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    Cleanup {
        job: Some(job),
        stopped: Vec::new(),
    }
}

impl Cleanup {
    fn finish(&mut self) -> Output {
        self.job.take().unwrap().wait_with_output().unwrap()
    }
    /// Waits until rank 0 has logged `steps` optimizer steps.
    fn wait_for_steps(&mut self, out: &Path, steps: usize) {
        let metrics = out.join("metrics.jsonl");
        let start = Instant::now();
        while train_records(&metrics).len() < steps {
            if let Some(status) = self.job.as_mut().unwrap().try_wait().unwrap() {
                let out = self.finish();
                panic!("the job ended ({status}) early:\n{}", text(&out.stderr));
            }
            assert!(start.elapsed() < Duration::from_secs(120), "no progress");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn train_records(metrics: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(metrics)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["kind"] == "train")
        .collect()
}

fn signal(pid: u32, name: &str) -> bool {
    Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The process of `rank` of the job writing into `out`: the sepdist binary whose arguments name
/// `out` and whose environment has `SLURM_PROCID=rank`.
fn rank_pid(out: &Path, rank: usize) -> u32 {
    let out = out.display().to_string();
    let procid = format!("SLURM_PROCID={rank}");
    let start = Instant::now();
    loop {
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let read = |f: &str| std::fs::read(entry.path().join(f)).unwrap_or_default();
            let cmdline = read("cmdline");
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            if args.first().copied() != Some(BIN.as_bytes())
                || !args.iter().any(|a| text(a).contains(&out))
            {
                continue;
            }
            if read("environ")
                .split(|b| *b == 0)
                .any(|v| v == procid.as_bytes())
            {
                return pid;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no process of rank {rank}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ran_as(ranks: usize, out: &Output) {
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("× {ranks} ranks)")),
        "the job did not run as {ranks} ranks:\n{err}"
    );
}

/// Checkpoint directories (not hidden) of `out/checkpoints`, sorted.
fn checkpoints(out: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    names
}

fn meta(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("meta.json")).unwrap()).unwrap()
}

/// Every value of every tensor of every safetensors file of a checkpoint (weights and
/// optimizer shards).
fn all_values(dir: &Path) -> Vec<f32> {
    let mut values = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            let bytes = std::fs::read(&path).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            for (_, view) in st.tensors() {
                values.extend(
                    view.data()
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                );
            }
        }
    }
    values
}

/// A long run (no periodic or epoch checkpoints) that a signal interrupts.
const LONG: [&str; 5] = [
    "training.batch_size=1",
    "distributed.zero_stage=1",
    "training.max_steps=80",
    "training.checkpoint_every=0",
    "dataset.samples_per_epoch=1000000",
];

/// The final weights of the uninterrupted `LONG` run on 2 ranks, computed once.
fn uninterrupted() -> &'static [f32] {
    static WEIGHTS: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    WEIGHTS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = slurm_job(2, dir.path(), &LONG).output().unwrap();
        ok(&out);
        ran_as(2, &out);
        weights(&dir.path().join("checkpoints/step_00000080"))
    })
}

#[test]
fn sigusr1_to_one_rank_of_a_slurm_job_stops_all_ranks_at_one_step_and_the_requeued_run_matches() {
    let dir = tempfile::tempdir().unwrap();

    // The first run of the job: SLURM's warning signal reaches one rank only.
    let split = dir.path().join("split");
    let mut job = spawn(slurm_job(2, &split, &LONG));
    job.wait_for_steps(&split, 2);
    assert!(signal(rank_pid(&split, 1), "USR1"));
    let out = job.finish();
    assert_eq!(out.status.code(), Some(REQUEUE), "{}", text(&out.stderr));
    // Rank 0 leaves the marker the job scripts requeue on (mpiexec may drop exit code 75).
    let marker = std::fs::read_to_string(split.join(sepdist_cli::REQUEUE_MARKER)).unwrap();
    assert!(
        marker.trim().parse::<u64>().is_ok_and(|step| step >= 2),
        "{marker}"
    );
    ran_as(2, &out);
    let stdout = text(&out.stdout);
    let step: u64 = stdout
        .strip_prefix("stopped by signal 10 (SIGUSR1) after step ")
        .and_then(|s| s.split(';').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        stdout.contains(&format!(
            "exit code {REQUEUE}: requeue the job and resume with --resume auto"
        )),
        "{stdout}"
    );
    assert!((2..80).contains(&step), "stopped after step {step}");
    // One checkpoint, at the step every rank agreed on, with both ranks' optimizer shards
    // (ZeRO 1: each rank wrote its own).
    let name = format!("step_{step:08}");
    assert_eq!(checkpoints(&split), [name.as_str()]);
    let m = meta(&split.join("checkpoints").join(&name));
    assert_eq!(m["step"], step);
    assert_eq!(m["world_size"], 2);
    let shards: Vec<&str> = m["optimizer_shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["file"].as_str().unwrap())
        .collect();
    assert_eq!(
        shards,
        ["optimizer-00000.safetensors", "optimizer-00001.safetensors"]
    );
    let records = train_records(&split.join("metrics.jsonl"));
    assert_eq!(records.last().unwrap()["step"], step);

    // The requeued run: same job, same command, `--resume auto`.
    let mut again = slurm_job(2, &split, &LONG);
    again
        .env("SLURM_RESTART_COUNT", "1")
        .args(["--resume", "auto"]);
    let out = again.output().unwrap();
    ok(&out);
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!(
            "resumed from {} at step {step}",
            split.join("checkpoints").join(&name).display()
        )),
        "{err}"
    );
    let d = rel_diff(
        uninterrupted(),
        &weights(&split.join("checkpoints/step_00000080")),
    );
    assert!(d <= 1e-5, "relative difference {d}");
}

#[test]
fn the_preemptible_template_requeues_after_sigusr1_and_the_requeued_job_resumes_to_the_same_weights()
 {
    // slurm/preemptible.sbatch as sbatch starts it, with `srun` standing in as `mpirun -n
    // $SLURM_NTASKS` (its options dropped) and `scontrol` logging what it is asked.
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let openmpi = text(&mpirun().arg("--version").output().unwrap().stdout).contains("Open MPI");
    let flags = if openmpi {
        "--allow-run-as-root --oversubscribe"
    } else {
        ""
    };
    let stubs = [
        (
            "srun",
            format!(
                "#!/bin/bash\nwhile [[ $1 == -* ]]; do shift; done\nexec mpirun {flags} -n \"$SLURM_NTASKS\" \"$@\"\n"
            ),
        ),
        (
            "scontrol",
            format!(
                "#!/bin/bash\necho \"$@\" >> '{}'\n",
                dir.path().join("scontrol.log").display()
            ),
        ),
    ];
    for (name, body) in stubs {
        std::fs::write(bin.join(name), body).unwrap();
        assert!(
            Command::new("chmod")
                .arg("+x")
                .arg(bin.join(name))
                .status()
                .unwrap()
                .success()
        );
    }
    let out = dir.path().join("out");
    let job = |restarts: &str| {
        let mut cmd = Command::new("bash");
        cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
            .env_remove("RUST_BACKTRACE")
            .env_remove("LAUNCHER")
            .env_remove("RESUME")
            .env_remove("OMP_NUM_THREADS")
            .env_remove("RAYON_NUM_THREADS")
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    bin.display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .envs([
                ("SLURM_JOB_ID", JOB_ID),
                ("SLURM_JOB_NAME", "sepdist-faults"),
                ("SLURM_NNODES", "1"),
                ("SLURM_NTASKS", "2"),
                ("SLURM_NTASKS_PER_NODE", "2"),
                ("SLURM_GPUS_PER_NODE", "2"),
                ("SLURM_CPUS_PER_TASK", "1"),
                ("SLURM_RESTART_COUNT", restarts),
                ("SEPDIST_BIN", BIN),
            ])
            .env("OUTPUT_DIR", &out)
            .arg("slurm/preemptible.sbatch")
            // `train` and the output directory come from the template.
            .args(&train_args(&out, &LONG)[1..])
            .args(["--set", "distributed.backend=mpi"]);
        cmd
    };
    let mut first = spawn(job("0"));
    first.wait_for_steps(&out, 2);
    // `--signal=B:USR1@120`: SLURM signals the batch shell, which passes it on to the launcher.
    assert!(signal(first.job.as_ref().unwrap().id(), "USR1"));
    let result = first.finish();
    assert_eq!(result.status.code(), Some(0), "{}", text(&result.stderr));
    let stdout = text(&result.stdout);
    assert!(
        stdout.contains("stopped by signal 10 (SIGUSR1) after step "),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("requeueing job {JOB_ID}")),
        "{stdout}"
    );
    let log = dir.path().join("scontrol.log");
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        format!("requeue {JOB_ID}\n")
    );
    // SLURM starts the requeued job: same id, same script, one restart more.
    let second = job("1").output().unwrap();
    assert_eq!(second.status.code(), Some(0), "{}", text(&second.stderr));
    ran_as(2, &second);
    assert!(text(&second.stderr).contains("resumed from "));
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        format!("requeue {JOB_ID}\n")
    );
    let d = rel_diff(
        uninterrupted(),
        &weights(&out.join("checkpoints/step_00000080")),
    );
    assert!(d <= 1e-5, "relative difference {d}");
}

#[test]
fn srun_without_pmi_is_refused_instead_of_running_independent_copies() {
    // What `srun` without `--mpi=pmix` gives each task: SLURM says 2 tasks, MPI a singleton.
    let dir = tempfile::tempdir().unwrap();
    let out = sepdist()
        .args(train_args(
            &dir.path().join("out"),
            &["distributed.backend=auto"],
        ))
        .envs([
            ("SLURM_JOB_ID", JOB_ID),
            ("SLURM_NTASKS", "2"),
            ("SLURM_STEP_NUM_TASKS", "2"),
            ("SLURM_PROCID", "0"),
            ("SLURM_LOCALID", "0"),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains(
            "SLURM started 2 tasks (SLURM_STEP_NUM_TASKS) but MPI reports a world of size 1"
        ),
        "{err}"
    );
    assert!(err.contains("srun --mpi=pmix"), "{err}");
    assert!(!dir.path().join("out/checkpoints").exists());
}

#[test]
fn a_stopped_rank_trips_the_collective_deadline_and_the_job_aborts_naming_collective_and_step() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut sets = LONG.to_vec();
    sets.extend(["training.max_steps=100000", "distributed.timeout_s=5"]);
    let mut job = spawn(slurm_job(2, &out, &sets));
    job.wait_for_steps(&out, 2);
    let victim = rank_pid(&out, 1);
    job.stopped.push(victim);
    assert!(signal(victim, "STOP"));
    let stopped = Instant::now();
    while job.job.as_mut().unwrap().try_wait().unwrap().is_none() {
        assert!(
            stopped.elapsed() < Duration::from_secs(5 + 30),
            "the job outlived the deadline"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let result = job.finish();
    assert!(
        stopped.elapsed() >= Duration::from_secs(4),
        "ended before the deadline"
    );
    assert!(!result.status.success());
    let err = text(&result.stderr);
    let line = err
        .lines()
        .find(|l| l.starts_with("error: rank 0: "))
        .unwrap_or_else(|| panic!("{err}"));
    // e.g. "error: rank 0: optimizer step 57: all_reduce_f32 of 728592 bytes on rank 0/2 timed
    // out after 5.0 s (distributed.timeout_s = 5.0 s): another rank never joined it ...".
    let step: u64 = line
        .strip_prefix("error: rank 0: optimizer step ")
        .and_then(|s| s.split(':').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(step >= 3, "{line}");
    assert!(
        [
            "all_reduce_f32",
            "all_reduce_f64",
            "reduce_scatter",
            "all_gather"
        ]
        .iter()
        .any(|c| line.contains(&format!(": {c} of "))),
        "{line}"
    );
    assert!(
        line.contains("timed out after") && line.contains("(distributed.timeout_s = 5.0 s)"),
        "{line}"
    );
    assert!(line.ends_with("; aborting the job"), "{line}");
    assert!(!err.contains("panicked"), "{err}");
}

/// A single-process tiny run into `out`.
fn single(out: &Path, sets: &[&str], extra: &[&str]) -> Command {
    let mut cmd = sepdist();
    cmd.args(train_args(out, sets)).args(extra);
    cmd
}

fn hidden_entries(out: &Path) -> Vec<String> {
    std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

#[test]
fn a_full_output_directory_at_checkpoint_time_is_an_error_and_the_previous_checkpoint_loads() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    ok(&single(&out, &["training.max_steps=2"], &[])
        .output()
        .unwrap());
    // Resumed with a 256 KiB limit on the size of any file it writes: the weights of the next
    // checkpoint (about 740 kB) do not fit. Ignoring SIGXFSZ turns the limit into EFBIG from
    // write(2), as for a full disk or quota; root is not exempt.
    let mut cmd = Command::new("bash");
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("RUST_BACKTRACE")
        .args(["-c", "trap '' XFSZ; ulimit -f 256; exec \"$0\" \"$@\"", BIN])
        .args(train_args(&out, &["training.max_steps=4"]))
        .args(["--resume", "auto"]);
    let full = cmd.output().unwrap();
    assert_eq!(full.status.code(), Some(1), "{}", text(&full.stderr));
    let err = text(&full.stderr);
    assert!(err.contains("resumed from "), "{err}");
    assert!(
        err.contains(&format!(
            "error: cannot write checkpoint step_00000003 in {} (the checkpoints already there are unchanged): ",
            out.join("checkpoints").display()
        )),
        "{err}"
    );
    assert!(err.contains("File too large"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        std::fs::read_to_string(out.join("checkpoints/latest")).unwrap(),
        "step_00000002"
    );
    assert_eq!(checkpoints(&out), ["step_00000001", "step_00000002"]);
    // With space again, `auto` resumes from the intact previous checkpoint and the half-written
    // staging directory is cleared.
    let out2 = single(&out, &["training.max_steps=4"], &["--resume", "auto"])
        .output()
        .unwrap();
    ok(&out2);
    let err = text(&out2.stderr);
    assert!(
        err.contains(&format!(
            "resumed from {} at step 2",
            out.join("checkpoints/step_00000002").display()
        )),
        "{err}"
    );
    assert!(!err.contains("warning"), "{err}");
    assert!(
        hidden_entries(&out).is_empty(),
        "{:?}",
        hidden_entries(&out)
    );
}

#[test]
fn an_unwritable_checkpoint_directory_fails_every_rank_at_once_and_the_previous_checkpoint_loads() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let sets = ["training.batch_size=1", "training.max_steps=4"];
    let first = slurm_job(2, &out, &["training.batch_size=1", "training.max_steps=2"])
        .output()
        .unwrap();
    ok(&first);
    // `checkpoints` becomes a regular file (permissions do not stop root; a file where a
    // directory should be does), the earlier checkpoints kept aside.
    let kept = dir.path().join("kept");
    std::fs::rename(out.join("checkpoints"), &kept).unwrap();
    std::fs::write(out.join("checkpoints"), "not a directory\n").unwrap();
    let started = Instant::now();
    let mut job = slurm_job(2, &out, &sets);
    job.args(["--resume", kept.join("step_00000002").to_str().unwrap()]);
    let failed = job.output().unwrap();
    assert!(!failed.status.success());
    let err = text(&failed.stderr);
    assert!(
        err.contains(&format!(
            "error: cannot write checkpoint step_00000003 in {} (the checkpoints already there are unchanged): ",
            out.join("checkpoints").display()
        )),
        "{err}"
    );
    // Both ranks report the error themselves: nobody waits for a collective deadline.
    assert!(!err.contains("timed out"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
    assert!(!err.contains("panicked"), "{err}");
    // The previous checkpoint is intact: back in place, `auto` resumes from it.
    std::fs::remove_file(out.join("checkpoints")).unwrap();
    std::fs::rename(&kept, out.join("checkpoints")).unwrap();
    let mut job = slurm_job(2, &out, &sets);
    job.args(["--resume", "auto"]);
    let resumed = job.output().unwrap();
    ok(&resumed);
    let err = text(&resumed.stderr);
    assert!(
        err.contains(&format!(
            "resumed from {} at step 2",
            out.join("checkpoints/step_00000002").display()
        )),
        "{err}"
    );
}

#[test]
fn truncated_or_corrupted_checkpoints_are_refused_by_path_and_auto_falls_back_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let sets = ["training.max_steps=3"];
    ok(&single(&out, &sets, &[]).output().unwrap());
    let ckpt = |n: u64| out.join("checkpoints").join(format!("step_{n:08}"));
    let expected = weights(&ckpt(3));
    // Step 3: weights cut in half (a write interrupted by a full disk, a copy cut short).
    let weights_file = ckpt(3).join("model.safetensors");
    let bytes = std::fs::read(&weights_file).unwrap();
    std::fs::write(&weights_file, &bytes[..bytes.len() / 2]).unwrap();
    // Step 2: meta.json truncated.
    let meta_file = ckpt(2).join("meta.json");
    let bytes = std::fs::read(&meta_file).unwrap();
    std::fs::write(&meta_file, &bytes[..bytes.len() / 3]).unwrap();

    for (spec, file) in [
        (ckpt(3).display().to_string(), &weights_file),
        ("latest".to_string(), &weights_file),
        (ckpt(2).display().to_string(), &meta_file),
    ] {
        let refused = single(&out, &sets, &["--resume", &spec]).output().unwrap();
        assert_eq!(refused.status.code(), Some(1), "{}", text(&refused.stderr));
        let err = text(&refused.stderr);
        assert!(
            err.starts_with(&format!("error: {}: ", file.display())),
            "--resume {spec}: {err}"
        );
        assert!(!err.contains("resumed from"), "{err}");
    }
    let refused = text(
        &single(&out, &sets, &["--resume", &ckpt(3).display().to_string()])
            .output()
            .unwrap()
            .stderr,
    );
    assert!(refused.contains("checksum mismatch"), "{refused}");

    // `auto` passes over both, saying why, and resumes from step 1.
    let resumed = single(&out, &sets, &["--resume", "auto"]).output().unwrap();
    ok(&resumed);
    let err = text(&resumed.stderr);
    for file in [&weights_file, &meta_file] {
        assert!(
            err.contains(&format!(
                "warning: --resume auto skipped a checkpoint: {}: ",
                file.display()
            )),
            "{err}"
        );
    }
    assert!(
        err.contains(&format!("resumed from {} at step 1", ckpt(1).display())),
        "{err}"
    );
    // The broken checkpoints were rewritten, and training ended where an uninterrupted run did.
    let d = rel_diff(&expected, &weights(&ckpt(3)));
    assert!(d <= 1e-5, "relative difference {d}");
    assert!(
        hidden_entries(&out).is_empty(),
        "{:?}",
        hidden_entries(&out)
    );
}

#[test]
fn a_nan_on_one_rank_skips_the_step_on_every_rank() {
    let dir = tempfile::tempdir().unwrap();
    let sets = [
        "training.batch_size=1",
        "distributed.zero_stage=1",
        "training.max_steps=4",
    ];
    let one = dir.path().join("one");
    let mut job = slurm_job(2, &one, &sets);
    job.env("SEPDIST_TEST_NAN_AT_STEPS", "1:2");
    let out = job.output().unwrap();
    ok(&out);
    ran_as(2, &out);
    let err = text(&out.stderr);
    assert!(
        err.contains("step 2: non-finite loss or gradient, step skipped (1 consecutive, 1 in all)"),
        "{err}"
    );
    let records = train_records(&one.join("metrics.jsonl"));
    let skipped: Vec<bool> = records
        .iter()
        .map(|r| r["skipped"].as_bool().unwrap())
        .collect();
    assert_eq!(skipped, [false, true, false, false]);
    assert_eq!(records[1]["skipped_steps"], 1);
    assert_eq!(records[3]["skipped_steps"], 1);
    // ZeRO 1: each rank updates and saves its own shard. Neither moved in the skipped step.
    let ckpt = |n: u64| one.join("checkpoints").join(format!("step_{n:08}"));
    for file in [
        "model.safetensors",
        "optimizer-00000.safetensors",
        "optimizer-00001.safetensors",
    ] {
        let before = std::fs::read(ckpt(1).join(file)).unwrap();
        let after = std::fs::read(ckpt(2).join(file)).unwrap();
        assert!(before == after, "{file} changed in the skipped step");
    }
    assert!(all_values(&ckpt(4)).iter().all(|v| v.is_finite()));
    // The same as the step skipped by every rank.
    let all = dir.path().join("all");
    let mut job = slurm_job(2, &all, &sets);
    job.env("SEPDIST_TEST_NAN_AT_STEPS", "2");
    ok(&job.output().unwrap());
    let d = rel_diff(
        &weights(&all.join("checkpoints/step_00000004")),
        &weights(&ckpt(4)),
    );
    assert!(d <= 1e-5, "relative difference {d}");
}

#[test]
fn run_local_starts_the_ranks_of_one_job() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("launch/run-local.sh")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("RUST_BACKTRACE")
        .env("SEPDIST_BIN", BIN)
        .args(["-n", "2"])
        .args(&train_args(&dir.path().join("out"), &[])[1..])
        .args([
            "--set",
            "distributed.backend=auto",
            "--set",
            "training.batch_size=1",
            "--set",
            "training.max_steps=2",
        ])
        .output()
        .unwrap();
    ok(&out);
    ran_as(2, &out);
}
