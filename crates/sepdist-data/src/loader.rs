//! Background loading: worker threads compute the micro-batches of one rank ahead of the
//! training loop and hand them over in order.
//!
//! Batch `k` of a loader started at step `s0` is `(step, micro) = (s0 + k / a, k % a)`, so a
//! resumed run only needs its step counter. At most `prefetch` batches are in flight or waiting
//! at any time (memory stays bounded). A worker's error (or panic) is delivered as the `Err` of
//! the batch it was computing. Dropping the loader stops the workers and joins them (after the
//! batch each one is computing, if any).

use crate::error::{DataError, Result};
use crate::sampler::{Batch, Sampler, Schedule};
use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

struct State {
    next_job: u64,
    consumed: u64,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Iterator over `Result<Batch>` for one rank, from `start_step` on.
pub struct Loader {
    shared: Arc<Shared>,
    rx: Receiver<(u64, Result<Batch>)>,
    ready: BTreeMap<u64, Result<Batch>>,
    next: u64,
    total: Option<u64>,
    workers: Vec<JoinHandle<()>>,
}

impl Loader {
    /// Starts `num_workers` threads (at least 1) delivering the batches of `rank` for steps
    /// `start_step..end_step` (`None`: without end), every micro-step of each step in order.
    pub fn new(
        sampler: Arc<Sampler>,
        schedule: Schedule,
        rank: usize,
        start_step: u64,
        end_step: Option<u64>,
        num_workers: usize,
        prefetch: usize,
    ) -> Result<Loader> {
        // Validates `rank` before any thread starts.
        schedule.indices(start_step, rank, 0)?;
        let a = schedule.accumulation as u64;
        let total = end_step.map(|e| e.saturating_sub(start_step) * a);
        let window = prefetch.max(1) as u64;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                next_job: 0,
                consumed: 0,
                stop: false,
            }),
            wake: Condvar::new(),
        });
        let (tx, rx) = channel();
        let mut workers = Vec::new();
        for w in 0..num_workers.max(1) {
            let ctx = Worker {
                sampler: Arc::clone(&sampler),
                schedule,
                rank,
                start_step,
                total,
                window,
                shared: Arc::clone(&shared),
                tx: tx.clone(),
            };
            let handle = std::thread::Builder::new()
                .name(format!("sepdist-data-{w}"))
                .spawn(move || ctx.run())
                .map_err(|e| DataError::Argument(format!("cannot start loader thread: {e}")))?;
            workers.push(handle);
        }
        Ok(Loader {
            shared,
            rx,
            ready: BTreeMap::new(),
            next: 0,
            total,
            workers,
        })
    }
}

struct Worker {
    sampler: Arc<Sampler>,
    schedule: Schedule,
    rank: usize,
    start_step: u64,
    total: Option<u64>,
    window: u64,
    shared: Arc<Shared>,
    tx: Sender<(u64, Result<Batch>)>,
}

impl Worker {
    fn run(self) {
        let a = self.schedule.accumulation as u64;
        loop {
            let job = {
                let mut st = self.shared.lock();
                loop {
                    if st.stop || self.total.is_some_and(|t| st.next_job >= t) {
                        return;
                    }
                    if st.next_job < st.consumed + self.window {
                        break;
                    }
                    st = self
                        .shared
                        .wake
                        .wait(st)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                st.next_job += 1;
                st.next_job - 1
            };
            let (step, micro) = (self.start_step + job / a, (job % a) as usize);
            let result = catch_unwind(AssertUnwindSafe(|| {
                self.sampler.batch(&self.schedule, step, self.rank, micro)
            }))
            .unwrap_or_else(|p| {
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Err(DataError::WorkerPanic(format!(
                    "step {step}, micro-step {micro}: {msg}"
                )))
            });
            if self.tx.send((job, result)).is_err() {
                return;
            }
        }
    }
}

impl Iterator for Loader {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.total.is_some_and(|t| self.next >= t) {
            return None;
        }
        let item = loop {
            if let Some(item) = self.ready.remove(&self.next) {
                break item;
            }
            match self.rx.recv() {
                Ok((job, item)) => {
                    self.ready.insert(job, item);
                }
                Err(_) => {
                    // Every worker is gone without producing this batch: end after reporting.
                    self.total = Some(self.next);
                    return Some(Err(DataError::WorkerPanic(
                        "all loader workers exited".into(),
                    )));
                }
            }
        };
        self.next += 1;
        self.shared.lock().consumed = self.next;
        self.shared.wake.notify_all();
        Some(item)
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_all();
        for w in self.workers.drain(..) {
            // A worker never panics outside `catch_unwind`; nothing useful to do if it did.
            let _ = w.join();
        }
    }
}
