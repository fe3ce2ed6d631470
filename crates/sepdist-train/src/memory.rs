//! CPU memory accounting: heap bytes from a counting global allocator (current and peak,
//! peaks per phase) and the process's resident set from `/proc`. The allocator itself is
//! installed by the binary (`#[global_allocator]`); the engine reads it through
//! [`HeapCounter`] so that library tests run without one.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

/// Read access to a counting allocator.
pub trait HeapCounter: Send + Sync {
    fn current(&self) -> usize;
    fn peak(&self) -> usize;
    /// Lowers the peak to the current value, to measure the peak of the next phase.
    fn reset_peak(&self);
}

impl HeapCounter for peak_alloc::PeakAlloc {
    fn current(&self) -> usize {
        self.current_usage()
    }
    fn peak(&self) -> usize {
        self.peak_usage()
    }
    fn reset_peak(&self) {
        self.reset_peak_usage()
    }
}

/// No counting allocator installed: heap figures read as zero.
#[derive(Debug, Default)]
pub struct NoHeapCounter;

impl HeapCounter for NoHeapCounter {
    fn current(&self) -> usize {
        0
    }
    fn peak(&self) -> usize {
        0
    }
    fn reset_peak(&self) {}
}

/// Resident set size and its high-water mark, bytes (Linux `/proc/self/status`; zero
/// elsewhere).
pub fn rss() -> (usize, usize) {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return (0, 0);
    };
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kb| kb.parse::<usize>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Phases whose peaks are reported separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Data,
    Forward,
    Backward,
    Communication,
    Optimizer,
    Validation,
    Checkpoint,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Data => "data",
            Phase::Forward => "forward",
            Phase::Backward => "backward",
            Phase::Communication => "communication",
            Phase::Optimizer => "optimizer",
            Phase::Validation => "validation",
            Phase::Checkpoint => "checkpoint",
        }
    }
}

/// Heap peaks per phase since the start of training.
pub struct MemoryMeter {
    heap: &'static dyn HeapCounter,
    /// Phases reset the allocator's peak; the lifetime peak is kept here.
    lifetime_peak: AtomicUsize,
    phase_peaks: Mutex<BTreeMap<Phase, usize>>,
}

impl std::fmt::Debug for MemoryMeter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryMeter")
            .field("current", &self.heap.current())
            .finish()
    }
}

/// What the progress line and the metrics show.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemorySnapshot {
    /// Heap bytes allocated now (the counting allocator).
    pub allocated: usize,
    /// Heap high-water mark since start.
    pub peak_allocated: usize,
    /// Resident set now ("reserved": what the process holds from the OS).
    pub reserved: usize,
    pub peak_reserved: usize,
}

impl MemoryMeter {
    pub fn new(heap: &'static dyn HeapCounter) -> Self {
        Self {
            heap,
            lifetime_peak: AtomicUsize::new(heap.peak()),
            phase_peaks: Mutex::new(BTreeMap::new()),
        }
    }

    /// Runs `f` as `phase`, recording the heap peak reached inside it.
    pub fn phase<T>(&self, phase: Phase, f: impl FnOnce() -> T) -> T {
        self.lifetime_peak
            .fetch_max(self.heap.peak(), Ordering::Relaxed);
        self.heap.reset_peak();
        let out = f();
        let inside = self.heap.peak();
        self.lifetime_peak.fetch_max(inside, Ordering::Relaxed);
        let mut peaks = self
            .phase_peaks
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let entry = peaks.entry(phase).or_insert(0);
        *entry = (*entry).max(inside);
        out
    }

    pub fn snapshot(&self) -> MemorySnapshot {
        let (reserved, peak_reserved) = rss();
        MemorySnapshot {
            allocated: self.heap.current(),
            peak_allocated: self
                .lifetime_peak
                .load(Ordering::Relaxed)
                .max(self.heap.peak()),
            reserved,
            peak_reserved,
        }
    }

    /// Peak heap bytes per phase so far, by phase name.
    pub fn phase_peaks(&self) -> BTreeMap<&'static str, usize> {
        self.phase_peaks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, v)| (k.name(), *v))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted counter: `current` set by the test, peak tracked like an allocator's.
    #[derive(Default)]
    struct Scripted {
        current: AtomicUsize,
        peak: AtomicUsize,
    }

    impl Scripted {
        fn set(&self, bytes: usize) {
            self.current.store(bytes, Ordering::Relaxed);
            self.peak.fetch_max(bytes, Ordering::Relaxed);
        }
    }

    impl HeapCounter for Scripted {
        fn current(&self) -> usize {
            self.current.load(Ordering::Relaxed)
        }
        fn peak(&self) -> usize {
            self.peak.load(Ordering::Relaxed)
        }
        fn reset_peak(&self) {
            self.peak.store(self.current(), Ordering::Relaxed);
        }
    }

    #[test]
    fn phase_peaks_are_separate_and_the_lifetime_peak_survives_resets() {
        let heap: &'static Scripted = Box::leak(Box::default());
        let meter = MemoryMeter::new(heap);
        heap.set(100);
        meter.phase(Phase::Forward, || {
            heap.set(900);
            heap.set(400);
        });
        meter.phase(Phase::Backward, || {
            heap.set(600);
            heap.set(100);
        });
        meter.phase(Phase::Forward, || heap.set(700));
        let peaks = meter.phase_peaks();
        assert_eq!(peaks["forward"], 900);
        assert_eq!(peaks["backward"], 600);
        let snap = meter.snapshot();
        assert_eq!(snap.allocated, 700);
        assert_eq!(snap.peak_allocated, 900);
    }

    #[test]
    fn rss_is_read_from_proc() {
        let (now, peak) = rss();
        if std::path::Path::new("/proc/self/status").exists() {
            assert!(now > 0 && peak >= now, "{now} {peak}");
        }
    }
}
