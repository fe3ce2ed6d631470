//! NCCL ranks on CUDA GPUs (cargo feature `nccl`), bootstrapped over MPI.
//!
//! One process per GPU: the GPU is chosen by the local rank ([`Topology::local_rank`]), rank 0
//! creates the NCCL unique id and broadcasts it over MPI, and every rank joins one NCCL
//! communicator bound to the stream of candle's CUDA device (the stream the compute runs on).
//! The fp32 collectives of [`Communicator`] (all-reduce, the non-blocking all-reduce,
//! reduce-scatter, all-gather) run through NCCL; the small ones (f64 sums, byte broadcasts and
//! gathers, barrier) and [`Communicator::abort`] go through the [`Mpi`] communicator that the
//! backend holds for bootstrapping.
//!
//! **Host staging.** The trait works on host buffers (the trainer keeps its gradients on the
//! host for now), so each fp32 collective copies the caller's buffer into page-locked host memory,
//! then host → device, runs the NCCL collective and copies device → host, all enqueued on the
//! stream, and records an event. The staging buffers (page-locked host and device, one pair per
//! buffer of the operation, exact sizes) are cached between calls and reused for the next
//! operation of the same shape, so a training loop that reduces the same buckets every step
//! allocates only in its first step. Page-locked memory keeps every copy asynchronous: no call
//! here blocks the host on the stream, which is what makes the deadline below enforceable.
//!
//! **Deadlines.** NCCL collectives are asynchronous and a missing peer makes them spin on the GPU
//! forever. Completion is polled (the recorded event) against `distributed.timeout_s`; on expiry
//! the NCCL communicator is aborted (`ncclCommAbort`, which also stops its kernels), the staging
//! buffers of the expired operation are abandoned (the GPU may still write to them), and the call
//! returns [`CommError::Timeout`] naming the collective; every later collective returns
//! [`CommError::Broken`]. Communicator set-up (`ncclCommInitRank`, which waits for every rank)
//! runs on a helper thread under the same deadline. Not covered: the host side of an NCCL call
//! itself, which may connect to peers on the first use of an algorithm (`NCCL_RUNTIME_CONNECT`,
//! on by default since NCCL 2.22); set `NCCL_RUNTIME_CONNECT=0` to make every connection during
//! set-up, under the deadline.
//!
//! **Threads.** NCCL communicators are not thread-safe: launches are serialised by a lock. candle's
//! default CUDA stream is the per-thread default stream, so issue the collectives from the thread
//! that runs the compute (what the trainer does); [`PendingReduce::wait`] may run on any thread.
//!
//! Error mapping: CUDA and NCCL failures (no device, a failed launch, a CUDA error reported by the
//! event) are [`CommError::Broken`] with the failing call in the reason: fatal, like a timeout.

use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::Device;
use candle_core::cuda_backend::cudarc::driver::{
    CudaContext, CudaEvent, CudaSlice, CudaStream, DriverError, PinnedHostSlice,
};
use candle_core::cuda_backend::cudarc::nccl::{Comm, Id, ReduceOp, result::NcclError};

use crate::stats::{CollectiveKind, CommStats, Counters};
use crate::topology::{EnvReader, Topology, process_env};
use crate::{
    CommError, Communicator, Mpi, PendingReduce, Result, check_sharded, gpu_for_local_rank,
};

/// Staging sets kept for reuse at most (oldest dropped first). DDP reduces a fixed set of buckets
/// every step; ZeRO adds one reduce-scatter and one all-gather shape.
const MAX_CACHED_STAGINGS: usize = 64;

fn driver(what: &str, e: DriverError) -> String {
    format!("{what}: {e}")
}

fn nccl(what: &str, e: NcclError) -> String {
    format!("{what}: {:?}", e.0)
}

/// Makes [`Comm`] `Send` and aborts it without panicking on drop.
struct SendComm(Option<Comm>);

// SAFETY: an NCCL communicator (`ncclComm_t`, a raw pointer inside `Comm`) may be used from any
// thread provided calls on it are not concurrent. Every use goes through `Shared::comm`'s mutex;
// the only other access is the drop below (ncclCommAbort), which owns the value.
#[allow(unsafe_code)]
unsafe impl Send for SendComm {}

impl Drop for SendComm {
    fn drop(&mut self) {
        if let Some(comm) = self.0.take() {
            // cudarc's Drop calls ncclCommAbort and panics if it fails: never let that escape
            // a drop (it would abort the process while another error is being reported).
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(comm)));
        }
    }
}

/// Page-locked host memory and device memory of one buffer of an operation, both `len` long
/// (cudarc's copies take their length from the host side: the two must match exactly).
struct Buf {
    host: PinnedHostSlice<f32>,
    dev: CudaSlice<f32>,
}

impl Buf {
    fn new(stream: &Arc<CudaStream>, len: usize) -> std::result::Result<Buf, String> {
        let host = pinned_zeroed(stream.context(), len)
            .map_err(|e| driver(&format!("cuMemHostAlloc of {len} floats"), e))?;
        let dev = stream
            .alloc_zeros::<f32>(len)
            .map_err(|e| driver(&format!("device allocation of {len} floats"), e))?;
        Ok(Buf { host, dev })
    }

    fn len(&self) -> usize {
        self.dev.len()
    }

    fn fill(&mut self, src: &[f32]) -> std::result::Result<(), String> {
        // Waits for the last GPU use of this memory: already complete, the previous operation
        // was polled to completion before the staging went back to the pool.
        let host = self
            .host
            .as_mut_slice()
            .map_err(|e| driver("staging write", e))?;
        host.copy_from_slice(src);
        Ok(())
    }

    fn read(&self, dst: &mut [f32]) -> std::result::Result<(), String> {
        let host = self
            .host
            .as_slice()
            .map_err(|e| driver("staging read", e))?;
        dst.copy_from_slice(host);
        Ok(())
    }
}

/// Page-locked host memory (not write-combined: the host reads results back), zeroed.
#[allow(unsafe_code)]
fn pinned_zeroed(
    ctx: &Arc<CudaContext>,
    len: usize,
) -> std::result::Result<PinnedHostSlice<f32>, DriverError> {
    // SAFETY: `alloc_pinned_with_flags` returns `len` uninitialised floats; they are zeroed
    // through the raw pointer before any reference to them is formed.
    unsafe {
        let mut host = ctx.alloc_pinned_with_flags::<f32>(len, 0)?;
        let ptr = host.as_mut_ptr()?;
        std::ptr::write_bytes(ptr, 0, len);
        Ok(host)
    }
}

/// The staging buffers of one operation: `a` is the input (and the output of the in-place
/// all-reduce), `b` the output of reduce-scatter and all-gather.
struct Staging {
    a: Buf,
    b: Option<Buf>,
}

impl Staging {
    fn shape(&self) -> (usize, usize) {
        (self.a.len(), self.b.as_ref().map_or(0, Buf::len))
    }
}

/// State shared by the communicator and its pending reductions.
struct Shared {
    /// `None` once aborted.
    comm: Mutex<SendComm>,
    /// Why the group is unusable, once it is.
    broken: Mutex<Option<String>>,
    pool: Mutex<Vec<Staging>>,
    stream: Arc<CudaStream>,
    topology: Topology,
    timeout: Duration,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How a wait on an event ended.
enum Waited {
    Done,
    Expired,
    Failed(DriverError),
}

/// Polls `event` until it completes or `timeout` has passed since `start`. Spins briefly (short
/// collectives finish within microseconds), then sleeps in small steps.
fn poll_event(event: &CudaEvent, start: Instant, timeout: Duration) -> Waited {
    let mut spins = 0u32;
    loop {
        match event.try_is_complete() {
            Ok(true) => return Waited::Done,
            Ok(false) => {}
            Err(e) => return Waited::Failed(e),
        }
        if start.elapsed() >= timeout {
            return Waited::Expired;
        }
        if spins < 1000 {
            spins += 1;
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

impl Shared {
    fn broken_error(&self) -> Option<CommError> {
        lock(&self.broken).as_ref().map(|reason| CommError::Broken {
            reason: reason.clone(),
        })
    }

    /// Marks the group broken (first reason wins) and aborts the NCCL communicator.
    fn abort_comm(&self, reason: String) {
        {
            let mut b = lock(&self.broken);
            if b.is_none() {
                *b = Some(reason);
            }
        }
        let comm = lock(&self.comm).0.take();
        drop(SendComm(comm));
    }

    /// A failure of a CUDA or NCCL call: the group cannot be trusted any more.
    fn fail(&self, reason: String) -> CommError {
        self.abort_comm(reason.clone());
        CommError::Broken { reason }
    }

    fn timeout_error(&self, kind: CollectiveKind, bytes: usize, start: Instant) -> CommError {
        CommError::Timeout {
            collective: kind,
            bytes,
            waited: start.elapsed(),
            timeout: self.timeout,
            rank: self.topology.rank,
            world_size: self.topology.world_size,
        }
    }

    /// A cached staging of this shape, or a new one.
    fn take_staging(&self, a: usize, b: usize) -> Result<Staging> {
        {
            let mut pool = lock(&self.pool);
            if let Some(i) = pool.iter().position(|s| s.shape() == (a, b)) {
                return Ok(pool.swap_remove(i));
            }
        }
        let new = || -> std::result::Result<Staging, String> {
            Ok(Staging {
                a: Buf::new(&self.stream, a)?,
                b: if b > 0 {
                    Some(Buf::new(&self.stream, b)?)
                } else {
                    None
                },
            })
        };
        new().map_err(|e| self.fail(format!("NCCL staging buffers: {e}")))
    }

    /// Returns a staging whose last operation completed.
    fn give_back(&self, staging: Staging) {
        let mut pool = lock(&self.pool);
        if pool.len() >= MAX_CACHED_STAGINGS {
            pool.remove(0);
        }
        pool.push(staging);
    }

    /// Enqueues `op` (copies and the NCCL call) on the stream under the communicator lock and
    /// records the event that marks its end. On failure the staging is abandoned: parts of the
    /// operation may already be queued.
    fn launch(
        &self,
        what: &str,
        staging: &mut Staging,
        op: impl FnOnce(&Comm, &Arc<CudaStream>, &mut Staging) -> std::result::Result<(), String>,
    ) -> std::result::Result<CudaEvent, String> {
        let guard = lock(&self.comm);
        let Some(comm) = guard.0.as_ref() else {
            return Err(lock(&self.broken)
                .clone()
                .unwrap_or_else(|| "the NCCL communicator was aborted".into()));
        };
        let ctx = self.stream.context();
        ctx.bind_to_thread()
            .map_err(|e| driver("binding the CUDA context", e))?;
        op(comm, &self.stream, staging).map_err(|e| format!("{what}: {e}"))?;
        let event = self
            .stream
            .record_event(None)
            .map_err(|e| driver(&format!("{what}: recording the completion event"), e))?;
        // Errors that cudarc deferred (event bookkeeping of the copies).
        ctx.check_err()
            .map_err(|e| driver(&format!("{what}: CUDA"), e))?;
        Ok(event)
    }

    /// Runs one blocking collective: launch, then poll to completion or the deadline. Returns
    /// the staging holding the result (to be read, then given back).
    fn run(
        &self,
        kind: CollectiveKind,
        bytes: usize,
        mut staging: Staging,
        op: impl FnOnce(&Comm, &Arc<CudaStream>, &mut Staging) -> std::result::Result<(), String>,
    ) -> Result<Staging> {
        let start = Instant::now();
        let event = match self.launch(kind.name(), &mut staging, op) {
            Ok(e) => e,
            Err(reason) => {
                std::mem::forget(staging);
                return Err(self.fail(reason));
            }
        };
        self.finish(kind, bytes, staging, &event, start)
    }

    /// Waits for the operation that `event` ends; aborts the group on expiry.
    fn finish(
        &self,
        kind: CollectiveKind,
        bytes: usize,
        staging: Staging,
        event: &CudaEvent,
        start: Instant,
    ) -> Result<Staging> {
        match poll_event(event, start, self.timeout) {
            Waited::Done => {}
            Waited::Expired => {
                // The GPU may still write into the staging buffers: never free them.
                std::mem::forget(staging);
                let err = self.timeout_error(kind, bytes, start);
                self.abort_comm(err.to_string());
                return Err(err);
            }
            Waited::Failed(e) => {
                std::mem::forget(staging);
                return Err(self.fail(driver(&format!("{kind}: CUDA error"), e)));
            }
        }
        // An abort by another operation meanwhile leaves this result undefined.
        if let Some(e) = self.broken_error() {
            self.give_back(staging);
            return Err(e);
        }
        Ok(staging)
    }
}

/// The fp32 collectives over NCCL with host staging, without MPI (the bootstrap is the caller's).
struct Group {
    shared: Arc<Shared>,
}

fn h2d(stream: &Arc<CudaStream>, buf: &mut Buf) -> std::result::Result<(), String> {
    stream
        .memcpy_htod(&buf.host, &mut buf.dev)
        .map_err(|e| driver("copy host to device", e))
}

fn d2h(stream: &Arc<CudaStream>, buf: &mut Buf) -> std::result::Result<(), String> {
    stream
        .memcpy_dtoh(&buf.dev, &mut buf.host)
        .map_err(|e| driver("copy device to host", e))
}

impl Group {
    /// Joins the NCCL communicator `id` as `rank` of `world_size` on `stream`, on a helper thread
    /// so that a rank that never joins gives an error after `timeout` instead of a hang (the
    /// helper then stays blocked; the job is expected to abort).
    fn join(
        stream: Arc<CudaStream>,
        topology: Topology,
        id: Id,
        timeout: Duration,
    ) -> std::result::Result<Group, String> {
        let (tx, rx) = mpsc::channel();
        let s = Arc::clone(&stream);
        let (rank, world) = (topology.rank, topology.world_size);
        std::thread::Builder::new()
            .name("sepdist-nccl-init".into())
            .spawn(move || {
                // ncclCommInitRank uses the current device: make the stream's context current.
                let r = s
                    .context()
                    .bind_to_thread()
                    .map_err(|e| driver("binding the CUDA context", e))
                    .and_then(|()| {
                        Comm::from_rank(s, rank, world, id).map_err(|e| nccl("ncclCommInitRank", e))
                    })
                    .map(|c| SendComm(Some(c)));
                // After a timeout nobody listens: the communicator is then aborted by its drop.
                let _ = tx.send(r);
            })
            .map_err(|e| format!("cannot start the NCCL set-up thread: {e}"))?;
        let comm = match rx.recv_timeout(timeout) {
            Ok(r) => r?,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(format!(
                    "ncclCommInitRank did not finish within distributed.timeout_s = {:.1} s: \
                     another rank never joined the NCCL communicator",
                    timeout.as_secs_f64()
                ));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err("the NCCL set-up thread panicked".into());
            }
        };
        Ok(Group {
            shared: Arc::new(Shared {
                comm: Mutex::new(comm),
                broken: Mutex::new(None),
                pool: Mutex::new(Vec::new()),
                stream,
                topology,
                timeout,
            }),
        })
    }

    fn check(&self) -> Result<()> {
        match self.shared.broken_error() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        self.check()?;
        if buf.is_empty() {
            return Ok(());
        }
        let sh = &self.shared;
        let mut st = sh.take_staging(buf.len(), 0)?;
        st.a.fill(buf).map_err(|e| sh.fail(e))?;
        let st = sh.run(
            CollectiveKind::AllReduceF32,
            size_of_val(buf),
            st,
            |comm, stream, st| {
                h2d(stream, &mut st.a)?;
                comm.all_reduce_in_place(&mut st.a.dev, &ReduceOp::Sum)
                    .map_err(|e| nccl("ncclAllReduce", e))?;
                d2h(stream, &mut st.a)
            },
        )?;
        st.a.read(buf).map_err(|e| sh.fail(e))?;
        sh.give_back(st);
        Ok(())
    }

    fn start_all_reduce_sum(&self, buf: Vec<f32>) -> Result<NcclPending> {
        self.check()?;
        let sh = &self.shared;
        let bytes = size_of_val(buf.as_slice());
        if buf.is_empty() {
            return Ok(NcclPending {
                shared: Arc::clone(sh),
                op: None,
                out: buf,
                bytes,
                complete: true,
            });
        }
        let mut st = sh.take_staging(buf.len(), 0)?;
        st.a.fill(&buf).map_err(|e| sh.fail(e))?;
        let launched = sh.launch(
            "all_reduce_f32 (non-blocking)",
            &mut st,
            |comm, stream, st| {
                h2d(stream, &mut st.a)?;
                comm.all_reduce_in_place(&mut st.a.dev, &ReduceOp::Sum)
                    .map_err(|e| nccl("ncclAllReduce", e))?;
                d2h(stream, &mut st.a)
            },
        );
        let event = match launched {
            Ok(e) => e,
            Err(reason) => {
                std::mem::forget(st);
                return Err(sh.fail(reason));
            }
        };
        Ok(NcclPending {
            shared: Arc::clone(sh),
            op: Some((st, event)),
            out: buf,
            bytes,
            complete: false,
        })
    }

    fn reduce_scatter_sum(&self, input: &[f32], shard: &mut [f32]) -> Result<()> {
        self.check()?;
        if shard.is_empty() {
            return Ok(());
        }
        let sh = &self.shared;
        let mut st = sh.take_staging(input.len(), shard.len())?;
        st.a.fill(input).map_err(|e| sh.fail(e))?;
        let st = sh.run(
            CollectiveKind::ReduceScatter,
            size_of_val(input),
            st,
            |comm, stream, st| {
                let Staging { a, b } = st;
                let b = b.as_mut().ok_or("reduce-scatter staging without output")?;
                h2d(stream, a)?;
                comm.reduce_scatter(&a.dev, &mut b.dev, &ReduceOp::Sum)
                    .map_err(|e| nccl("ncclReduceScatter", e))?;
                d2h(stream, b)
            },
        )?;
        let out = st.b.as_ref().map(|b| b.read(shard));
        match out {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(sh.fail(e)),
            None => return Err(sh.fail("reduce-scatter staging without output".into())),
        }
        sh.give_back(st);
        Ok(())
    }

    fn all_gather(&self, shard: &[f32], out: &mut [f32]) -> Result<()> {
        self.check()?;
        if shard.is_empty() {
            return Ok(());
        }
        let sh = &self.shared;
        let mut st = sh.take_staging(shard.len(), out.len())?;
        st.a.fill(shard).map_err(|e| sh.fail(e))?;
        let st = sh.run(
            CollectiveKind::AllGather,
            size_of_val(out),
            st,
            |comm, stream, st| {
                let Staging { a, b } = st;
                let b = b.as_mut().ok_or("all-gather staging without output")?;
                h2d(stream, a)?;
                comm.all_gather(&a.dev, &mut b.dev)
                    .map_err(|e| nccl("ncclAllGather", e))?;
                d2h(stream, b)
            },
        )?;
        let read = st.b.as_ref().map(|b| b.read(out));
        match read {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(sh.fail(e)),
            None => return Err(sh.fail("all-gather staging without output".into())),
        }
        sh.give_back(st);
        Ok(())
    }
}

/// A non-blocking all-reduce launched on the stream; [`PendingReduce::wait`] polls its event.
struct NcclPending {
    shared: Arc<Shared>,
    /// The staging and the event that marks the end of the copy back; `None` when empty.
    op: Option<(Staging, CudaEvent)>,
    /// The caller's buffer, overwritten with the sum.
    out: Vec<f32>,
    bytes: usize,
    complete: bool,
}

impl PendingReduce for NcclPending {
    fn poll(&mut self) -> Result<bool> {
        if self.complete {
            return Ok(true);
        }
        let Some((_, event)) = &self.op else {
            return Ok(true);
        };
        match event.try_is_complete() {
            Ok(done) => {
                self.complete = done;
                Ok(done)
            }
            Err(e) => Err(self
                .shared
                .fail(driver("all_reduce_f32 (non-blocking): CUDA error", e))),
        }
    }

    fn wait(mut self: Box<Self>) -> Result<Vec<f32>> {
        let start = Instant::now();
        let Some((staging, event)) = self.op.take() else {
            return Ok(std::mem::take(&mut self.out));
        };
        let sh = Arc::clone(&self.shared);
        let staging = sh.finish(
            CollectiveKind::AllReduceF32,
            self.bytes,
            staging,
            &event,
            start,
        )?;
        let mut out = std::mem::take(&mut self.out);
        staging.a.read(&mut out).map_err(|e| sh.fail(e))?;
        sh.give_back(staging);
        Ok(out)
    }

    fn len(&self) -> usize {
        self.out.len()
    }
}

impl Drop for NcclPending {
    fn drop(&mut self) {
        if let Some((staging, event)) = self.op.take() {
            if self.complete || event.is_complete() {
                self.shared.give_back(staging);
            } else {
                // Dropped while in flight: the GPU may still write to it (see the trait docs).
                std::mem::forget(staging);
            }
        }
    }
}

/// One rank of an NCCL job: fp32 collectives through NCCL on this process's GPU, everything else
/// through MPI. See the module docs.
pub struct Nccl {
    mpi: Mpi,
    group: Group,
    device: Device,
    ordinal: usize,
    nccl_version: i32,
    counters: Counters,
}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nccl")
            .field("topology", &self.mpi.topology())
            .field("gpu", &self.ordinal)
            .field("nccl_version", &self.nccl_version)
            .field("timeout", &self.group.shared.timeout)
            .finish()
    }
}

/// Every rank contributes its outcome of a set-up stage; all fail together, naming the ranks
/// that failed, so that no rank waits for a collective another one will never join.
fn agree(mpi: &Mpi, stage: &str, local: std::result::Result<(), String>) -> Result<()> {
    let mine = match &local {
        Ok(()) => Vec::new(),
        Err(m) if m.is_empty() => b"failed".to_vec(),
        Err(m) => m.as_bytes().to_vec(),
    };
    let all = mpi.all_gather_bytes(&mine)?;
    let failures: Vec<String> = all
        .iter()
        .enumerate()
        .filter(|(_, b)| !b.is_empty())
        .map(|(r, b)| format!("rank {r}: {}", String::from_utf8_lossy(b)))
        .collect();
    if failures.is_empty() {
        Ok(())
    } else {
        Err(CommError::Broken {
            reason: format!(
                "NCCL set-up ({stage}) failed on {} of {} ranks: {}",
                failures.len(),
                all.len(),
                failures.join("; ")
            ),
        })
    }
}

/// Opens the GPU of this local rank.
fn open_device(local_rank: usize) -> std::result::Result<(Device, usize), String> {
    let visible = CudaContext::device_count()
        .map_err(|e| driver("cannot query the CUDA devices (cuInit/cuDeviceGetCount)", e))?;
    let ordinal = gpu_for_local_rank(local_rank, usize::try_from(visible).unwrap_or(0))?;
    let device =
        Device::new_cuda(ordinal).map_err(|e| format!("cannot open CUDA device {ordinal}: {e}"))?;
    Ok((device, ordinal))
}

impl Nccl {
    /// Initialises MPI, opens the GPU of this process's local rank and joins the NCCL
    /// communicator of all ranks. Collective: every rank must call it.
    pub fn init(timeout: Duration) -> Result<Self> {
        Nccl::init_with_env(timeout, &process_env)
    }

    /// [`Nccl::init`] with an injectable environment (only the SLURM check reads it).
    pub fn init_with_env(timeout: Duration, env: EnvReader<'_>) -> Result<Self> {
        let mpi = Mpi::init_with_env(timeout, env)?;
        let opened = open_device(mpi.topology().local_rank);
        let (device, local) = match opened {
            Ok(d) => (Some(d), Ok(())),
            Err(e) => (None, Err(e)),
        };
        agree(&mpi, "opening the GPU of each local rank", local)?;
        let Some((device, _)) = device else {
            return Err(CommError::Broken {
                reason: "NCCL set-up: no CUDA device".into(),
            });
        };
        Nccl::with_device(mpi, &device)
    }

    /// Joins the NCCL communicator of all ranks on `device` (a CUDA device: the NCCL
    /// communicator is bound to its stream). For a trainer that opened its device itself.
    /// Collective: every rank must call it.
    pub fn with_device(mpi: Mpi, device: &Device) -> Result<Self> {
        let timeout = mpi.timeout();
        let topology = mpi.topology();
        let cuda = match device {
            Device::Cuda(d) => Some(d.clone()),
            _ => None,
        };
        let local = match cuda {
            Some(_) => Ok(()),
            None => Err(format!(
                "the NCCL backend needs a CUDA device, got {device:?}"
            )),
        };
        agree(&mpi, "checking the device", local)?;
        let Some(cuda) = cuda else {
            return Err(CommError::Broken {
                reason: "NCCL set-up: not a CUDA device".into(),
            });
        };
        let stream = cuda.cuda_stream();
        let ordinal = stream.context().ordinal();
        // Rank 0 creates the unique id; every rank learns whether that worked.
        let (id, made) = if topology.rank == 0 {
            match Id::new() {
                Ok(id) => (Some(id), Ok(())),
                Err(e) => (None, Err(nccl("ncclGetUniqueId", e))),
            }
        } else {
            (None, Ok(()))
        };
        agree(&mpi, "creating the NCCL unique id on rank 0", made)?;
        let mut bytes: Vec<u8> = id
            .map(|id| id.internal().iter().map(|&c| c as u8).collect())
            .unwrap_or_default();
        mpi.broadcast_bytes(&mut bytes, 0)?;
        let internal: [std::ffi::c_char; 128] = match <[u8; 128]>::try_from(bytes.as_slice()) {
            Ok(b) => b.map(|c| c as std::ffi::c_char),
            Err(_) => {
                return Err(CommError::Broken {
                    reason: format!(
                        "NCCL set-up: the unique id from rank 0 has {} bytes, expected 128",
                        bytes.len()
                    ),
                });
            }
        };
        let joined = Group::join(stream, topology, Id::uninit(internal), timeout);
        let (group, local) = match joined {
            Ok(g) => (Some(g), Ok(())),
            Err(e) => (None, Err(e)),
        };
        agree(&mpi, "ncclCommInitRank", local)?;
        let Some(group) = group else {
            return Err(CommError::Broken {
                reason: "NCCL set-up: no communicator".into(),
            });
        };
        let nccl_version =
            candle_core::cuda_backend::cudarc::nccl::result::get_nccl_version().unwrap_or(0);
        Ok(Nccl {
            mpi,
            group,
            device: device.clone(),
            ordinal,
            nccl_version,
            counters: Counters::default(),
        })
    }

    /// The CUDA device this rank runs NCCL on (its stream carries the collectives).
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Ordinal of that GPU among the visible ones.
    pub fn gpu(&self) -> usize {
        self.ordinal
    }

    /// NCCL's version code (`ncclGetVersion`, e.g. 22707 for 2.27.7).
    pub fn nccl_version(&self) -> i32 {
        self.nccl_version
    }

    /// The MPI communicator used for bootstrapping and the small collectives.
    pub fn mpi(&self) -> &Mpi {
        &self.mpi
    }
}

impl Communicator for Nccl {
    fn rank(&self) -> usize {
        self.mpi.rank()
    }
    fn world_size(&self) -> usize {
        self.mpi.world_size()
    }
    fn topology(&self) -> Topology {
        self.mpi.topology()
    }
    fn backend_name(&self) -> &'static str {
        "nccl"
    }
    fn timeout(&self) -> Duration {
        self.group.shared.timeout
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        self.counters
            .record(CollectiveKind::AllReduceF32, size_of_val(buf));
        self.group.all_reduce_sum(buf)
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.counters
            .record(CollectiveKind::AllReduceF64, size_of_val(buf));
        self.mpi.all_reduce_sum_f64(buf)
    }

    fn start_all_reduce_sum(&self, buf: Vec<f32>) -> Result<Box<dyn PendingReduce>> {
        self.counters
            .record(CollectiveKind::AllReduceF32, size_of_val(buf.as_slice()));
        Ok(Box::new(self.group.start_all_reduce_sum(buf)?))
    }

    fn reduce_scatter_sum(&self, input: &[f32], shard: &mut [f32]) -> Result<()> {
        let kind = CollectiveKind::ReduceScatter;
        check_sharded(kind, self.world_size(), shard.len(), input.len(), "input")?;
        self.counters.record(kind, size_of_val(input));
        self.group.reduce_scatter_sum(input, shard)
    }

    fn all_gather(&self, shard: &[f32], out: &mut [f32]) -> Result<()> {
        let kind = CollectiveKind::AllGather;
        check_sharded(kind, self.world_size(), shard.len(), out.len(), "output")?;
        self.counters.record(kind, size_of_val(out));
        self.group.all_gather(shard, out)
    }

    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        self.counters
            .record(CollectiveKind::BroadcastBytes, buf.len());
        self.mpi.broadcast_bytes(buf, root)
    }

    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.counters
            .record(CollectiveKind::AllGatherBytes, mine.len());
        self.mpi.all_gather_bytes(mine)
    }

    fn barrier(&self) -> Result<()> {
        self.counters.record(CollectiveKind::Barrier, 0);
        self.mpi.barrier()
    }

    /// Counters of the collectives issued through this communicator (not the set-up's).
    fn stats(&self) -> CommStats {
        self.counters.snapshot()
    }

    fn abort(&self, code: i32) -> ! {
        // Stop this rank's NCCL kernels first, unless a launch holds the lock (then MPI_Abort
        // ends the process anyway).
        if let Ok(mut guard) = self.group.shared.comm.try_lock() {
            let comm = guard.0.take();
            drop(guard);
            drop(SendComm(comm));
        }
        self.mpi.abort(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(60);

    fn single(device: &Device, timeout: Duration) -> Group {
        let stream = match device {
            Device::Cuda(d) => d.cuda_stream(),
            _ => panic!("not a CUDA device"),
        };
        let id = Id::new().expect("ncclGetUniqueId");
        Group::join(stream, Topology::single(), id, timeout).expect("one-rank NCCL communicator")
    }

    #[test]
    fn one_rank_collectives_on_gpu0() {
        let Some(device) = crate::cuda_memory::test_gpu() else {
            return;
        };
        let g = single(&device, T);
        for round in 0..3 {
            // Same shapes each round: the second and third reuse the cached staging buffers.
            let mut buf: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5 + round as f32).collect();
            let want = buf.clone();
            g.all_reduce_sum(&mut buf).unwrap();
            assert_eq!(buf, want);

            let input: Vec<f32> = (0..64).map(|i| i as f32).collect();
            let mut shard = vec![0.0f32; 64];
            g.reduce_scatter_sum(&input, &mut shard).unwrap();
            assert_eq!(shard, input);

            let mut out = vec![0.0f32; 64];
            g.all_gather(&input, &mut out).unwrap();
            assert_eq!(out, input);

            let a = g.start_all_reduce_sum(vec![1.0; 4096]).unwrap();
            let b = g.start_all_reduce_sum(vec![2.0; 17]).unwrap();
            assert_eq!(Box::new(b).wait().unwrap(), vec![2.0; 17]);
            let mut a = Box::new(a);
            while !a.poll().unwrap() {
                std::thread::yield_now();
            }
            assert_eq!(a.wait().unwrap(), vec![1.0; 4096]);
        }
        assert!(lock(&g.shared.pool).len() <= 4);
        let mut empty: Vec<f32> = Vec::new();
        g.all_reduce_sum(&mut empty).unwrap();
        assert!(
            Box::new(g.start_all_reduce_sum(Vec::new()).unwrap())
                .wait()
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn set_up_times_out_when_a_rank_never_joins() {
        let Some(device) = crate::cuda_memory::test_gpu() else {
            return;
        };
        let stream = match &device {
            Device::Cuda(d) => d.cuda_stream(),
            _ => panic!("not a CUDA device"),
        };
        let id = Id::new().expect("ncclGetUniqueId");
        // Rank 0 of 2; rank 1 never comes.
        let topo = Topology {
            world_size: 2,
            ..Topology::single()
        };
        let start = Instant::now();
        let e = Group::join(stream, topo, id, Duration::from_secs(3))
            .err()
            .expect("a set-up without rank 1 must fail");
        assert!(
            e.contains("did not finish") && e.contains("never joined"),
            "{e}"
        );
        assert!(start.elapsed() < Duration::from_secs(30));
    }

    /// The whole backend as `init` builds it: MPI singleton (no mpirun), GPU of local rank 0.
    #[test]
    fn singleton_nccl_communicator() {
        let Some(_) = crate::cuda_memory::test_gpu() else {
            return;
        };
        let c = Nccl::init_with_env(T, &|_: &str| None::<String>).expect("NCCL init");
        assert_eq!((c.rank(), c.world_size(), c.backend_name()), (0, 1, "nccl"));
        assert_eq!(c.gpu(), 0);
        let mut buf = vec![1.5f32; 333];
        c.all_reduce_sum(&mut buf).unwrap();
        assert_eq!(buf, vec![1.5; 333]);
        let mut f = vec![2.0f64, 3.0];
        c.all_reduce_sum_f64(&mut f).unwrap();
        assert_eq!(f, vec![2.0, 3.0]);
        let p = c.start_all_reduce_sum(vec![4.0; 8]).unwrap();
        assert_eq!(p.wait().unwrap(), vec![4.0; 8]);
        c.barrier().unwrap();
        let e = c.reduce_scatter_sum(&[1.0; 4], &mut [0.0; 3]).unwrap_err();
        assert!(matches!(e, CommError::BufferLength { .. }), "{e}");
        let s = c.stats();
        assert_eq!(s.get(CollectiveKind::AllReduceF32).calls, 2);
        assert_eq!(s.get(CollectiveKind::AllReduceF64).calls, 1);
        assert_eq!(s.get(CollectiveKind::Barrier).calls, 1);
    }
}
