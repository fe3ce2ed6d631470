//! All-reduce throughput against message size, Local and Threads (2 ranks).
//! MPI numbers: `mpirun -n 2 target/release/sepdist-comm-selftest --bench` (feature `mpi`).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sepdist_comm::{Communicator, Local, Threads};

const SIZES: [usize; 4] = [1 << 10, 1 << 14, 1 << 18, 1 << 22]; // f32 elements: 4 KiB .. 16 MiB

fn allreduce(c: &mut Criterion) {
    let mut g = c.benchmark_group("all_reduce_sum");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    for len in SIZES {
        g.throughput(Throughput::Bytes((len * 4) as u64));
        let local = Local::default();
        let mut buf = vec![1.0f32; len];
        g.bench_with_input(BenchmarkId::new("local", len * 4), &len, |b, _| {
            b.iter(|| local.all_reduce_sum(black_box(&mut buf)))
        });
        g.bench_with_input(BenchmarkId::new("threads2", len * 4), &len, |b, &len| {
            b.iter_custom(|iters| {
                // A fresh group per sample: rank 1 runs the same number of reductions alongside.
                let mut comms = Threads::new(2, Duration::from_secs(60));
                let peer = comms.pop();
                let me = comms.pop();
                let (Some(me), Some(peer)) = (me, peer) else {
                    return Duration::ZERO;
                };
                std::thread::scope(|s| {
                    s.spawn(move || {
                        let mut v = vec![1.0f32; len];
                        for _ in 0..iters {
                            let _ = peer.all_reduce_sum(&mut v);
                        }
                    });
                    let mut v = vec![1.0f32; len];
                    let t = Instant::now();
                    for _ in 0..iters {
                        let _ = me.all_reduce_sum(black_box(&mut v));
                    }
                    t.elapsed()
                })
            })
        });
    }
    g.finish();
}

criterion_group!(benches, allreduce);
criterion_main!(benches);
