//! Multi-process ranks over MPI (rsmpi), one rank per process.
//!
//! Every collective is issued as a non-blocking MPI operation and polled (`MPI_Test`) until it
//! completes or its deadline passes, so a rank that never joins produces
//! [`CommError::Timeout`] instead of a hang. MPI cannot cancel a collective: on expiry the
//! request and its buffers are abandoned (the buffers are leaked so MPI may still write to them)
//! and the group must be aborted.
//!
//! Buffers handed to MPI are owned by this module (copies of the caller's slices, or the `Vec`
//! moved into [`Communicator::start_all_reduce_sum`]), never the caller's memory: that is what
//! makes abandoning a request sound.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use mpi::collective::SystemOperation;
use mpi::environment::{Threading, Universe};
use mpi::ffi;
use mpi::request::{LocalScope, Request};
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator as _, CommunicatorCollectives as _, Root as _};

use crate::stats::{CollectiveKind, CommStats, Counters};
use crate::topology::{EnvReader, Launcher, Topology, process_env};
use crate::{CommError, Communicator, PendingReduce, Result, check_root, check_sharded};

/// Thread support the MPI library granted (`MPI_Init_thread`'s `provided`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum MpiThreading {
    /// `MPI_THREAD_SINGLE` (refused: sepdist's data loader runs other threads).
    Single,
    /// `MPI_THREAD_FUNNELED`: only the thread that initialised MPI may call it.
    Funneled,
    /// `MPI_THREAD_SERIALIZED`: any thread, one at a time.
    Serialized,
    /// `MPI_THREAD_MULTIPLE`: any thread, concurrently.
    Multiple,
}

impl From<Threading> for MpiThreading {
    fn from(t: Threading) -> Self {
        match t {
            Threading::Single => MpiThreading::Single,
            Threading::Funneled => MpiThreading::Funneled,
            Threading::Serialized => MpiThreading::Serialized,
            Threading::Multiple => MpiThreading::Multiple,
        }
    }
}

/// MPI is initialised once per process and finalised when the last [`Mpi`] is dropped; it cannot
/// be initialised again afterwards (an MPI rule).
enum InitState {
    Never,
    Live(Weak<Universe>, MpiThreading),
    Finalized,
}

static INIT: Mutex<InitState> = Mutex::new(InitState::Never);

fn universe() -> Result<(Arc<Universe>, MpiThreading)> {
    let mut st = INIT.lock().unwrap_or_else(|e| e.into_inner());
    if let InitState::Live(weak, threading) = &*st {
        if let Some(u) = weak.upgrade() {
            return Ok((u, *threading));
        }
        *st = InitState::Finalized;
    }
    if let InitState::Finalized = &*st {
        return Err(CommError::MpiInit(
            "MPI was already finalised in this process (the last communicator was dropped) and \
             cannot be initialised again"
                .into(),
        ));
    }
    // MULTIPLE when available, so that a communicator moved to another thread stays legal;
    // FUNNELED (calls only from the initialising thread) is the minimum we accept.
    let (u, provided) = mpi::initialize_with_threading(Threading::Multiple).ok_or_else(|| {
        CommError::MpiInit("MPI was already initialised by other code in this process".into())
    })?;
    let provided = MpiThreading::from(provided);
    if provided < MpiThreading::Funneled {
        return Err(CommError::MpiInit(format!(
            "the MPI library provides only {provided:?} thread support; sepdist needs at least \
             MPI_THREAD_FUNNELED"
        )));
    }
    let u = Arc::new(u);
    *st = InitState::Live(Arc::downgrade(&u), provided);
    Ok((u, provided))
}

/// One rank of an MPI job (`MPI_COMM_WORLD`).
///
/// Call it from the thread that created it unless [`Mpi::threading`] is
/// [`MpiThreading::Multiple`] (MPICH and OpenMPI builds normally are).
pub struct Mpi {
    // Keeps MPI initialised; finalised when the last clone drops.
    _universe: Arc<Universe>,
    threading: MpiThreading,
    topology: Topology,
    timeout: Duration,
    counters: Counters,
}

impl std::fmt::Debug for Mpi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mpi")
            .field("topology", &self.topology)
            .field("threading", &self.threading)
            .field("timeout", &self.timeout)
            .finish()
    }
}

fn world() -> SimpleCommunicator {
    SimpleCommunicator::world()
}

fn mpi_count(kind: CollectiveKind, n: usize) -> Result<()> {
    if i32::try_from(n).is_ok() {
        Ok(())
    } else {
        Err(CommError::TooLarge {
            collective: kind,
            elements: n,
        })
    }
}

impl Mpi {
    /// Initialises MPI (once per process) and checks the world against SLURM's task count.
    pub fn init(timeout: Duration) -> Result<Self> {
        Mpi::init_with_env(timeout, &process_env)
    }

    /// [`Mpi::init`] with an injectable environment (only the SLURM check reads it).
    pub fn init_with_env(timeout: Duration, env: EnvReader<'_>) -> Result<Self> {
        let (universe, threading) = universe()?;
        let w = universe.world();
        let rank = usize::try_from(w.rank()).unwrap_or(0);
        let world_size = usize::try_from(w.size()).unwrap_or(1);
        Topology::check_slurm(world_size, env)?;
        // Ranks sharing a node (MPI_COMM_TYPE_SHARED): the local rank picks the GPU.
        let local_rank = usize::try_from(w.split_shared(w.rank()).rank()).unwrap_or(0);
        Ok(Mpi {
            _universe: universe,
            threading,
            topology: Topology {
                rank,
                world_size,
                local_rank,
                launcher: Launcher::Mpi,
            },
            timeout,
            counters: Counters::default(),
        })
    }

    /// The thread support MPI granted.
    pub fn threading(&self) -> MpiThreading {
        self.threading
    }

    fn deadline_error(&self, kind: CollectiveKind, bytes: usize, start: Instant) -> CommError {
        CommError::Timeout {
            collective: kind,
            bytes,
            waited: start.elapsed(),
            timeout: self.timeout,
            rank: self.topology.rank,
            world_size: self.topology.world_size,
        }
    }

    fn run<S, R>(&self, op: InFlight<S, R>) -> Result<Vec<R>> {
        op.wait_until(self.timeout, self.topology)
    }
}

/// An MPI request handle. MPICH's is an integer, OpenMPI's a pointer to library-owned state;
/// either way it is an opaque id that MPI allows any thread to use under the granted thread
/// level, which [`Mpi`] documents.
struct RawRequest(ffi::MPI_Request);

// Needed for OpenMPI, whose handle type is a raw pointer; see `RawRequest`.
#[allow(unsafe_code)]
unsafe impl Send for RawRequest {}

/// Unregisters a request from its scope and returns the raw handle, so that it can outlive the
/// scope's closure and be polled with a deadline.
///
/// The one place this crate needs `unsafe`: rsmpi's safe requests must complete inside their
/// scope (or abort the process), which rules out returning a timeout error while an operation is
/// still in flight. Sound because every buffer of the request is a heap allocation owned by the
/// [`InFlight`] that receives the handle, which frees it only after completion and leaks it
/// otherwise.
#[allow(unsafe_code)]
fn detach<'a, D: ?Sized>(req: Request<'a, D, &LocalScope<'a>>) -> RawRequest {
    // SAFETY: see above: the buffers outlive the request (freed only once it completed).
    let (raw, _, _) = unsafe { req.into_raw() };
    RawRequest(raw)
}

/// `MPI_Test` on a detached request: drives progress, true once complete.
#[allow(unsafe_code)]
fn test(req: &mut RawRequest) -> bool {
    let mut flag: std::os::raw::c_int = 0;
    // SAFETY: `req.0` is a live request from `detach` or MPI_REQUEST_NULL after completion (for
    // which MPI_Test reports completion); `flag` is a valid out-pointer; the status is ignored.
    unsafe {
        ffi::MPI_Test(&mut req.0, &mut flag, ffi::RSMPI_STATUS_IGNORE);
    }
    flag != 0
}

/// A non-blocking collective in flight with the buffers MPI reads from and writes to.
struct InFlight<S, R> {
    req: RawRequest,
    send: Vec<S>,
    recv: Vec<R>,
    done: bool,
    kind: CollectiveKind,
    bytes: usize,
}

impl<S, R> InFlight<S, R> {
    fn poll(&mut self) -> bool {
        if !self.done {
            self.done = test(&mut self.req);
        }
        self.done
    }

    /// Polls until complete or `timeout` from now; returns the receive buffer.
    fn wait_until(mut self, timeout: Duration, topo: Topology) -> Result<Vec<R>> {
        let start = Instant::now();
        // Busy-poll with yields: MPICH progresses non-blocking collectives only inside MPI calls,
        // so sleeping between tests would stall multi-round algorithms.
        while !self.poll() {
            if start.elapsed() >= timeout {
                return Err(CommError::Timeout {
                    collective: self.kind,
                    bytes: self.bytes,
                    waited: start.elapsed(),
                    timeout,
                    rank: topo.rank,
                    world_size: topo.world_size,
                });
            }
            std::thread::yield_now();
        }
        Ok(std::mem::take(&mut self.recv))
    }
}

impl<S, R> Drop for InFlight<S, R> {
    fn drop(&mut self) {
        if !self.done {
            // MPI may still read `send` and write `recv`: never free them.
            std::mem::forget(std::mem::take(&mut self.send));
            std::mem::forget(std::mem::take(&mut self.recv));
        }
    }
}

fn start_all_reduce<T>(send: Vec<T>, kind: CollectiveKind) -> InFlight<T, T>
where
    T: mpi::datatype::Equivalence + Copy + Default,
{
    let mut recv = vec![T::default(); send.len()];
    let req = mpi::request::scope(|scope| {
        detach(world().immediate_all_reduce_into(
            scope,
            &send[..],
            &mut recv[..],
            SystemOperation::sum(),
        ))
    });
    let bytes = size_of_val(send.as_slice());
    InFlight {
        req,
        send,
        recv,
        done: false,
        kind,
        bytes,
    }
}

fn start_all_gather<T>(send: Vec<T>, world_size: usize, kind: CollectiveKind) -> InFlight<T, T>
where
    T: mpi::datatype::Equivalence + Copy + Default,
{
    let mut recv = vec![T::default(); send.len() * world_size];
    let req = mpi::request::scope(|scope| {
        detach(world().immediate_all_gather_into(scope, &send[..], &mut recv[..]))
    });
    let bytes = size_of_val(recv.as_slice());
    InFlight {
        req,
        send,
        recv,
        done: false,
        kind,
        bytes,
    }
}

fn start_broadcast<T>(mut buf: Vec<T>, root: usize, kind: CollectiveKind) -> InFlight<T, T>
where
    T: mpi::datatype::Equivalence,
{
    // `root < world_size <= i32::MAX` was checked by the caller.
    let root = i32::try_from(root).unwrap_or(0);
    let req = mpi::request::scope(|scope| {
        detach(
            world()
                .process_at_rank(root)
                .immediate_broadcast_into(scope, &mut buf[..]),
        )
    });
    let bytes = size_of_val(buf.as_slice());
    InFlight {
        req,
        send: Vec::new(),
        recv: buf,
        done: false,
        kind,
        bytes,
    }
}

struct MpiPending {
    op: InFlight<f32, f32>,
    timeout: Duration,
    topology: Topology,
    len: usize,
}

impl PendingReduce for MpiPending {
    fn poll(&mut self) -> Result<bool> {
        Ok(self.op.poll())
    }
    fn wait(self: Box<Self>) -> Result<Vec<f32>> {
        let MpiPending {
            op,
            timeout,
            topology,
            ..
        } = *self;
        op.wait_until(timeout, topology)
    }
    fn len(&self) -> usize {
        self.len
    }
}

impl Communicator for Mpi {
    fn rank(&self) -> usize {
        self.topology.rank
    }
    fn world_size(&self) -> usize {
        self.topology.world_size
    }
    fn topology(&self) -> Topology {
        self.topology
    }
    fn backend_name(&self) -> &'static str {
        "mpi"
    }
    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let kind = CollectiveKind::AllReduceF32;
        mpi_count(kind, buf.len())?;
        self.counters.record(kind, size_of_val(buf));
        let out = self.run(start_all_reduce(buf.to_vec(), kind))?;
        buf.copy_from_slice(&out);
        Ok(())
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        let kind = CollectiveKind::AllReduceF64;
        mpi_count(kind, buf.len())?;
        self.counters.record(kind, size_of_val(buf));
        let out = self.run(start_all_reduce(buf.to_vec(), kind))?;
        buf.copy_from_slice(&out);
        Ok(())
    }

    fn start_all_reduce_sum(&self, buf: Vec<f32>) -> Result<Box<dyn PendingReduce>> {
        let kind = CollectiveKind::AllReduceF32;
        mpi_count(kind, buf.len())?;
        self.counters.record(kind, size_of_val(buf.as_slice()));
        let len = buf.len();
        Ok(Box::new(MpiPending {
            op: start_all_reduce(buf, kind),
            timeout: self.timeout,
            topology: self.topology,
            len,
        }))
    }

    fn reduce_scatter_sum(&self, input: &[f32], shard: &mut [f32]) -> Result<()> {
        let kind = CollectiveKind::ReduceScatter;
        check_sharded(kind, self.world_size(), shard.len(), input.len(), "input")?;
        mpi_count(kind, input.len())?;
        self.counters.record(kind, size_of_val(input));
        let send = input.to_vec();
        let mut recv = vec![0.0f32; shard.len()];
        let req = mpi::request::scope(|scope| {
            detach(world().immediate_reduce_scatter_block_into(
                scope,
                &send[..],
                &mut recv[..],
                SystemOperation::sum(),
            ))
        });
        let op = InFlight {
            req,
            send,
            recv,
            done: false,
            kind,
            bytes: size_of_val(input),
        };
        shard.copy_from_slice(&self.run(op)?);
        Ok(())
    }

    fn all_gather(&self, shard: &[f32], out: &mut [f32]) -> Result<()> {
        let kind = CollectiveKind::AllGather;
        check_sharded(kind, self.world_size(), shard.len(), out.len(), "output")?;
        mpi_count(kind, out.len())?;
        self.counters.record(kind, size_of_val(out));
        let gathered = self.run(start_all_gather(shard.to_vec(), self.world_size(), kind))?;
        out.copy_from_slice(&gathered);
        Ok(())
    }

    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        let kind = CollectiveKind::BroadcastBytes;
        check_root(kind, root, self.world_size())?;
        mpi_count(kind, buf.len())?;
        self.counters.record(kind, buf.len());
        let start = Instant::now();
        // Length first, so that non-roots can size their buffer.
        let len = self.run(start_broadcast(vec![buf.len() as u64], root, kind))?;
        let len = len.first().copied().unwrap_or(0);
        let len = usize::try_from(len).map_err(|_| CommError::TooLarge {
            collective: kind,
            elements: usize::MAX,
        })?;
        let payload = if self.rank() == root {
            buf.clone()
        } else {
            vec![0u8; len]
        };
        let remaining = self.timeout.saturating_sub(start.elapsed());
        let out = start_broadcast(payload, root, kind)
            .wait_until(remaining, self.topology)
            .map_err(|_| self.deadline_error(kind, len, start))?;
        *buf = out;
        Ok(())
    }

    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        let kind = CollectiveKind::AllGatherBytes;
        mpi_count(kind, mine.len())?;
        self.counters.record(kind, mine.len());
        let n = self.world_size();
        let start = Instant::now();
        let lens = self.run(start_all_gather(vec![mine.len() as u64], n, kind))?;
        let lens: Vec<usize> = lens
            .iter()
            .map(|&l| usize::try_from(l).unwrap_or(usize::MAX))
            .collect();
        // Fixed-size blocks padded to the longest: these are small (fingerprints, hashes).
        let max = lens.iter().copied().max().unwrap_or(0);
        mpi_count(kind, max.saturating_mul(n))?;
        let mut padded = mine.to_vec();
        padded.resize(max, 0);
        let remaining = self.timeout.saturating_sub(start.elapsed());
        let all = start_all_gather(padded, n, kind)
            .wait_until(remaining, self.topology)
            .map_err(|_| self.deadline_error(kind, max * n, start))?;
        Ok(lens
            .iter()
            .enumerate()
            .map(|(r, &l)| all[r * max..r * max + l].to_vec())
            .collect())
    }

    fn barrier(&self) -> Result<()> {
        let kind = CollectiveKind::Barrier;
        self.counters.record(kind, 0);
        let start = Instant::now();
        // No buffers: rsmpi's 'static request can be polled and, on expiry, forgotten safely.
        let mut req = world().immediate_barrier();
        loop {
            match req.test() {
                Ok(_) => return Ok(()),
                Err(pending) => req = pending,
            }
            if start.elapsed() >= self.timeout {
                std::mem::forget(req);
                return Err(self.deadline_error(kind, 0, start));
            }
            std::thread::yield_now();
        }
    }

    fn stats(&self) -> CommStats {
        self.counters.snapshot()
    }

    fn abort(&self, code: i32) -> ! {
        // The launcher forwards our stdout/stderr through pipes and tears everything down on
        // MPI_Abort: give it a moment to forward the message that explains the abort.
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        std::thread::sleep(std::time::Duration::from_millis(500));
        world().abort(code)
    }
}
