//! Typed errors of the communication layer.

use std::time::Duration;

use crate::stats::CollectiveKind;

/// Result alias of this crate.
pub type Result<T, E = CommError> = std::result::Result<T, E>;

/// Everything that can go wrong in a collective or while setting up the process group.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    /// A collective did not complete before the deadline (`distributed.timeout_s`). The group is
    /// unusable afterwards: report and [`abort`](crate::Communicator::abort) the job.
    #[error(
        "{collective} of {bytes} bytes on rank {rank}/{world_size} timed out after {:.1} s \
         (distributed.timeout_s = {:.1} s): another rank never joined it (crashed, stuck, or \
         called a different collective)",
        waited.as_secs_f64(),
        timeout.as_secs_f64()
    )]
    Timeout {
        /// The collective that expired.
        collective: CollectiveKind,
        /// Logical message size of this rank's call.
        bytes: usize,
        /// How long this rank waited.
        waited: Duration,
        /// The configured deadline.
        timeout: Duration,
        /// The rank that gave up.
        rank: usize,
        /// World size of the group.
        world_size: usize,
    },

    /// A buffer has the wrong length for the collective.
    #[error("{collective}: {what} has {got} elements, expected {expected}")]
    BufferLength {
        /// The collective called.
        collective: CollectiveKind,
        /// Which buffer (`"output"`, `"input"`, ...).
        what: &'static str,
        /// The length required.
        expected: usize,
        /// The length given.
        got: usize,
    },

    /// A root rank outside the group.
    #[error("{collective}: root rank {root} does not exist in a world of size {world_size}")]
    InvalidRoot {
        /// The collective called.
        collective: CollectiveKind,
        /// The root given.
        root: usize,
        /// World size of the group.
        world_size: usize,
    },

    /// Ranks called different collectives, or the same collective with inconsistent lengths, at
    /// the same position of their sequence of collectives (detected by the Threads backend).
    #[error("collective mismatch across ranks: {detail}")]
    Mismatch {
        /// What each rank called.
        detail: String,
    },

    /// An earlier failure (a timeout, a rank that left) broke the group: no further collective
    /// can succeed.
    #[error("the process group is broken: {reason}")]
    Broken {
        /// The failure that broke it.
        reason: String,
    },

    /// The launcher environment describes several ranks but this binary has no MPI support.
    #[error(
        "the environment describes {world_size} ranks ({vars}) but this binary was built without \
         MPI: rebuild with `--features mpi` (see launch/install-deps.sh), or run a single process"
    )]
    NotBuiltWithMpi {
        /// World size the environment describes.
        world_size: usize,
        /// The variables that say so, as `NAME=value` pairs.
        vars: String,
    },

    /// `distributed.backend = mpi` was requested from a binary built without MPI.
    #[error(
        "the MPI backend was requested but this binary was built without MPI: rebuild with \
         `--features mpi` (needs an MPI and libclang: launch/install-deps.sh)"
    )]
    MpiNotCompiled,

    /// Under SLURM, the number of tasks differs from the MPI world size.
    #[error(
        "SLURM started {slurm_tasks} tasks ({var}) but MPI reports a world of size {mpi_world_size}: \
         {hint}"
    )]
    SlurmMismatch {
        /// `SLURM_STEP_NUM_TASKS` or `SLURM_NTASKS`.
        var: &'static str,
        /// Its value.
        slurm_tasks: usize,
        /// What MPI says.
        mpi_world_size: usize,
        /// What to do about it.
        hint: &'static str,
    },

    /// A launcher variable is malformed or inconsistent.
    #[error("bad launcher environment: {var}={value:?}: {reason}")]
    Env {
        /// The variable.
        var: String,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },

    /// MPI could not be initialised (already finalised, insufficient thread support, ...).
    #[error("MPI initialisation failed: {0}")]
    MpiInit(String),

    /// A message too large for the MPI count type (`i32` elements).
    #[error("{collective}: {elements} elements exceed what one MPI call can carry (i32::MAX)")]
    TooLarge {
        /// The collective called.
        collective: CollectiveKind,
        /// Elements requested.
        elements: usize,
    },
}

impl CommError {
    /// Whether this error leaves the group unusable (every rank must then abort).
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            CommError::Timeout { .. } | CommError::Broken { .. } | CommError::Mismatch { .. }
        )
    }
}
