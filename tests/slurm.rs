#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions
//! The sbatch templates of `slurm/` and the shell scripts of `launch/`: valid bash, the
//! directives the README promises, and the templates' logic run with stand-ins for `srun` and
//! `scontrol` (a job that exits with the requeue code is requeued by the preemptible template
//! only; SIGUSR1 to the batch shell reaches the launcher). The real binary under a simulated
//! allocation is in tests/faults.rs.

mod common;
use common::text;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const TEMPLATES: [&str; 3] = [
    "slurm/single-node.sbatch",
    "slurm/multi-node.sbatch",
    "slurm/preemptible.sbatch",
];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap()
}

/// The value of `#SBATCH --NAME=VALUE`.
fn directive(script: &str, name: &str) -> Option<String> {
    let prefix = format!("#SBATCH --{name}=");
    script
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().to_string())
}

#[test]
fn every_template_and_launch_script_is_valid_bash() {
    let mut scripts: Vec<String> = TEMPLATES.iter().map(|s| s.to_string()).collect();
    for entry in std::fs::read_dir(root().join("launch")).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".sh") {
            scripts.push(format!("launch/{name}"));
        }
    }
    for script in &scripts {
        let out = Command::new("bash")
            .arg("-n")
            .arg(root().join(script))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{script}: bash -n failed:\n{}",
            text(&out.stderr)
        );
    }
}

#[test]
fn templates_have_one_rank_per_gpu_per_job_logs_the_warning_signal_and_requeue() {
    for path in TEMPLATES {
        let script = read(path);
        assert!(script.starts_with("#!/bin/bash\n"), "{path}");
        assert_eq!(
            directive(&script, "ntasks-per-node"),
            directive(&script, "gpus-per-node"),
            "{path}: one rank per GPU"
        );
        assert!(directive(&script, "ntasks-per-node").is_some(), "{path}");
        assert!(
            directive(&script, "output").is_some_and(|o| o.contains("%x-%j")),
            "{path}: per-job log"
        );
        assert_eq!(
            directive(&script, "signal").as_deref(),
            Some("USR1@120"),
            "{path}"
        );
        assert!(script.contains("\n#SBATCH --requeue\n"), "{path}");
        assert!(
            script.contains(&format!("\nEXIT_REQUEUE={}\n", sepdist_cli::EXIT_REQUEUE)),
            "{path}: the requeue code differs from sepdist's"
        );
        // mpiexec may exit 0 after forwarding SIGUSR1: the marker file decides then.
        let marker = format!("\"$output_dir/{}\"", sepdist_cli::REQUEUE_MARKER);
        assert!(
            script.contains(&format!("rm -f {marker}"))
                && script.contains(&format!("-f {marker} ]]")),
            "{path}: the requeue marker {marker} is not removed before and checked after the launch"
        );
        for needle in [
            "srun --mpi=pmix",
            "mpirun -n",
            "OMP_NUM_THREADS",
            "RAYON_NUM_THREADS",
            "NCCL_DEBUG",
            "--resume",
        ] {
            assert!(script.contains(needle), "{path}: no `{needle}`");
        }
    }
    assert_eq!(
        directive(&read("slurm/single-node.sbatch"), "nodes").as_deref(),
        Some("1")
    );
    assert_eq!(
        directive(&read("slurm/single-node.sbatch"), "gpus-per-node").as_deref(),
        Some("4")
    );
    assert!(read("slurm/preemptible.sbatch").contains("scontrol requeue \"${SLURM_JOB_ID}\""));
}

/// A folder of stand-ins: `srun` and `mpirun` log their arguments to `launch.log` and run
/// `$STUB_LAUNCH` (a shell snippet; default: exit with `$STUB_EXIT`), `scontrol` logs to
/// `scontrol.log`.
struct Stubs {
    dir: tempfile::TempDir,
}

impl Stubs {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("launch.log");
        for name in ["srun", "mpirun"] {
            write_exec(
                &dir.path().join(name),
                &format!(
                    "#!/bin/bash\nprintf '%s\\n' \"$0\" \"$@\" > '{}'\nif [[ -n \"${{STUB_LAUNCH:-}}\" ]]; then eval \"$STUB_LAUNCH\"; else exit \"${{STUB_EXIT:-0}}\"; fi\n",
                    log.display()
                ),
            );
        }
        write_exec(
            &dir.path().join("scontrol"),
            &format!(
                "#!/bin/bash\necho \"$@\" >> '{}'\n",
                dir.path().join("scontrol.log").display()
            ),
        );
        Stubs { dir }
    }

    /// `bash TEMPLATE ARGS...` as sbatch would start it for job 4242 with 2 tasks and 2 GPUs on
    /// one node.
    fn job(&self, template: &str, env: &[(&str, &str)]) -> Command {
        let path = format!(
            "{}:{}",
            self.dir.path().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut cmd = Command::new("bash");
        cmd.current_dir(root())
            .arg(template)
            .args(["--config", "tests/fixtures/tiny.yaml"])
            .env("PATH", path)
            .env_remove("LAUNCHER")
            .env_remove("OUTPUT_DIR")
            .env_remove("RESUME")
            .env_remove("OMP_NUM_THREADS")
            .env_remove("RAYON_NUM_THREADS")
            .env_remove("SLURM_RESTART_COUNT")
            .envs([
                ("SLURM_JOB_ID", "4242"),
                ("SLURM_JOB_NAME", "sepdist"),
                ("SLURM_JOB_NODELIST", "node1"),
                ("SLURM_NNODES", "1"),
                ("SLURM_NTASKS", "2"),
                ("SLURM_NTASKS_PER_NODE", "2"),
                ("SLURM_GPUS_PER_NODE", "h100:2"),
                ("SLURM_CPUS_PER_TASK", "3"),
                ("SEPDIST_BIN", "/opt/sepdist"),
            ])
            .envs(env.iter().copied());
        cmd
    }

    fn launched(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("launch.log"))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }

    fn scontrol(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("scontrol.log")).unwrap_or_default()
    }
}

fn write_exec(path: &PathBuf, body: &str) {
    std::fs::write(path, body).unwrap();
    let status = Command::new("chmod").arg("+x").arg(path).status().unwrap();
    assert!(status.success());
}

fn run(mut cmd: Command) -> Output {
    cmd.output().unwrap()
}

#[test]
fn the_templates_launch_one_srun_task_per_gpu_resuming_automatically() {
    for template in TEMPLATES {
        let stubs = Stubs::new();
        let out = run(stubs.job(template, &[]));
        assert_eq!(
            out.status.code(),
            Some(0),
            "{template}: {}",
            text(&out.stderr)
        );
        let args = stubs.launched();
        assert!(args[0].ends_with("/srun"), "{template}: {args:?}");
        let expected = [
            "--mpi=pmix",
            "--kill-on-bad-exit=1",
            "--ntasks-per-node=2",
            "--cpus-per-task=3",
            "/opt/sepdist",
            "train",
            "--set",
            "training.output_dir=runs/sepdist-4242",
            "--config",
            "tests/fixtures/tiny.yaml",
            "--resume",
            "auto",
        ];
        assert_eq!(args[1..], expected, "{template}");
        assert_eq!(stubs.scontrol(), "", "{template}");
    }
}

#[test]
fn the_mpirun_variant_launches_ranks_inside_the_allocation_with_the_thread_defaults() {
    let stubs = Stubs::new();
    let out = run(stubs.job(
        "slurm/multi-node.sbatch",
        &[
            ("LAUNCHER", "mpirun"),
            // `mpirun --version` of the stand-in prints its arguments: MPICH's flags.
            (
                "STUB_LAUNCH",
                "echo \"threads $OMP_NUM_THREADS $RAYON_NUM_THREADS\"",
            ),
            ("OUTPUT_DIR", "/scratch/run1"),
        ],
    ));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("threads 3 3"),
        "{}",
        text(&out.stdout)
    );
    let args = stubs.launched();
    assert!(args[0].ends_with("/mpirun"), "{args:?}");
    assert_eq!(
        args[1..7],
        ["-n", "2", "-ppn", "2", "/opt/sepdist", "train"],
        "{args:?}"
    );
    assert!(args.contains(&"training.output_dir=/scratch/run1".to_string()));
}

#[test]
fn only_the_preemptible_template_requeues_on_the_requeue_code() {
    let code = sepdist_cli::EXIT_REQUEUE.to_string();
    for template in TEMPLATES {
        let stubs = Stubs::new();
        let out = run(stubs.job(template, &[("STUB_EXIT", &code)]));
        let stdout = text(&out.stdout);
        if template.ends_with("preemptible.sbatch") {
            assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
            assert_eq!(stubs.scontrol(), "requeue 4242\n");
            assert!(stdout.contains("requeueing job 4242"), "{stdout}");
        } else {
            assert_eq!(
                out.status.code(),
                Some(i32::from(sepdist_cli::EXIT_REQUEUE))
            );
            assert_eq!(stubs.scontrol(), "", "{template}");
            assert!(stdout.contains("submit the same command again"), "{stdout}");
        }
    }
    // Other failures are not requeued, and the restarts are bounded.
    let stubs = Stubs::new();
    let out = run(stubs.job("slurm/preemptible.sbatch", &[("STUB_EXIT", "1")]));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stubs.scontrol(), "");
    let stubs = Stubs::new();
    let out = run(stubs.job(
        "slurm/preemptible.sbatch",
        &[
            ("STUB_EXIT", &code),
            ("SLURM_RESTART_COUNT", "3"),
            ("MAX_RESTARTS", "3"),
        ],
    ));
    assert_eq!(
        out.status.code(),
        Some(i32::from(sepdist_cli::EXIT_REQUEUE))
    );
    assert_eq!(stubs.scontrol(), "");
    assert!(text(&out.stderr).contains("MAX_RESTARTS"));
}

#[test]
fn more_tasks_than_gpus_per_node_is_refused_before_launching() {
    let stubs = Stubs::new();
    let out = run(stubs.job(
        "slurm/single-node.sbatch",
        &[("SLURM_NTASKS_PER_NODE", "4")],
    ));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("--ntasks-per-node=4 but --gpus-per-node=2"),
        "{}",
        text(&out.stderr)
    );
    assert!(stubs.launched().is_empty());
}

#[test]
fn sigusr1_to_the_batch_shell_is_passed_to_the_launcher() {
    // `--signal=B:USR1@...` signals the batch shell only; the stand-in launcher exits with the
    // requeue code once it gets SIGUSR1, as sepdist's ranks do.
    let stubs = Stubs::new();
    let ready = stubs.dir.path().join("ready");
    let code = sepdist_cli::EXIT_REQUEUE;
    let launch = format!(
        "trap 'exit {code}' USR1; touch '{}'; for i in $(seq 600); do sleep 0.05; done",
        ready.display()
    );
    let child = stubs
        .job("slurm/preemptible.sbatch", &[("STUB_LAUNCH", &launch)])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !ready.exists() {
        assert!(start.elapsed() < Duration::from_secs(30), "never launched");
        std::thread::sleep(Duration::from_millis(20));
    }
    let shell = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-USR1", &shell])
            .status()
            .unwrap()
            .success()
    );
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(stubs.scontrol(), "requeue 4242\n");
}

#[test]
fn run_local_wraps_mpirun_with_one_thread_pool_per_rank() {
    let stubs = Stubs::new();
    let bin = stubs.dir.path().join("sepdist");
    write_exec(&bin, "#!/bin/bash\nexit 0\n");
    let cores: usize = text(&Command::new("nproc").output().unwrap().stdout)
        .trim()
        .parse()
        .unwrap();
    let per_rank = (cores / 4).max(1);
    let out = Command::new(root().join("launch/run-local.sh"))
        .args(["-n", "4", "--config", "configs/quickstart.yaml"])
        .env("SEPDIST_BIN", &bin)
        .env("MPIRUN", stubs.dir.path().join("mpirun"))
        .env_remove("OMP_NUM_THREADS")
        .env_remove("RAYON_NUM_THREADS")
        .env(
            "STUB_LAUNCH",
            "echo \"threads $OMP_NUM_THREADS $RAYON_NUM_THREADS\"",
        )
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(&format!("threads {per_rank} {per_rank}")),
        "{}",
        text(&out.stdout)
    );
    let args = stubs.launched();
    assert_eq!(
        args[1..],
        [
            "-n".to_string(),
            "4".into(),
            bin.display().to_string(),
            "--config".into(),
            "configs/quickstart.yaml".into(),
        ],
        "{args:?}"
    );
}
