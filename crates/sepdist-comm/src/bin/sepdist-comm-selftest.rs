//! Multi-process self-test of the MPI backend: run under `mpirun -n K`.
//!
//! Default: runs every collective, checks the results and prints `rank R/K ok` (the test in
//! `tests/mpi.rs` asserts one such line per rank with the expected K).
//! `--timeout-s S --sleep-rank R --sleep-s D`: rank R sleeps D seconds before an all-reduce, so
//! the others hit the deadline and abort the job (deadline test).
//! `--bench`: all-reduce bandwidth table (size, time, GB/s) printed by rank 0.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use sepdist_comm::{Backend, CollectiveKind, Communicator, init};

struct Args {
    timeout: Duration,
    sleep_rank: Option<usize>,
    sleep: Duration,
    bench: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        timeout: Duration::from_secs(60),
        sleep_rank: None,
        sleep: Duration::ZERO,
        bench: false,
    };
    let mut it = std::env::args().skip(1);
    let secs = |v: Option<String>, flag: &str| -> Result<f64, String> {
        v.as_deref()
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|x| x.is_finite() && *x >= 0.0)
            .ok_or_else(|| format!("{flag} needs a number of seconds"))
    };
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--timeout-s" => a.timeout = Duration::from_secs_f64(secs(it.next(), &arg)?),
            "--sleep-s" => a.sleep = Duration::from_secs_f64(secs(it.next(), &arg)?),
            "--sleep-rank" => {
                a.sleep_rank = Some(
                    it.next()
                        .and_then(|s| s.parse().ok())
                        .ok_or("--sleep-rank needs a rank")?,
                )
            }
            "--bench" => a.bench = true,
            "-h" | "--help" => {
                return Err("usage: mpirun -n K sepdist-comm-selftest [--bench] \
                            [--timeout-s S] [--sleep-rank R --sleep-s D]"
                    .into());
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    Ok(a)
}

fn check(cond: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if cond { Ok(()) } else { Err(what()) }
}

/// Every collective, with values whose expected result is exact in f32.
fn selftest(c: &dyn Communicator) -> Result<(), String> {
    let (r, n) = (c.rank(), c.world_size());
    let e = |e: sepdist_comm::CommError| e.to_string();
    let tri = (n * (n - 1) / 2) as f32;
    let before = c.stats();

    for len in [0usize, 1, 1000, 100_000] {
        let mut v: Vec<f32> = (0..len).map(|i| (r * 1000 + i % 4096) as f32).collect();
        c.all_reduce_sum(&mut v).map_err(e)?;
        for (i, x) in v.iter().enumerate() {
            let want = tri * 1000.0 + (n * (i % 4096)) as f32;
            check(*x == want, || {
                format!("all_reduce_sum len {len}: [{i}] = {x}, want {want}")
            })?;
        }
    }

    let mut f = [1.0f64, r as f64];
    c.all_reduce_sum_f64(&mut f).map_err(e)?;
    check(f == [n as f64, tri as f64], || {
        format!("all_reduce_sum_f64: {f:?}")
    })?;

    // Two reductions in flight, waited in reverse order: matched by start order.
    let a = c.start_all_reduce_sum(vec![r as f32; 3000]).map_err(e)?;
    let mut b = c.start_all_reduce_sum(vec![1.0; 7]).map_err(e)?;
    let _ = b.poll().map_err(e)?;
    let rb = b.wait().map_err(e)?;
    let ra = a.wait().map_err(e)?;
    check(ra.iter().all(|x| *x == tri) && ra.len() == 3000, || {
        "start_all_reduce_sum a".into()
    })?;
    check(rb == vec![n as f32; 7], || {
        format!("start_all_reduce_sum b: {rb:?}")
    })?;

    let shard = 5;
    let input: Vec<f32> = (0..n * shard).map(|j| (r + j) as f32).collect();
    let mut mine = vec![f32::NAN; shard];
    c.reduce_scatter_sum(&input, &mut mine).map_err(e)?;
    for (k, x) in mine.iter().enumerate() {
        let want = tri + (n * (r * shard + k)) as f32;
        check(*x == want, || {
            format!("reduce_scatter_sum [{k}] = {x}, want {want}")
        })?;
    }

    let mut all = vec![0.0f32; 2 * n];
    c.all_gather(&[r as f32, r as f32 + 0.5], &mut all)
        .map_err(e)?;
    let want: Vec<f32> = (0..n).flat_map(|q| [q as f32, q as f32 + 0.5]).collect();
    check(all == want, || format!("all_gather: {all:?}"))?;

    let root = n - 1;
    let mut bytes = if r == root {
        b"fingerprint".to_vec()
    } else {
        vec![7; r]
    };
    c.broadcast_bytes(&mut bytes, root).map_err(e)?;
    check(bytes == b"fingerprint", || {
        format!("broadcast_bytes: {bytes:?}")
    })?;

    let got = c.all_gather_bytes(&vec![r as u8; r + 1]).map_err(e)?;
    let want: Vec<Vec<u8>> = (0..n).map(|q| vec![q as u8; q + 1]).collect();
    check(got == want, || format!("all_gather_bytes: {got:?}"))?;

    // Bitwise agreement of an order-sensitive fp32 sum.
    let mut v: Vec<f32> = (0..999)
        .map(|i| 0.1 * (i as f32) + 1e-3 / (r as f32 + 1.0))
        .collect();
    c.all_reduce_sum(&mut v).map_err(e)?;
    let mine: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    let everyone = c.all_gather_bytes(&mine).map_err(e)?;
    check(everyone.iter().all(|b| *b == mine), || {
        "ranks disagree bitwise on all_reduce_sum".into()
    })?;

    c.barrier().map_err(e)?;

    let s = c.stats().since(&before);
    check(s.get(CollectiveKind::AllReduceF32).calls == 7, || {
        format!("counter: {s:?}")
    })?;
    check(s.get(CollectiveKind::AllGatherBytes).calls == 2, || {
        format!("counter: {s:?}")
    })?;
    check(s.get(CollectiveKind::Barrier).calls == 1, || {
        format!("counter: {s:?}")
    })?;
    Ok(())
}

fn bench(c: &dyn Communicator) -> Result<(), String> {
    if c.rank() == 0 {
        println!(
            "# all_reduce_sum over {} ranks (algorithm bandwidth = bytes / time)",
            c.world_size()
        );
        println!(
            "{:>12} {:>8} {:>12} {:>10}",
            "bytes", "iters", "us/iter", "GB/s"
        );
    }
    let mut len = 256usize; // 1 KiB
    while len <= 16 << 20 {
        let mut buf = vec![1.0f32; len];
        let iters = (64usize << 20).div_ceil(len * 4).clamp(3, 200);
        c.all_reduce_sum(&mut buf).map_err(|e| e.to_string())?; // warm-up
        c.barrier().map_err(|e| e.to_string())?;
        let t = Instant::now();
        for _ in 0..iters {
            c.all_reduce_sum(&mut buf).map_err(|e| e.to_string())?;
        }
        let dt = t.elapsed().as_secs_f64() / iters as f64;
        if c.rank() == 0 {
            let bytes = len * 4;
            println!(
                "{bytes:>12} {iters:>8} {:>12.1} {:>10.3}",
                dt * 1e6,
                bytes as f64 / dt / 1e9
            );
        }
        len *= 4;
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(m) => {
            eprintln!("{m}");
            return ExitCode::from(2);
        }
    };
    let c = match init(Backend::Mpi, args.timeout) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sepdist-comm-selftest: {e}");
            return ExitCode::from(1);
        }
    };
    let (r, n) = (c.rank(), c.world_size());
    let result = if args.bench {
        bench(&*c)
    } else if let Some(sleeper) = args.sleep_rank {
        if r == sleeper {
            std::thread::sleep(args.sleep);
        }
        let mut v = vec![1.0f32; 1024];
        c.all_reduce_sum(&mut v).map_err(|e| e.to_string())
    } else {
        selftest(&*c)
    };
    match result {
        Ok(()) => {
            println!("rank {r}/{n} ok");
            ExitCode::SUCCESS
        }
        Err(m) => {
            // One write, so the launcher forwards the line whole before the abort.
            let line = format!("rank {r}/{n}: error: {m}\n");
            let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
            // Ends every rank: the others may be blocked in a collective this rank left.
            c.abort(3)
        }
    }
}
