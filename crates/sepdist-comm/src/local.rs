//! World size 1: no communication at all.

use std::time::Duration;

use crate::stats::{CollectiveKind, CommStats, Counters};
use crate::topology::{Launcher, Topology};
use crate::{Communicator, PendingReduce, Result, check_len, check_root, check_sharded};

/// The single-process communicator: every collective is a copy or a no-op. It still validates
/// lengths and counts calls, so code paths tested on it behave as with more ranks.
#[derive(Debug)]
pub struct Local {
    timeout: Duration,
    counters: Counters,
}

impl Local {
    /// A world of one rank. `timeout` is only reported (nothing here can wait).
    pub fn new(timeout: Duration) -> Self {
        Local {
            timeout,
            counters: Counters::default(),
        }
    }
}

impl Default for Local {
    fn default() -> Self {
        Local::new(crate::DEFAULT_TIMEOUT)
    }
}

/// An already-finished reduction (a world of one sums to itself).
struct Ready(Vec<f32>);

impl PendingReduce for Ready {
    fn poll(&mut self) -> Result<bool> {
        Ok(true)
    }
    fn wait(self: Box<Self>) -> Result<Vec<f32>> {
        Ok(self.0)
    }
    fn len(&self) -> usize {
        self.0.len()
    }
}

impl Communicator for Local {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn topology(&self) -> Topology {
        Topology {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            launcher: Launcher::None,
        }
    }
    fn backend_name(&self) -> &'static str {
        "local"
    }
    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        self.counters
            .record(CollectiveKind::AllReduceF32, size_of_val(buf));
        Ok(())
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.counters
            .record(CollectiveKind::AllReduceF64, size_of_val(buf));
        Ok(())
    }

    fn start_all_reduce_sum(&self, buf: Vec<f32>) -> Result<Box<dyn PendingReduce>> {
        self.counters
            .record(CollectiveKind::AllReduceF32, size_of_val(buf.as_slice()));
        Ok(Box::new(Ready(buf)))
    }

    fn reduce_scatter_sum(&self, input: &[f32], shard: &mut [f32]) -> Result<()> {
        let kind = CollectiveKind::ReduceScatter;
        check_sharded(kind, 1, shard.len(), input.len(), "input")?;
        self.counters.record(kind, size_of_val(input));
        shard.copy_from_slice(input);
        Ok(())
    }

    fn all_gather(&self, shard: &[f32], out: &mut [f32]) -> Result<()> {
        let kind = CollectiveKind::AllGather;
        check_len(kind, "output", shard.len(), out.len())?;
        self.counters.record(kind, size_of_val(out));
        out.copy_from_slice(shard);
        Ok(())
    }

    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        let kind = CollectiveKind::BroadcastBytes;
        check_root(kind, root, 1)?;
        self.counters.record(kind, buf.len());
        Ok(())
    }

    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.counters
            .record(CollectiveKind::AllGatherBytes, mine.len());
        Ok(vec![mine.to_vec()])
    }

    fn barrier(&self) -> Result<()> {
        self.counters.record(CollectiveKind::Barrier, 0);
        Ok(())
    }

    fn stats(&self) -> CommStats {
        self.counters.snapshot()
    }

    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}
