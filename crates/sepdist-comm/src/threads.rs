//! N ranks inside one process, one thread each: fast multi-rank tests without MPI.
//!
//! Each collective is a *round* identified by its position in the rank's sequence of issued
//! collectives (MPI's matching rule). A rank deposits its contribution; the last rank to arrive
//! combines all of them in rank order into one shared result, so every rank gets bitwise the same
//! value. Any failure (timeout, mismatch, a rank dropping its communicator) breaks the group:
//! every later or waiting collective fails at once instead of hanging.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::stats::{CollectiveKind, CommStats, Counters};
use crate::topology::{Launcher, Topology};
use crate::{CommError, Communicator, PendingReduce, Result, check_root, check_sharded};

/// Factory of in-process ranks.
#[derive(Debug)]
pub struct Threads;

impl Threads {
    /// Creates `n` connected communicators (`n >= 1`; 0 is treated as 1), rank `r` at index `r`.
    /// Move each into its own thread: a collective blocks until all ranks have issued it.
    #[allow(clippy::new_ret_no_self)] // a factory of a group, not a `Threads` value
    pub fn new(n: usize, timeout: Duration) -> Vec<ThreadsComm> {
        let n = n.max(1);
        let shared = Arc::new(Shared {
            n,
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
        });
        (0..n)
            .map(|rank| ThreadsComm {
                rank,
                shared: Arc::clone(&shared),
                next_seq: Cell::new(0),
                timeout,
                counters: Counters::default(),
            })
            .collect()
    }

    /// Runs `f` on each rank of a fresh group of `n`, one scoped thread each, and returns the
    /// results by rank. A panic on any rank is re-raised here (the other ranks then fail fast
    /// with [`CommError::Broken`] since the panicking rank's communicator is dropped).
    pub fn run<R: Send>(
        n: usize,
        timeout: Duration,
        f: impl Fn(ThreadsComm) -> R + Sync,
    ) -> Vec<R> {
        let comms = Threads::new(n, timeout);
        let f = &f;
        std::thread::scope(|s| {
            let handles: Vec<_> = comms.into_iter().map(|c| s.spawn(move || f(c))).collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        })
    }
}

/// One rank of a [`Threads`] group.
#[derive(Debug)]
pub struct ThreadsComm {
    rank: usize,
    shared: Arc<Shared>,
    // Position in this rank's sequence of collectives: the round it joins next.
    next_seq: Cell<u64>,
    timeout: Duration,
    counters: Counters,
}

#[derive(Debug)]
struct Shared {
    n: usize,
    state: Mutex<State>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct State {
    rounds: BTreeMap<u64, Round>,
    broken: Option<String>,
}

#[derive(Debug)]
struct Round {
    contributions: Vec<Option<Contribution>>,
    arrived: usize,
    result: Option<Arc<Combined>>,
    taken: usize,
}

#[derive(Debug)]
enum Contribution {
    SumF32(Vec<f32>),
    SumF64(Vec<f64>),
    ReduceScatter(Vec<f32>),
    AllGather(Vec<f32>),
    Broadcast { root: usize, data: Option<Vec<u8>> },
    GatherBytes(Vec<u8>),
    Barrier,
}

impl Contribution {
    fn kind(&self) -> CollectiveKind {
        match self {
            Contribution::SumF32(_) => CollectiveKind::AllReduceF32,
            Contribution::SumF64(_) => CollectiveKind::AllReduceF64,
            Contribution::ReduceScatter(_) => CollectiveKind::ReduceScatter,
            Contribution::AllGather(_) => CollectiveKind::AllGather,
            Contribution::Broadcast { .. } => CollectiveKind::BroadcastBytes,
            Contribution::GatherBytes(_) => CollectiveKind::AllGatherBytes,
            Contribution::Barrier => CollectiveKind::Barrier,
        }
    }

    /// What must agree across ranks: the element count, or the root of a broadcast.
    fn shape(&self) -> usize {
        match self {
            Contribution::SumF32(v)
            | Contribution::ReduceScatter(v)
            | Contribution::AllGather(v) => v.len(),
            Contribution::SumF64(v) => v.len(),
            Contribution::Broadcast { root, .. } => *root,
            Contribution::GatherBytes(_) | Contribution::Barrier => 0,
        }
    }
}

#[derive(Debug)]
enum Combined {
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bytes(Vec<u8>),
    BytesList(Vec<Vec<u8>>),
    Unit,
    Mismatch(String),
}

fn sum_in_rank_order<T: Copy + std::ops::AddAssign>(parts: Vec<Vec<T>>) -> Vec<T> {
    let mut it = parts.into_iter();
    let mut acc = it.next().unwrap_or_default();
    for p in it {
        for (a, b) in acc.iter_mut().zip(&p) {
            *a += *b;
        }
    }
    acc
}

/// Combines the contributions of one round (all present), or describes the mismatch.
fn combine(parts: Vec<Contribution>) -> Combined {
    let first = (parts[0].kind(), parts[0].shape());
    if parts.iter().any(|p| (p.kind(), p.shape()) != first) {
        let detail = parts
            .iter()
            .enumerate()
            .map(|(r, p)| match p {
                Contribution::Broadcast { root, .. } => {
                    format!("rank {r}: {} root {root}", p.kind())
                }
                Contribution::GatherBytes(_) | Contribution::Barrier => {
                    format!("rank {r}: {}", p.kind())
                }
                _ => format!("rank {r}: {} of {} elements", p.kind(), p.shape()),
            })
            .collect::<Vec<_>>()
            .join(", ");
        return Combined::Mismatch(detail);
    }
    match first.0 {
        CollectiveKind::AllReduceF32 | CollectiveKind::ReduceScatter => {
            Combined::F32(sum_in_rank_order(
                parts
                    .into_iter()
                    .filter_map(|p| match p {
                        Contribution::SumF32(v) | Contribution::ReduceScatter(v) => Some(v),
                        _ => None,
                    })
                    .collect(),
            ))
        }
        CollectiveKind::AllReduceF64 => Combined::F64(sum_in_rank_order(
            parts
                .into_iter()
                .filter_map(|p| match p {
                    Contribution::SumF64(v) => Some(v),
                    _ => None,
                })
                .collect(),
        )),
        CollectiveKind::AllGather => Combined::F32(
            parts
                .into_iter()
                .flat_map(|p| match p {
                    Contribution::AllGather(v) => v,
                    _ => Vec::new(),
                })
                .collect(),
        ),
        CollectiveKind::BroadcastBytes => Combined::Bytes(
            parts
                .into_iter()
                .find_map(|p| match p {
                    Contribution::Broadcast { data, .. } => data,
                    _ => None,
                })
                .unwrap_or_default(),
        ),
        CollectiveKind::AllGatherBytes => Combined::BytesList(
            parts
                .into_iter()
                .map(|p| match p {
                    Contribution::GatherBytes(v) => v,
                    _ => Vec::new(),
                })
                .collect(),
        ),
        CollectiveKind::Barrier => Combined::Unit,
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave `State` half-updated in a way that matters
        // more than the panic itself; keep serving the other ranks.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn break_group(&self, state: &mut State, reason: String) {
        if state.broken.is_none() {
            state.broken = Some(reason);
        }
        self.cv.notify_all();
    }
}

/// Identifies one issued collective, for waiting and for error messages.
#[derive(Debug, Clone, Copy)]
struct Ticket {
    seq: u64,
    kind: CollectiveKind,
    bytes: usize,
}

impl ThreadsComm {
    fn deposit(&self, c: Contribution, bytes: usize) -> Result<Ticket> {
        let kind = c.kind();
        self.counters.record(kind, bytes);
        let seq = self.next_seq.get();
        self.next_seq.set(seq + 1);
        let sh = &*self.shared;
        let mut st = sh.lock();
        if let Some(reason) = &st.broken {
            return Err(CommError::Broken {
                reason: reason.clone(),
            });
        }
        let n = sh.n;
        let round = st.rounds.entry(seq).or_insert_with(|| Round {
            contributions: (0..n).map(|_| None).collect(),
            arrived: 0,
            result: None,
            taken: 0,
        });
        round.contributions[self.rank] = Some(c);
        round.arrived += 1;
        if round.arrived == n {
            let parts: Vec<Contribution> = round
                .contributions
                .iter_mut()
                .filter_map(Option::take)
                .collect();
            let combined = combine(parts);
            let mismatch = match &combined {
                Combined::Mismatch(d) => Some(format!("collective #{seq}: {d}")),
                _ => None,
            };
            round.result = Some(Arc::new(combined));
            if let Some(m) = mismatch {
                sh.break_group(&mut st, m);
            }
            sh.cv.notify_all();
        }
        Ok(Ticket { seq, kind, bytes })
    }

    fn wait(&self, t: Ticket) -> Result<Arc<Combined>> {
        wait_ticket(&self.shared, t, self.rank, self.timeout)
    }
}

/// Takes this rank's share of a finished round, if finished.
fn try_take(sh: &Shared, st: &mut State, seq: u64) -> Option<Arc<Combined>> {
    let round = st.rounds.get_mut(&seq)?;
    let res = Arc::clone(round.result.as_ref()?);
    round.taken += 1;
    if round.taken == sh.n {
        st.rounds.remove(&seq);
    }
    Some(res)
}

fn wait_ticket(sh: &Shared, t: Ticket, rank: usize, timeout: Duration) -> Result<Arc<Combined>> {
    let start = Instant::now();
    let deadline = start + timeout;
    let mut st = sh.lock();
    loop {
        // A finished round is delivered even if the group broke afterwards.
        if let Some(res) = try_take(sh, &mut st, t.seq) {
            return match &*res {
                Combined::Mismatch(d) => Err(CommError::Mismatch {
                    detail: format!("collective #{}: {d}", t.seq),
                }),
                _ => Ok(res),
            };
        }
        if let Some(reason) = &st.broken {
            return Err(CommError::Broken {
                reason: reason.clone(),
            });
        }
        let now = Instant::now();
        if now >= deadline {
            let err = CommError::Timeout {
                collective: t.kind,
                bytes: t.bytes,
                waited: now - start,
                timeout,
                rank,
                world_size: sh.n,
            };
            sh.break_group(&mut st, err.to_string());
            return Err(err);
        }
        st = sh
            .cv
            .wait_timeout(st, deadline - now)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

fn unexpected(kind: CollectiveKind) -> CommError {
    // Only reachable if `combine` and the callers disagree: a bug here, not a user error.
    CommError::Mismatch {
        detail: format!("internal: unexpected result type for {kind}"),
    }
}

struct ThreadsPending {
    shared: Arc<Shared>,
    ticket: Ticket,
    rank: usize,
    len: usize,
    timeout: Duration,
}

impl PendingReduce for ThreadsPending {
    fn poll(&mut self) -> Result<bool> {
        let st = self.shared.lock();
        let done = st
            .rounds
            .get(&self.ticket.seq)
            .is_some_and(|r| r.result.is_some());
        match &st.broken {
            Some(reason) if !done => Err(CommError::Broken {
                reason: reason.clone(),
            }),
            _ => Ok(done),
        }
    }

    fn wait(self: Box<Self>) -> Result<Vec<f32>> {
        let res = wait_ticket(&self.shared, self.ticket, self.rank, self.timeout)?;
        match &*res {
            Combined::F32(v) => Ok(v.clone()),
            _ => Err(unexpected(self.ticket.kind)),
        }
    }

    fn len(&self) -> usize {
        self.len
    }
}

impl Drop for ThreadsComm {
    fn drop(&mut self) {
        // The other ranks can no longer complete a collective: fail them now rather than at the
        // deadline (rounds already finished are still delivered).
        let sh = &*self.shared;
        let mut st = sh.lock();
        let reason = format!(
            "rank {} left the group (its communicator was dropped)",
            self.rank
        );
        sh.break_group(&mut st, reason);
    }
}

impl Communicator for ThreadsComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.n
    }
    fn topology(&self) -> Topology {
        Topology {
            rank: self.rank,
            world_size: self.shared.n,
            local_rank: self.rank,
            launcher: Launcher::Threads,
        }
    }
    fn backend_name(&self) -> &'static str {
        "threads"
    }
    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let t = self.deposit(Contribution::SumF32(buf.to_vec()), size_of_val(buf))?;
        match &*self.wait(t)? {
            Combined::F32(v) => buf.copy_from_slice(v),
            _ => return Err(unexpected(t.kind)),
        }
        Ok(())
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        let t = self.deposit(Contribution::SumF64(buf.to_vec()), size_of_val(buf))?;
        match &*self.wait(t)? {
            Combined::F64(v) => buf.copy_from_slice(v),
            _ => return Err(unexpected(t.kind)),
        }
        Ok(())
    }

    fn start_all_reduce_sum(&self, buf: Vec<f32>) -> Result<Box<dyn PendingReduce>> {
        let len = buf.len();
        let bytes = size_of_val(buf.as_slice());
        let ticket = self.deposit(Contribution::SumF32(buf), bytes)?;
        Ok(Box::new(ThreadsPending {
            shared: Arc::clone(&self.shared),
            ticket,
            rank: self.rank,
            len,
            timeout: self.timeout,
        }))
    }

    fn reduce_scatter_sum(&self, input: &[f32], shard: &mut [f32]) -> Result<()> {
        let kind = CollectiveKind::ReduceScatter;
        check_sharded(kind, self.shared.n, shard.len(), input.len(), "input")?;
        let t = self.deposit(
            Contribution::ReduceScatter(input.to_vec()),
            size_of_val(input),
        )?;
        let n = shard.len();
        match &*self.wait(t)? {
            Combined::F32(v) => shard.copy_from_slice(&v[self.rank * n..(self.rank + 1) * n]),
            _ => return Err(unexpected(kind)),
        }
        Ok(())
    }

    fn all_gather(&self, shard: &[f32], out: &mut [f32]) -> Result<()> {
        let kind = CollectiveKind::AllGather;
        check_sharded(kind, self.shared.n, shard.len(), out.len(), "output")?;
        let t = self.deposit(Contribution::AllGather(shard.to_vec()), size_of_val(out))?;
        match &*self.wait(t)? {
            Combined::F32(v) => out.copy_from_slice(v),
            _ => return Err(unexpected(kind)),
        }
        Ok(())
    }

    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        let kind = CollectiveKind::BroadcastBytes;
        check_root(kind, root, self.shared.n)?;
        let data = (self.rank == root).then(|| buf.clone());
        let t = self.deposit(Contribution::Broadcast { root, data }, buf.len())?;
        match &*self.wait(t)? {
            Combined::Bytes(v) => {
                if self.rank != root {
                    buf.clone_from(v);
                }
            }
            _ => return Err(unexpected(kind)),
        }
        Ok(())
    }

    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        let kind = CollectiveKind::AllGatherBytes;
        let t = self.deposit(Contribution::GatherBytes(mine.to_vec()), mine.len())?;
        match &*self.wait(t)? {
            Combined::BytesList(v) => Ok(v.clone()),
            _ => Err(unexpected(kind)),
        }
    }

    fn barrier(&self) -> Result<()> {
        let t = self.deposit(Contribution::Barrier, 0)?;
        self.wait(t).map(|_| ())
    }

    fn stats(&self) -> CommStats {
        self.counters.snapshot()
    }

    fn abort(&self, code: i32) -> ! {
        // The job is this process.
        std::process::exit(code)
    }
}
