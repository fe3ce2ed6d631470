//! Collective communication between the ranks of a sepdist job.
//!
//! The [`Communicator`] trait is what the trainer uses for gradient synchronisation (DDP buckets,
//! ZeRO-1/2 reduce-scatter and all-gather over flat fp32 buffers) and for start-up agreement
//! checks (parameter fingerprint, config hash). Backends:
//!
//! - [`Local`]: world size 1; every collective is a copy or a no-op.
//! - [`Threads`]: N ranks inside one process (one thread each), for fast multi-rank tests.
//! - `Mpi` (cargo feature `mpi`, rsmpi): one rank per process under `mpirun`/`srun --mpi=pmix`.
//! - `Nccl` (cargo feature `nccl`, through candle's re-exported cudarc; implies `mpi`): one rank
//!   per GPU, bootstrapped over MPI; fp32 collectives through NCCL, the rest through MPI.
//!
//! **Host buffers.** Every buffer of this trait is host (CPU) memory: `&[f32]`, `Vec<u8>`. The
//! NCCL backend stages them through device memory (copy in, collective, copy out); collectives on
//! device buffers will come as a separate trait or extension once the trainer keeps its gradients
//! on the GPU; nothing here assumes the gradients live on the host except these signatures.
//!
//! **Deadlines.** Every collective has a deadline fixed at construction (`distributed.timeout_s`).
//! On expiry it returns [`CommError::Timeout`] naming the collective instead of hanging; the group
//! is then unusable and the caller should report and [`Communicator::abort`] the job.
//!
//! **Ordering.** As in MPI, collectives match by the order in which ranks *issue* them (for the
//! non-blocking all-reduce: the order of `start_all_reduce_sum`, not of `wait`). Every rank must
//! issue the same sequence.
//!
//! Entry point: [`init`] picks the backend from the launcher environment.
//!
//! With the `cuda` feature, `cuda_memory` reads a GPU's memory figures (free/total and the
//! stream-ordered pool's counters): the crate is where every FFI call of sepdist lives.

mod error;
mod local;
mod stats;
mod threads;
mod topology;

#[cfg(feature = "cuda")]
pub mod cuda_memory;
#[cfg(feature = "mpi")]
mod mpi_backend;
#[cfg(feature = "nccl")]
mod nccl_backend;

use std::time::Duration;

pub use error::{CommError, Result};
pub use local::Local;
pub use stats::{CollectiveKind, CommStats, OpStats};
pub use threads::{Threads, ThreadsComm};
pub use topology::{EnvReader, Launcher, Topology};

#[cfg(feature = "mpi")]
pub use mpi_backend::{Mpi, MpiThreading};
#[cfg(feature = "nccl")]
pub use nccl_backend::Nccl;

/// Default deadline of a collective (`distributed.timeout_s`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// Whether this build contains the MPI backend (cargo feature `mpi`).
pub const MPI_COMPILED: bool = cfg!(feature = "mpi");

/// Whether this build contains the NCCL backend (cargo feature `nccl`).
pub const NCCL_COMPILED: bool = cfg!(feature = "nccl");

/// What to tell a user who asks for NCCL from a build without it.
pub const NCCL_NOT_COMPILED: &str =
    "this build has no NCCL; build with launch/build-cuda.sh --features nccl";

/// A group of ranks that run collectives together over host buffers.
///
/// Object safe and `Send`: the trainer holds a `Box<dyn Communicator>`. Every method must be
/// called by every rank in the same order (see the crate docs).
pub trait Communicator: Send {
    /// This process's rank, `0..world_size()`.
    fn rank(&self) -> usize;

    /// Number of ranks in the group.
    fn world_size(&self) -> usize;

    /// Where this rank sits (local rank chooses the GPU) and what launched it.
    fn topology(&self) -> Topology;

    /// Backend name (`local`, `threads`, `mpi`, `nccl`), for logs.
    fn backend_name(&self) -> &'static str;

    /// The deadline of every collective.
    fn timeout(&self) -> Duration;

    /// Element-wise sum over all ranks, in place. Every rank gets bitwise the same result.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;

    /// Element-wise sum of f64 values (gradient-norm partials, agreement flags), in place.
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;

    /// Starts an element-wise sum of `buf` over all ranks and returns at once; the result comes
    /// from [`PendingReduce::wait`]. For overlapping a gradient bucket's reduction with the
    /// backward of earlier blocks. Counted as [`CollectiveKind::AllReduceF32`].
    fn start_all_reduce_sum(&self, buf: Vec<f32>) -> Result<Box<dyn PendingReduce>>;

    /// Sum of `input` over all ranks, scattered: `input.len()` must be `world_size * shard.len()`,
    /// and rank `r` receives in `shard` the sum of block `r` (`input[r*n..(r+1)*n]`).
    fn reduce_scatter_sum(&self, input: &[f32], shard: &mut [f32]) -> Result<()>;

    /// Concatenation of every rank's `shard` in rank order: `out.len()` must be
    /// `world_size * shard.len()` (all shards have the same length).
    fn all_gather(&self, shard: &[f32], out: &mut [f32]) -> Result<()>;

    /// Replaces `buf` on every rank by the root's bytes (any length; non-roots are resized).
    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()>;

    /// Every rank's bytes, indexed by rank (lengths may differ): for comparing a parameter
    /// fingerprint or config hash across ranks and naming the rank that differs.
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>>;

    /// Returns once every rank has entered the barrier.
    fn barrier(&self) -> Result<()>;

    /// Counters of the collectives this communicator issued.
    fn stats(&self) -> CommStats;

    /// Ends the whole job with `code` (`MPI_Abort` under MPI: every rank stops; the process
    /// otherwise). For fatal errors such as a [`CommError::Timeout`].
    fn abort(&self, code: i32) -> !;
}

/// A reduction started by [`Communicator::start_all_reduce_sum`].
///
/// Dropping it without waiting is allowed but leaves the group unusable under MPI (the operation
/// cannot be cancelled; its buffers are leaked so MPI may keep writing to them).
pub trait PendingReduce: Send {
    /// Drives the operation and reports whether it has finished (never blocks). Under MPI
    /// without an asynchronous progress thread, calling this between backward blocks is what
    /// makes the reduction advance.
    fn poll(&mut self) -> Result<bool>;

    /// Blocks until the sum is available and returns it. The deadline counts from this call.
    fn wait(self: Box<Self>) -> Result<Vec<f32>>;

    /// Number of elements being reduced.
    fn len(&self) -> usize;

    /// Whether the buffer is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Which backend [`init`] builds (`distributed.backend` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// MPI when the launcher environment describes more than one rank, else [`Local`].
    #[default]
    Auto,
    /// MPI always (also a singleton run). Fails when built without the `mpi` feature.
    Mpi,
    /// [`Local`]: world size 1, no communication.
    None,
    /// NCCL on the GPU of each rank's local rank, bootstrapped over MPI (also a singleton run).
    /// Only in builds with the `nccl` feature ([`NCCL_COMPILED`]).
    #[cfg(feature = "nccl")]
    Nccl,
}

/// Builds the communicator for this process from the launcher environment.
///
/// - [`Backend::None`] builds [`Local`].
/// - [`Backend::Mpi`] builds MPI (initialised once per process), checked against SLURM.
/// - `Backend::Nccl` (feature `nccl`) builds MPI, then NCCL on the GPU of this process's local
///   rank (see `Nccl`).
/// - [`Backend::Auto`] builds MPI when the environment ([`Topology::from_env`]) describes more than one
///   rank, else [`Local`]. Built without `mpi`, a multi-rank environment is an error
///   ([`CommError::NotBuiltWithMpi`]) rather than N independent copies of the job.
pub fn init(backend: Backend, timeout: Duration) -> Result<Box<dyn Communicator>> {
    init_with_env(backend, timeout, &topology::process_env)
}

/// [`init`] with an injectable environment reader (tests).
pub fn init_with_env(
    backend: Backend,
    timeout: Duration,
    env: EnvReader<'_>,
) -> Result<Box<dyn Communicator>> {
    match backend {
        Backend::None => Ok(Box::new(Local::new(timeout))),
        Backend::Mpi => init_mpi(timeout, env),
        #[cfg(feature = "nccl")]
        Backend::Nccl => Ok(Box::new(Nccl::init_with_env(timeout, env)?)),
        Backend::Auto => {
            let from_env = Topology::from_env_with(env)?;
            if from_env.world_size > 1 || topology::slurm_tasks(env)?.is_some_and(|(_, n)| n > 1) {
                if MPI_COMPILED {
                    init_mpi(timeout, env)
                } else {
                    Err(topology::not_built_with_mpi(env, from_env.world_size))
                }
            } else {
                Ok(Box::new(Local::new(timeout)))
            }
        }
    }
}

#[cfg(feature = "mpi")]
fn init_mpi(timeout: Duration, env: EnvReader<'_>) -> Result<Box<dyn Communicator>> {
    Ok(Box::new(Mpi::init_with_env(timeout, env)?))
}

/// Built without `mpi`: say so instead of silently running a single rank.
#[cfg(not(feature = "mpi"))]
fn init_mpi(_timeout: Duration, _env: EnvReader<'_>) -> Result<Box<dyn Communicator>> {
    Err(CommError::MpiNotCompiled)
}

/// The GPU that the process with this local rank uses, given the number of GPUs it sees.
///
/// One visible GPU is used whatever the local rank (the launcher gave each rank its own GPU
/// through `CUDA_VISIBLE_DEVICES`, e.g. `srun --gpus-per-task=1`); otherwise local rank `r` takes
/// GPU `r`, and a node with more ranks than GPUs is an error (NCCL refuses two ranks on one GPU).
pub fn gpu_for_local_rank(local_rank: usize, visible: usize) -> std::result::Result<usize, String> {
    match visible {
        0 => {
            Err("no CUDA device is visible (driver missing, or CUDA_VISIBLE_DEVICES empty)".into())
        }
        1 => Ok(0),
        n if local_rank < n => Ok(local_rank),
        n => Err(format!(
            "local rank {local_rank} needs GPU {local_rank} but only {n} are visible: start at \
             most {n} ranks per node (NCCL needs one GPU per rank)"
        )),
    }
}

/// Length checks shared by the backends.
pub(crate) fn check_len(
    collective: CollectiveKind,
    what: &'static str,
    expected: usize,
    got: usize,
) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(CommError::BufferLength {
            collective,
            what,
            expected,
            got,
        })
    }
}

/// `input.len() == world * shard.len()` for reduce-scatter / all-gather.
pub(crate) fn check_sharded(
    collective: CollectiveKind,
    world: usize,
    shard: usize,
    full: usize,
    full_name: &'static str,
) -> Result<()> {
    let expected = shard.checked_mul(world).ok_or(CommError::TooLarge {
        collective,
        elements: usize::MAX,
    })?;
    check_len(collective, full_name, expected, full)
}

pub(crate) fn check_root(collective: CollectiveKind, root: usize, world_size: usize) -> Result<()> {
    if root < world_size {
        Ok(())
    } else {
        Err(CommError::InvalidRoot {
            collective,
            root,
            world_size,
        })
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod gpu_choice_tests {
    use super::*;

    #[test]
    fn gpu_follows_the_local_rank() {
        assert_eq!(gpu_for_local_rank(0, 8), Ok(0));
        assert_eq!(gpu_for_local_rank(7, 8), Ok(7));
        // One visible GPU per rank (CUDA_VISIBLE_DEVICES set by the launcher).
        assert_eq!(gpu_for_local_rank(3, 1), Ok(0));
        let e = gpu_for_local_rank(4, 4).unwrap_err();
        assert!(e.contains("local rank 4") && e.contains("only 4"), "{e}");
        let e = gpu_for_local_rank(0, 0).unwrap_err();
        assert!(e.contains("no CUDA device"), "{e}");
    }

    #[test]
    fn nccl_availability_is_reported() {
        assert_eq!(NCCL_COMPILED, cfg!(feature = "nccl"));
        // The nccl feature builds on MPI for its bootstrap.
        const { assert!(!NCCL_COMPILED || MPI_COMPILED) };
        assert!(NCCL_NOT_COMPILED.contains("launch/build-cuda.sh --features nccl"));
    }
}
