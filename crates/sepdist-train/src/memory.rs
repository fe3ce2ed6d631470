//! Memory accounting: heap bytes from a counting global allocator (current and peak, peaks
//! per phase) and the process's resident set from `/proc`. The allocator itself is installed
//! by the binary (`#[global_allocator]`); the engine reads it through [`HeapCounter`] so that
//! library tests run without one. On a CUDA device the same counter interface reads the GPU's
//! memory pool instead (`crate::device::memory_counter`: allocated = pool used, reserved =
//! pool reserved), so the phases, the progress line and the metrics show device memory.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

/// Read access to a counting allocator.
pub trait HeapCounter: Send + Sync {
    fn current(&self) -> usize;
    fn peak(&self) -> usize;
    /// Lowers the peak to the current value, to measure the peak of the next phase.
    fn reset_peak(&self);
    /// Bytes held from the system now and their high-water mark (the process's resident set;
    /// a GPU pool's reserved bytes).
    fn reserved(&self) -> (usize, usize) {
        rss()
    }
    /// What is counted, for reports.
    fn describe(&self) -> String {
        "this rank's heap by the counting allocator".into()
    }
}

/// The binary's allocator (a `static`) as a shared counter.
struct Static(&'static dyn HeapCounter);

impl HeapCounter for Static {
    fn current(&self) -> usize {
        self.0.current()
    }
    fn peak(&self) -> usize {
        self.0.peak()
    }
    fn reset_peak(&self) {
        self.0.reset_peak()
    }
    fn reserved(&self) -> (usize, usize) {
        self.0.reserved()
    }
    fn describe(&self) -> String {
        self.0.describe()
    }
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

/// Heap peaks per phase since the start of training, the same for the current optimizer step,
/// and the activation levels of the engine's micro-batches.
///
/// Phases nest: [`MemoryMeter::phase`] runs a closure as a phase and returns to the enclosing
/// one; the engine's probe ([`MemoryMeter::probe`]) switches between forward and backward
/// inside the trainer's compute phase. Each switch folds the allocator's peak since the
/// previous switch into the phase that was running, then lowers the allocator's peak to the
/// current value.
pub struct MemoryMeter {
    heap: std::sync::Arc<dyn HeapCounter>,
    /// Phases reset the allocator's peak; the lifetime peak is kept here.
    lifetime_peak: AtomicUsize,
    state: Mutex<MeterState>,
}

#[derive(Debug, Default)]
struct MeterState {
    current: Option<Phase>,
    phase_peaks: BTreeMap<Phase, usize>,
    step: StepMemory,
    /// Heap at the current micro-batch's `ForwardStart`.
    forward_start: usize,
    /// Between a `ForwardStart` and the end of its micro-batch.
    in_micro: bool,
    /// Highest heap since that `ForwardStart` (forward and backward).
    micro_peak: usize,
    /// The figures of the first two steps taken.
    first: Vec<StepMemory>,
    /// Heap when the running phase began.
    phase_start: usize,
    /// Heap bytes a rank may use (`training.memory_budget`), checked at step boundaries.
    budget: Option<usize>,
    /// Block whose forward or backward is running (set by the engine's block events).
    block: Option<usize>,
    /// Micro-batches started since the window opened.
    micro: usize,
    window: Window,
    /// The engine's last event in the running phase: where an error raised now comes from.
    last_event: Option<crate::engine::EngineEvent>,
}

/// Where in a training step the heap was measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub phase: Phase,
    /// Engine block index (`Separator::blocks`), inside the forward or backward.
    pub block: Option<usize>,
    /// 1-based micro-batch of the optimizer step, inside the forward or backward.
    pub micro: Option<usize>,
}

impl Location {
    /// `backward of layers.0.band (micro-batch 1 of 2)`, `optimizer phase`; `names` are the
    /// engine's block names.
    pub fn describe(&self, names: &[String], accumulation: usize) -> String {
        let mut text = self.phase.name().to_string();
        match self.block.and_then(|b| names.get(b)) {
            Some(name) => text = format!("{text} of {name}"),
            None => text.push_str(" phase"),
        }
        if let Some(m) = self.micro {
            text = format!("{text} (micro-batch {m} of {accumulation})");
        }
        text
    }
}

/// The heap of one training step as the budget check sees it: the highest heap in the step's
/// phases (data, forward, backward, communication, optimizer; not validation or checkpoint
/// writing, which the plan does not predict) since the previous step's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Window {
    pub peak: usize,
    pub peak_at: Option<Location>,
    /// Where the heap first went over the budget.
    pub first_over: Option<Location>,
    pub budget: Option<usize>,
}

impl Window {
    pub fn over_budget(&self) -> bool {
        self.budget.is_some_and(|b| self.peak > b)
    }
}

/// Memory figures of one optimizer step (heap bytes), written to `metrics.jsonl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct StepMemory {
    /// Highest heap during the forward of any micro-batch (context, blocks, head, loss).
    pub mem_peak_forward: usize,
    /// Highest heap during the backward (including gradient buckets started meanwhile).
    pub mem_peak_backward: usize,
    /// Highest heap while the gradients were reduced (bucket waits, ZeRO-2 reduce-scatter).
    pub mem_peak_communication: usize,
    /// Highest heap in the optimizer phase (AdamW, ZeRO's parameter all-gather).
    pub mem_peak_optimizer: usize,
    /// Heap when the first micro-batch's forward started: parameters, gradients, optimizer
    /// state, the batch and everything else that outlives a micro-batch.
    pub mem_step_start: usize,
    /// Activations kept for the backward: heap when the loss is computed minus heap at the
    /// forward's start (largest over the micro-batches).
    pub mem_activations_kept: usize,
    /// Peak activation memory: the micro-batch's highest heap (forward or backward) minus
    /// heap at its forward's start (largest over the micro-batches).
    pub mem_activations_peak: usize,
    /// Communication buffers: the largest of what a micro-batch left allocated above its
    /// start (gradient buckets in flight) and the rises of the communication and optimizer
    /// phases above their start (reduce-scatter, all-gather, copies).
    pub mem_communication_buffers: usize,
}

impl MeterState {
    fn fold(&mut self, peak: usize) {
        let Some(p) = self.current else {
            return;
        };
        if !matches!(p, Phase::Validation | Phase::Checkpoint) {
            let engine = matches!(p, Phase::Forward | Phase::Backward);
            let at = Location {
                phase: p,
                block: self.block,
                micro: (engine && self.micro > 0).then_some(self.micro),
            };
            if peak > self.window.peak {
                self.window.peak = peak;
                self.window.peak_at = Some(at);
            }
            if self.budget.is_some_and(|b| peak > b) && self.window.first_over.is_none() {
                self.window.first_over = Some(at);
            }
        }
        if matches!(p, Phase::Communication | Phase::Optimizer) {
            let rise = peak.saturating_sub(self.phase_start);
            let c = &mut self.step.mem_communication_buffers;
            *c = (*c).max(rise);
        }
        let entry = self.phase_peaks.entry(p).or_insert(0);
        *entry = (*entry).max(peak);
        let step = match p {
            Phase::Forward => Some(&mut self.step.mem_peak_forward),
            Phase::Backward => Some(&mut self.step.mem_peak_backward),
            Phase::Communication => Some(&mut self.step.mem_peak_communication),
            Phase::Optimizer => Some(&mut self.step.mem_peak_optimizer),
            _ => None,
        };
        if let Some(v) = step {
            *v = (*v).max(peak);
        }
        if self.in_micro && matches!(p, Phase::Forward | Phase::Backward) {
            self.micro_peak = self.micro_peak.max(peak);
            let above = self.micro_peak.saturating_sub(self.forward_start);
            self.step.mem_activations_peak = self.step.mem_activations_peak.max(above);
        }
    }
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
    /// Heap bytes allocated now (the counting allocator; CUDA: the pool's used bytes).
    pub allocated: usize,
    /// Heap high-water mark since start.
    pub peak_allocated: usize,
    /// Resident set now ("reserved": what the process holds from the OS; CUDA: what the
    /// pool holds from the driver).
    pub reserved: usize,
    pub peak_reserved: usize,
}

impl MemoryMeter {
    pub fn new(heap: &'static dyn HeapCounter) -> Self {
        Self::with_counter(std::sync::Arc::new(Static(heap)))
    }

    /// A meter over any counter (a GPU's memory pool).
    pub fn with_counter(heap: std::sync::Arc<dyn HeapCounter>) -> Self {
        Self {
            lifetime_peak: AtomicUsize::new(heap.peak()),
            heap,
            state: Mutex::new(MeterState::default()),
        }
    }

    /// What the meter counts (the heap, or a GPU's pool), for reports.
    pub fn describe(&self) -> String {
        self.heap.describe()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, MeterState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Folds the peak since the last switch into the running phase and makes `next` run.
    fn switch(&self, state: &mut MeterState, next: Option<Phase>) {
        let peak = self.heap.peak();
        self.lifetime_peak.fetch_max(peak, Ordering::Relaxed);
        state.fold(peak);
        self.heap.reset_peak();
        let now = self.heap.current();
        let engine_phase = |p: Option<Phase>| matches!(p, Some(Phase::Forward | Phase::Backward));
        if state.current == Some(Phase::Backward) && !engine_phase(next) {
            // The micro-batch is over: what it left above its start are buffers in flight.
            if state.in_micro {
                let c = &mut state.step.mem_communication_buffers;
                *c = (*c).max(now.saturating_sub(state.forward_start));
            }
            state.in_micro = false;
        }
        state.current = next;
        state.phase_start = now;
    }

    /// Runs `f` as `phase`, recording the heap peak reached inside it; the enclosing phase
    /// resumes afterwards.
    pub fn phase<T>(&self, phase: Phase, f: impl FnOnce() -> T) -> T {
        let previous = {
            let mut st = self.state();
            let previous = st.current;
            self.switch(&mut st, Some(phase));
            st.block = None;
            st.last_event = None;
            previous
        };
        let out = f();
        let mut st = self.state();
        self.switch(&mut st, previous);
        st.block = None;
        st.last_event = None;
        out
    }

    /// The engine's events switch between the forward and backward phases and record the
    /// activation levels.
    pub fn engine_event(&self, event: crate::engine::EngineEvent) {
        use crate::engine::EngineEvent;
        let mut st = self.state();
        st.last_event = Some(event);
        match event {
            EngineEvent::ForwardStart => {
                self.switch(&mut st, Some(Phase::Forward));
                st.micro += 1;
                let now = self.heap.current();
                st.forward_start = now;
                st.micro_peak = now;
                st.in_micro = true;
                if st.step.mem_step_start == 0 {
                    st.step.mem_step_start = now;
                }
            }
            EngineEvent::BackwardStart => {
                let kept = self.heap.current().saturating_sub(st.forward_start);
                st.step.mem_activations_kept = st.step.mem_activations_kept.max(kept);
                self.switch(&mut st, Some(Phase::Backward));
            }
            EngineEvent::BlockForward(i) | EngineEvent::BlockBackward(i) => {
                // The peak since the previous event was reached in block `i`: fold it there,
                // so that an over-budget step says which block (a fold and an atomic reset).
                st.block = Some(i);
                let running = st.current;
                self.switch(&mut st, running);
            }
        }
    }

    /// Where the running code is now (`None` outside every phase), for an error raised there:
    /// the phase and, inside the engine, the block whose forward or backward was running (the
    /// one after the block last reported done; none between a micro-batch's start and its
    /// first block, where the mixture's STFT runs) and the micro-batch.
    pub fn location(&self) -> Option<Location> {
        use crate::engine::EngineEvent;
        let st = self.state();
        let phase = st.current?;
        if !matches!(phase, Phase::Forward | Phase::Backward) {
            return Some(Location {
                phase,
                block: None,
                micro: None,
            });
        }
        let block = match st.last_event {
            Some(EngineEvent::BlockForward(i)) => Some(i + 1),
            // The head: `BlockForward(last)` came just before.
            Some(EngineEvent::BackwardStart) => st.block,
            Some(EngineEvent::BlockBackward(i)) => i.checked_sub(1),
            Some(EngineEvent::ForwardStart) | None => None,
        };
        Some(Location {
            phase,
            block,
            micro: (st.micro > 0).then_some(st.micro),
        })
    }

    /// Sets the heap budget the step windows are checked against (`None`: no check).
    pub fn set_budget(&self, budget: Option<usize>) {
        let mut st = self.state();
        st.budget = budget;
        st.window.budget = budget;
    }

    /// The window since the previous call (the step's decision point), and a new one opened.
    pub fn close_window(&self) -> Window {
        let mut st = self.state();
        let running = st.current;
        self.switch(&mut st, running);
        let budget = st.budget;
        st.micro = 0;
        std::mem::replace(
            &mut st.window,
            Window {
                budget,
                ..Window::default()
            },
        )
    }

    /// This step's figures, dropped without counting as a step taken (a step discarded for
    /// going over the memory budget).
    pub fn discard_step(&self) -> StepMemory {
        std::mem::take(&mut self.state().step)
    }

    /// A probe for [`crate::engine::Engine::set_probe`] that reports to this meter.
    pub fn probe(self: &std::sync::Arc<Self>) -> crate::engine::EngineProbe {
        let meter = std::sync::Arc::clone(self);
        std::sync::Arc::new(move |event| meter.engine_event(event))
    }

    /// This step's figures; starts the next step's.
    pub fn take_step(&self) -> StepMemory {
        let mut st = self.state();
        let step = std::mem::take(&mut st.step);
        if st.first.len() < 2 {
            st.first.push(step);
        }
        step
    }

    /// The step the memory report describes, as (0-based index, figures): the second step,
    /// where gemm's packing slabs exist before the forward starts (the first step allocates
    /// them inside its forward), or the first if there was only one (the current step's
    /// figures before any step was taken).
    pub fn reported_step(&self) -> (usize, StepMemory) {
        let st = self.state();
        match st.first.as_slice() {
            [] => (0, st.step),
            [one] => (0, *one),
            [_, two, ..] => (1, *two),
        }
    }

    pub fn snapshot(&self) -> MemorySnapshot {
        let (reserved, peak_reserved) = self.heap.reserved();
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
        let mut st = self.state();
        // Include the phase running now.
        let peak = self.heap.peak();
        st.fold(peak);
        st.phase_peaks.iter().map(|(k, v)| (k.name(), *v)).collect()
    }
}

/// Bytes of the trainer's buffers of known size on this rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KnownBuffers {
    /// Parameters as `Var`s plus the flat master copy.
    pub parameters: usize,
    /// Flat gradient (and ZeRO-2's shard scratch).
    pub gradients: usize,
    /// AdamW moments (and the EMA weights).
    pub optimizer: usize,
    /// Batches: the one in use (vectors and tensors) and the loader's prefetched ones.
    pub data: usize,
}

/// `sepdist train --memory-report`: the measured breakdown of this rank's heap next to the
/// plan's prediction. `known` describes the step of [`MemoryMeter::reported_step`].
pub fn report(
    meter: &MemoryMeter,
    known: &KnownBuffers,
    predicted: Option<&crate::plan::Prediction>,
) -> String {
    let (index, f) = meter.reported_step();
    let title = format!(
        "memory report ({}, figures of optimizer step {}; 1 GB = 10^9 bytes)",
        meter.describe(),
        index + 1
    );
    report_step(meter, &title, &f, known, predicted)
}

/// The measured breakdown of step figures `f` next to the plan's prediction, under `title`.
pub fn report_step(
    meter: &MemoryMeter,
    title: &str,
    f: &StepMemory,
    known: &KnownBuffers,
    predicted: Option<&crate::plan::Prediction>,
) -> String {
    use crate::plan::format_bytes;
    use std::fmt::Write as _;
    let snap = meter.snapshot();
    let peaks = meter.phase_peaks();
    let persistent = known.parameters + known.gradients + known.optimizer + known.data;
    let other = f.mem_step_start.saturating_sub(persistent);
    let transient = f
        .mem_activations_peak
        .saturating_sub(f.mem_activations_kept);
    let p = predicted;
    let rows: Vec<(&str, usize, Option<u64>, &str)> = vec![
        (
            "parameters",
            known.parameters,
            p.map(|p| p.parameters),
            "Vars + flat fp32 master copy",
        ),
        (
            "gradients",
            known.gradients,
            p.map(|p| p.gradients),
            "flat fp32 gradient",
        ),
        (
            "optimizer state",
            known.optimizer,
            p.map(|p| p.optimizer),
            "AdamW m and v (and EMA)",
        ),
        (
            "data buffers",
            known.data,
            p.map(|p| p.data),
            "batch + prefetch",
        ),
        (
            "other",
            other,
            p.map(|p| p.runtime),
            "measured: the rest at the forward's start; predicted: gemm slabs (CPU), the loss's DFT bases (GPU)",
        ),
        (
            "  = heap at step start",
            f.mem_step_start,
            p.map(|p| p.persistent() + p.data),
            "",
        ),
        (
            "activations kept",
            f.mem_activations_kept,
            p.map(|p| p.activations),
            "at the backward's start",
        ),
        (
            "transient working set",
            transient,
            p.map(|p| p.transient),
            "forward/backward peak above the kept activations",
        ),
        (
            "communication buffers",
            f.mem_communication_buffers,
            p.map(|p| p.communication.max(p.optimizer_buffers)),
            "buckets in flight, reduce-scatter, all-gather, optimizer copies",
        ),
        (
            "peak allocated",
            snap.peak_allocated,
            p.map(|p| p.peak),
            "lifetime high-water mark",
        ),
    ];
    let mut out = format!("{title}\n");
    let _ = writeln!(
        out,
        "  {:<24} {:>12} {:>12} {:>8}",
        "", "measured", "predicted", "error"
    );
    for (name, m, pr, note) in rows {
        let (pred, err) = match pr {
            Some(v) if v > 0 => (
                format_bytes(v),
                format!("{:+.1}%", (m as f64 - v as f64) / v as f64 * 100.0),
            ),
            Some(v) => (format_bytes(v), String::new()),
            None => ("-".into(), String::new()),
        };
        let _ = writeln!(
            out,
            "  {:<24} {:>12} {:>12} {:>8}  {}",
            name,
            format_bytes(m as u64),
            pred,
            err,
            note
        );
    }
    let phase = |name: &str| peaks.get(name).copied().unwrap_or(0) as u64;
    let _ = write!(out, "  phase peaks (measured / predicted):");
    for (name, pred) in [
        ("forward", p.map(|p| p.forward_peak)),
        ("backward", p.map(|p| p.backward_peak)),
        ("communication", p.map(|p| p.communication_peak)),
        ("optimizer", p.map(|p| p.optimizer_peak)),
    ] {
        let _ = write!(
            out,
            " {name} {} / {};",
            format_bytes(phase(name)),
            pred.map_or("-".into(), format_bytes)
        );
    }
    out.push('\n');
    if let Some(p) = p {
        let _ = writeln!(
            out,
            "  predicted peak in the {} phase ({})",
            p.peak_phase, p.peak_at
        );
    }
    out
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
    fn engine_events_split_forward_and_backward_and_measure_the_activations() {
        use crate::engine::EngineEvent;
        let heap: &'static Scripted = Box::leak(Box::default());
        let meter = std::sync::Arc::new(MemoryMeter::new(heap));
        let probe = meter.probe();
        heap.set(1000); // parameters, gradients, optimizer state, batch
        meter.phase(Phase::Backward, || {
            probe(EngineEvent::ForwardStart);
            heap.set(1500);
            heap.set(1400);
            probe(EngineEvent::BackwardStart); // 400 kept
            heap.set(1900);
            heap.set(1050); // 50 left: a gradient bucket in flight
        });
        meter.phase(Phase::Communication, || {
            heap.set(1200);
            heap.set(1000);
        });
        meter.phase(Phase::Optimizer, || heap.set(1100));
        let step = meter.take_step();
        assert_eq!(step.mem_peak_forward, 1500);
        assert_eq!(step.mem_peak_backward, 1900);
        assert_eq!(step.mem_peak_communication, 1200);
        assert_eq!(step.mem_step_start, 1000);
        assert_eq!(step.mem_activations_kept, 400);
        assert_eq!(step.mem_activations_peak, 900);
        // Rises: 50 in flight, 150 in the communication phase, 50 in the optimizer's.
        assert_eq!(step.mem_communication_buffers, 150);
        assert_eq!(meter.reported_step(), (0, step));
        assert_eq!(
            meter.take_step(),
            StepMemory::default(),
            "a new step starts empty"
        );
    }

    #[test]
    fn the_budget_window_names_the_block_over_it_and_skips_validation() {
        use crate::engine::EngineEvent;
        let heap: &'static Scripted = Box::leak(Box::default());
        let meter = std::sync::Arc::new(MemoryMeter::new(heap));
        meter.set_budget(Some(1500));
        let probe = meter.probe();
        heap.set(1000);
        // Validation above the budget does not count: the plan does not predict it.
        meter.phase(Phase::Validation, || heap.set(5000));
        heap.set(1000);
        meter.phase(Phase::Backward, || {
            for micro in 0..2 {
                probe(EngineEvent::ForwardStart);
                heap.set(1200);
                probe(EngineEvent::BlockForward(0));
                heap.set(1400 + 200 * micro); // second micro-batch: 1600 in block 1
                probe(EngineEvent::BlockForward(1));
                probe(EngineEvent::BackwardStart);
                heap.set(1550 + 300 * micro); // then 1850 in block 1's backward
                probe(EngineEvent::BlockBackward(1));
                heap.set(1100);
                probe(EngineEvent::BlockBackward(0));
                heap.set(1000);
            }
        });
        let window = meter.close_window();
        assert!(window.over_budget());
        assert_eq!(window.peak, 1850);
        let names = ["band_split".to_string(), "head".to_string()];
        let first = window.first_over.expect("went over");
        assert_eq!(
            first.describe(&names, 2),
            "backward of head (micro-batch 1 of 2)"
        );
        assert_eq!(
            window.peak_at.map(|l| l.describe(&names, 2)).as_deref(),
            Some("backward of head (micro-batch 2 of 2)")
        );
        // A new window starts empty with the same budget; figures of a discarded step are
        // not a step taken.
        let next = meter.close_window();
        assert_eq!(
            (next.peak, next.budget, next.first_over),
            (0, Some(1500), None)
        );
        assert!(meter.discard_step().mem_peak_backward >= 1850);
        assert_eq!(meter.reported_step().0, 0);
        assert_eq!(meter.take_step(), StepMemory::default());
    }

    #[test]
    fn the_location_is_the_block_running_after_the_engine_s_last_event() {
        use crate::engine::EngineEvent;
        let heap: &'static Scripted = Box::leak(Box::default());
        let meter = std::sync::Arc::new(MemoryMeter::new(heap));
        let probe = meter.probe();
        let at = |phase, block, micro| {
            Some(Location {
                phase,
                block,
                micro,
            })
        };
        assert_eq!(meter.location(), None);
        meter.phase(Phase::Backward, || {
            assert_eq!(meter.location(), at(Phase::Backward, None, None));
            // Two blocks: block 1 is the head.
            probe(EngineEvent::ForwardStart);
            assert_eq!(meter.location(), at(Phase::Forward, None, Some(1)));
            probe(EngineEvent::BlockForward(0));
            assert_eq!(meter.location(), at(Phase::Forward, Some(1), Some(1)));
            probe(EngineEvent::BlockForward(1));
            probe(EngineEvent::BackwardStart);
            assert_eq!(meter.location(), at(Phase::Backward, Some(1), Some(1)));
            probe(EngineEvent::BlockBackward(1));
            assert_eq!(meter.location(), at(Phase::Backward, Some(0), Some(1)));
            probe(EngineEvent::BlockBackward(0));
            assert_eq!(meter.location(), at(Phase::Backward, None, Some(1)));
            probe(EngineEvent::ForwardStart);
            assert_eq!(meter.location(), at(Phase::Forward, None, Some(2)));
        });
        meter.phase(Phase::Optimizer, || {
            assert_eq!(meter.location(), at(Phase::Optimizer, None, None));
        });
    }

    #[test]
    fn rss_is_read_from_proc() {
        let (now, peak) = rss();
        if std::path::Path::new("/proc/self/status").exists() {
            assert!(now > 0 && peak >= now, "{now} {peak}");
        }
    }
}
