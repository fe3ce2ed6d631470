//! Instrumentation: how many collectives of each kind a communicator issued, and their size.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// The collectives of [`Communicator`](crate::Communicator), as counted and reported in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CollectiveKind {
    /// `all_reduce_sum` and `start_all_reduce_sum` (fp32).
    AllReduceF32,
    /// `all_reduce_sum_f64` (scalars: norms, flags).
    AllReduceF64,
    /// `reduce_scatter_sum`.
    ReduceScatter,
    /// `all_gather`.
    AllGather,
    /// `broadcast_bytes`.
    BroadcastBytes,
    /// `all_gather_bytes`.
    AllGatherBytes,
    /// `barrier`.
    Barrier,
}

impl CollectiveKind {
    /// Every kind, in counter order.
    pub const ALL: [CollectiveKind; 7] = [
        CollectiveKind::AllReduceF32,
        CollectiveKind::AllReduceF64,
        CollectiveKind::ReduceScatter,
        CollectiveKind::AllGather,
        CollectiveKind::BroadcastBytes,
        CollectiveKind::AllGatherBytes,
        CollectiveKind::Barrier,
    ];

    /// Stable lower-case name (`all_reduce_f32`, ...), as in logs.
    pub fn name(self) -> &'static str {
        match self {
            CollectiveKind::AllReduceF32 => "all_reduce_f32",
            CollectiveKind::AllReduceF64 => "all_reduce_f64",
            CollectiveKind::ReduceScatter => "reduce_scatter",
            CollectiveKind::AllGather => "all_gather",
            CollectiveKind::BroadcastBytes => "broadcast_bytes",
            CollectiveKind::AllGatherBytes => "all_gather_bytes",
            CollectiveKind::Barrier => "barrier",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for CollectiveKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Count and total logical size of one kind of collective.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpStats {
    /// Collectives issued (started, for the non-blocking all-reduce), successful or not.
    pub calls: u64,
    /// Sum of their logical message sizes in bytes (the full vector: the all-reduced buffer, the
    /// reduce-scatter input, the all-gather output, the broadcast payload; not the wire traffic).
    pub bytes: u64,
}

/// A snapshot of a communicator's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommStats {
    ops: [OpStats; 7],
}

impl CommStats {
    /// Counters of one kind.
    pub fn get(&self, kind: CollectiveKind) -> OpStats {
        self.ops[kind.index()]
    }

    /// Collectives of all kinds.
    pub fn total_calls(&self) -> u64 {
        self.ops.iter().map(|o| o.calls).sum()
    }

    /// Bytes of all kinds.
    pub fn total_bytes(&self) -> u64 {
        self.ops.iter().map(|o| o.bytes).sum()
    }

    /// Counters accumulated since `earlier` (for per-step assertions).
    pub fn since(&self, earlier: &CommStats) -> CommStats {
        let mut out = CommStats::default();
        for (i, o) in out.ops.iter_mut().enumerate() {
            o.calls = self.ops[i].calls.saturating_sub(earlier.ops[i].calls);
            o.bytes = self.ops[i].bytes.saturating_sub(earlier.ops[i].bytes);
        }
        out
    }
}

/// Lock-free counters owned by a backend (one per communicator).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    calls: [AtomicU64; 7],
    bytes: [AtomicU64; 7],
}

impl Counters {
    pub(crate) fn record(&self, kind: CollectiveKind, bytes: usize) {
        let i = kind.index();
        self.calls[i].fetch_add(1, Ordering::Relaxed);
        self.bytes[i].fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> CommStats {
        let mut s = CommStats::default();
        for (i, o) in s.ops.iter_mut().enumerate() {
            o.calls = self.calls[i].load(Ordering::Relaxed);
            o.bytes = self.bytes[i].load(Ordering::Relaxed);
        }
        s
    }
}
