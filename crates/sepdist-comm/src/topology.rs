//! Where this process sits in the job: rank, world size, local rank, and what launched it.

use std::fmt;

use crate::{CommError, Result};

/// Reads one environment variable. Injectable so tests never mutate the process environment.
pub type EnvReader<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment as an [`EnvReader`].
pub(crate) fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// What started this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// Nothing: a single process.
    None,
    /// The MPI library itself (built with `mpi`, initialised).
    Mpi,
    /// OpenMPI's `mpirun` (`OMPI_COMM_WORLD_*`).
    OpenMpi,
    /// A PMI launcher: MPICH/Intel MPI's Hydra `mpiexec` (`PMI_RANK`, `PMI_SIZE`).
    Pmi,
    /// SLURM's `srun` (`SLURM_PROCID`, `SLURM_NTASKS`).
    Slurm,
    /// torchrun-style variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`).
    EnvVars,
    /// The in-process [`Threads`](crate::Threads) backend.
    Threads,
}

impl fmt::Display for Launcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Launcher::None => "none",
            Launcher::Mpi => "mpi",
            Launcher::OpenMpi => "openmpi",
            Launcher::Pmi => "pmi",
            Launcher::Slurm => "slurm",
            Launcher::EnvVars => "env",
            Launcher::Threads => "threads",
        })
    }
}

/// Rank, world size and local rank (which GPU of the node) of this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    /// Global rank, `0..world_size`.
    pub rank: usize,
    /// Number of ranks.
    pub world_size: usize,
    /// Rank among the processes of this node: selects the GPU.
    pub local_rank: usize,
    /// What launched the process.
    pub launcher: Launcher,
}

/// One family of launcher variables, in priority order.
struct Scheme {
    launcher: Launcher,
    rank: &'static str,
    size: &'static str,
    local: &'static str,
}

const SCHEMES: [Scheme; 4] = [
    Scheme {
        launcher: Launcher::OpenMpi,
        rank: "OMPI_COMM_WORLD_RANK",
        size: "OMPI_COMM_WORLD_SIZE",
        local: "OMPI_COMM_WORLD_LOCAL_RANK",
    },
    Scheme {
        launcher: Launcher::Pmi,
        rank: "PMI_RANK",
        size: "PMI_SIZE",
        local: "MPI_LOCALRANKID",
    },
    Scheme {
        launcher: Launcher::Slurm,
        rank: "SLURM_PROCID",
        size: "SLURM_NTASKS",
        local: "SLURM_LOCALID",
    },
    Scheme {
        launcher: Launcher::EnvVars,
        rank: "RANK",
        size: "WORLD_SIZE",
        local: "LOCAL_RANK",
    },
];

/// Local-rank variables tried, in order, when a scheme's own is missing.
const LOCAL_RANK_VARS: [&str; 4] = [
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "MPI_LOCALRANKID",
    "SLURM_LOCALID",
    "LOCAL_RANK",
];

fn parse(env: EnvReader<'_>, var: &str) -> Result<Option<usize>> {
    match env(var) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse::<usize>()
            .map(Some)
            .map_err(|e| CommError::Env {
                var: var.to_string(),
                value: v.clone(),
                reason: format!("not a non-negative integer ({e})"),
            }),
    }
}

impl Topology {
    /// A single process: rank 0 of 1.
    pub fn single() -> Self {
        Topology {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            launcher: Launcher::None,
        }
    }

    /// From the process environment; see [`Topology::from_env_with`].
    pub fn from_env() -> Result<Self> {
        Topology::from_env_with(&process_env)
    }

    /// From launcher variables, first complete family wins: `OMPI_COMM_WORLD_RANK/SIZE`
    /// (`_LOCAL_RANK`), `PMI_RANK/PMI_SIZE` (`MPI_LOCALRANKID`), `SLURM_PROCID/SLURM_NTASKS`
    /// (`SLURM_LOCALID`), `RANK/WORLD_SIZE` (`LOCAL_RANK`); else a single process. A family needs
    /// both its rank and size variable; a missing local rank falls back to the other families'
    /// local-rank variables, then 0.
    pub fn from_env_with(env: EnvReader<'_>) -> Result<Self> {
        for s in &SCHEMES {
            let (Some(rank), Some(world_size)) = (parse(env, s.rank)?, parse(env, s.size)?) else {
                continue;
            };
            let bad = |var: &str, reason: String| CommError::Env {
                var: var.to_string(),
                value: env(var).unwrap_or_default(),
                reason,
            };
            if world_size == 0 {
                return Err(bad(s.size, "a world has at least one rank".into()));
            }
            if rank >= world_size {
                return Err(bad(
                    s.rank,
                    format!("rank must be below the world size {}={world_size}", s.size),
                ));
            }
            let mut local_rank = parse(env, s.local)?;
            for var in LOCAL_RANK_VARS {
                if local_rank.is_some() {
                    break;
                }
                local_rank = parse(env, var)?;
            }
            let local_rank = local_rank.unwrap_or(0);
            if local_rank >= world_size {
                return Err(bad(
                    s.local,
                    format!("local rank must be below the world size {world_size}"),
                ));
            }
            return Ok(Topology {
                rank,
                world_size,
                local_rank,
                launcher: s.launcher,
            });
        }
        Ok(Topology::single())
    }

    /// Checks an MPI world size against SLURM: `srun` without a PMI plugin starts every task as an
    /// MPI singleton (world size 1) without any error. Only applies inside an `srun` task
    /// (`SLURM_PROCID` set); `mpirun` inside an allocation may legitimately use fewer ranks.
    pub fn check_slurm(mpi_world_size: usize, env: EnvReader<'_>) -> Result<()> {
        let Some((var, tasks)) = slurm_tasks(env)? else {
            return Ok(());
        };
        if tasks == mpi_world_size {
            return Ok(());
        }
        let under_mpirun =
            env("OMPI_COMM_WORLD_SIZE").is_some() || env("MPI_LOCALRANKID").is_some();
        if mpi_world_size > 1 && under_mpirun {
            return Ok(());
        }
        let hint = if mpi_world_size == 1 {
            "srun without PMI starts every task as a separate single-rank MPI job; launch with \
             `srun --mpi=pmix` (or `--mpi=pmi2`), or with mpirun"
        } else {
            "launch with `srun --mpi=pmix` and the same --ntasks, or with mpirun"
        };
        Err(CommError::SlurmMismatch {
            var,
            slurm_tasks: tasks,
            mpi_world_size,
            hint,
        })
    }
}

/// Number of SLURM tasks of this step, when this process is an srun task.
pub(crate) fn slurm_tasks(env: EnvReader<'_>) -> Result<Option<(&'static str, usize)>> {
    if env("SLURM_PROCID").is_none() {
        return Ok(None);
    }
    for var in ["SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"] {
        if let Some(n) = parse(env, var)? {
            return Ok(Some((var, n)));
        }
    }
    Ok(None)
}

/// The error for a multi-rank environment in a binary without MPI, naming the variables.
pub(crate) fn not_built_with_mpi(env: EnvReader<'_>, world_size: usize) -> CommError {
    let vars = SCHEMES
        .iter()
        .flat_map(|s| [s.rank, s.size])
        .chain(["SLURM_STEP_NUM_TASKS"])
        .filter_map(|v| env(v).map(|x| format!("{v}={x}")))
        .collect::<Vec<_>>()
        .join(" ");
    let world_size = match slurm_tasks(env) {
        Ok(Some((_, n))) => world_size.max(n),
        _ => world_size,
    };
    CommError::NotBuiltWithMpi { world_size, vars }
}
