//! Unit tests: Local and Threads backends, topology parsing, `init` selection.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::*;

const T: Duration = Duration::from_secs(20);

fn on_ranks<R: Send>(n: usize, timeout: Duration, f: impl Fn(ThreadsComm) -> R + Sync) -> Vec<R> {
    Threads::run(n, timeout, f)
}

/// Values whose fp32 sum depends on the order of addition, to expose non-deterministic sums.
fn data(rank: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7 + rank * 13) % 11) as f32 * 0.1 + 1e-7 * (rank as f32 + 1.0) * 1e3)
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn all_reduce_values_and_bitwise_agreement() {
    for n in [1, 2, 3, 4] {
        for len in [0, 1, 5, 1000] {
            let out = on_ranks(n, T, |c| {
                let mut buf = data(c.rank(), len);
                c.all_reduce_sum(&mut buf).unwrap();
                buf
            });
            // Reference: sum in rank order.
            let mut expect = data(0, len);
            for r in 1..n {
                for (e, x) in expect.iter_mut().zip(data(r, len)) {
                    *e += x;
                }
            }
            for o in &out {
                assert_eq!(bits(o), bits(&expect), "n={n} len={len}");
            }
        }
    }
}

#[test]
fn all_reduce_f64_flags() {
    for n in [1, 2, 3, 4] {
        let out = on_ranks(n, T, |c| {
            let mut v = [1.0, c.rank() as f64, if c.rank() == 1 { 1.0 } else { 0.0 }];
            c.all_reduce_sum_f64(&mut v).unwrap();
            v
        });
        let tri = (n * (n - 1) / 2) as f64;
        let flag = if n > 1 { 1.0 } else { 0.0 };
        assert!(
            out.iter().all(|v| *v == [n as f64, tri, flag]),
            "n={n}: {out:?}"
        );
    }
}

#[test]
fn non_blocking_all_reduce_matches_by_start_order() {
    // Rank 0 waits in reverse order: matching is by start order, as in MPI.
    for n in [1, 2, 3, 4] {
        let out = on_ranks(n, T, |c| {
            let a = c.start_all_reduce_sum(vec![c.rank() as f32; 3]).unwrap();
            let mut b = c.start_all_reduce_sum(vec![1.0; 2]).unwrap();
            assert_eq!((a.len(), b.len()), (3, 2));
            if c.rank() == 0 {
                let rb = b.wait().unwrap();
                let ra = a.wait().unwrap();
                (ra, rb)
            } else {
                while !b.poll().unwrap() {
                    std::thread::yield_now();
                }
                (a.wait().unwrap(), b.wait().unwrap())
            }
        });
        let tri = (n * (n - 1) / 2) as f32;
        for (a, b) in out {
            assert_eq!(a, vec![tri; 3]);
            assert_eq!(b, vec![n as f32; 2]);
        }
    }
}

#[test]
fn reduce_scatter_each_rank_gets_its_block() {
    for n in [1, 2, 3, 4] {
        for shard in [0, 1, 4] {
            let out = on_ranks(n, T, |c| {
                let input = data(c.rank(), n * shard);
                let mut s = vec![f32::NAN; shard];
                c.reduce_scatter_sum(&input, &mut s).unwrap();
                s
            });
            let mut full = data(0, n * shard);
            for r in 1..n {
                for (e, x) in full.iter_mut().zip(data(r, n * shard)) {
                    *e += x;
                }
            }
            for (r, s) in out.iter().enumerate() {
                assert_eq!(
                    bits(s),
                    bits(&full[r * shard..(r + 1) * shard]),
                    "n={n} r={r}"
                );
            }
        }
    }
}

#[test]
fn all_gather_concatenates_in_rank_order() {
    for n in [1, 2, 3, 4] {
        let out = on_ranks(n, T, |c| {
            let shard = vec![c.rank() as f32, 10.0 + c.rank() as f32];
            let mut all = vec![0.0; 2 * n];
            c.all_gather(&shard, &mut all).unwrap();
            all
        });
        let expect: Vec<f32> = (0..n).flat_map(|r| [r as f32, 10.0 + r as f32]).collect();
        assert!(out.iter().all(|o| *o == expect));
    }
}

#[test]
fn broadcast_bytes_from_any_root_resizes() {
    for n in [1, 2, 3, 4] {
        for root in 0..n {
            let out = on_ranks(n, T, |c| {
                let mut buf = if c.rank() == root {
                    format!("config-hash-from-{root}").into_bytes()
                } else {
                    vec![9; c.rank() * 3]
                };
                c.broadcast_bytes(&mut buf, root).unwrap();
                buf
            });
            assert!(
                out.iter()
                    .all(|b| *b == format!("config-hash-from-{root}").into_bytes())
            );
        }
    }
}

#[test]
fn all_gather_bytes_uneven_lengths_names_the_odd_rank() {
    for n in [1, 2, 3, 4] {
        let out = on_ranks(n, T, |c| {
            let mine = if c.rank() == n - 1 && n > 1 {
                b"other".to_vec()
            } else {
                vec![c.rank() as u8; c.rank()]
            };
            c.all_gather_bytes(&mine).unwrap()
        });
        for o in &out {
            assert_eq!(o.len(), n);
            for (r, b) in o.iter().enumerate() {
                let expect = if r == n - 1 && n > 1 {
                    b"other".to_vec()
                } else {
                    vec![r as u8; r]
                };
                assert_eq!(*b, expect);
            }
        }
        assert!(out.windows(2).all(|w| w[0] == w[1]));
    }
}

#[test]
fn barrier_waits_for_everyone() {
    let arrived = std::sync::atomic::AtomicUsize::new(0);
    on_ranks(4, T, |c| {
        if c.rank() == 3 {
            std::thread::sleep(Duration::from_millis(50));
        }
        arrived.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        c.barrier().unwrap();
        assert_eq!(arrived.load(std::sync::atomic::Ordering::SeqCst), 4);
    });
}

#[test]
fn length_errors_are_typed() {
    let out = on_ranks(2, T, |c| {
        let mut s = [0.0; 2];
        let e1 = c.reduce_scatter_sum(&[0.0; 3], &mut s).unwrap_err();
        let mut o = [0.0; 3];
        let e2 = c.all_gather(&[0.0; 2], &mut o).unwrap_err();
        let e3 = c.broadcast_bytes(&mut vec![], 2).unwrap_err();
        (e1.to_string(), e2.to_string(), e3.to_string())
    });
    let (e1, e2, e3) = &out[0];
    assert!(
        e1.contains("reduce_scatter") && e1.contains("expected 4"),
        "{e1}"
    );
    assert!(
        e2.contains("all_gather") && e2.contains("expected 4"),
        "{e2}"
    );
    assert!(e3.contains("root rank 2"), "{e3}");
}

#[test]
fn timeout_when_a_rank_never_joins() {
    let timeout = Duration::from_millis(200);
    let mut comms = Threads::new(3, timeout);
    // Rank 2 stays alive but never calls (dropping it would break the group at once instead).
    let silent = comms.pop().unwrap();
    let start = Instant::now();
    let errs: Vec<CommError> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|c| s.spawn(move || c.all_reduce_sum(&mut [1.0; 4]).unwrap_err()))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(start.elapsed() < timeout + Duration::from_secs(5));
    // The first to expire gets Timeout; the other may see the group already broken by it.
    let timeouts = errs
        .iter()
        .filter(|e| {
            matches!(
                e,
                CommError::Timeout {
                    collective: CollectiveKind::AllReduceF32,
                    bytes: 16,
                    ..
                }
            )
        })
        .count();
    assert!(timeouts >= 1, "{errs:?}");
    assert!(errs.iter().all(|e| e.is_fatal()));
    let msg = errs[0].to_string();
    assert!(
        msg.contains("all_reduce_f32") || msg.contains("broken"),
        "{msg}"
    );
    // The late rank finds the group broken instead of hanging.
    let late = silent.barrier().unwrap_err();
    assert!(matches!(late, CommError::Broken { .. }), "{late}");
}

#[test]
fn dropped_rank_breaks_the_group_promptly() {
    let mut comms = Threads::new(2, Duration::from_secs(60));
    drop(comms.pop());
    let start = Instant::now();
    let e = comms[0].barrier().unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(e.to_string().contains("rank 1 left"), "{e}");
}

#[test]
fn mismatched_collectives_are_detected() {
    let out = on_ranks(2, T, |c| {
        if c.rank() == 0 {
            c.all_reduce_sum(&mut [0.0; 3]).unwrap_err()
        } else {
            c.all_reduce_sum(&mut [0.0; 4]).unwrap_err()
        }
    });
    for e in out {
        let m = e.to_string();
        assert!(
            m.contains("rank 0: all_reduce_f32 of 3") && m.contains("rank 1: all_reduce_f32 of 4"),
            "{m}"
        );
    }
}

#[test]
fn counters_by_kind_and_bytes() {
    let out = on_ranks(2, T, |c| {
        let before = c.stats();
        for _ in 0..3 {
            c.all_reduce_sum(&mut [0.0; 10]).unwrap();
        }
        c.start_all_reduce_sum(vec![0.0; 5])
            .unwrap()
            .wait()
            .unwrap();
        c.all_reduce_sum_f64(&mut [0.0]).unwrap();
        let mut s = [0.0; 2];
        c.reduce_scatter_sum(&[0.0; 4], &mut s).unwrap();
        let mut o = [0.0; 4];
        c.all_gather(&s, &mut o).unwrap();
        c.broadcast_bytes(&mut vec![1, 2, 3], 0).unwrap();
        c.all_gather_bytes(b"ab").unwrap();
        c.barrier().unwrap();
        c.stats().since(&before)
    });
    for s in out {
        assert_eq!(
            s.get(CollectiveKind::AllReduceF32),
            OpStats {
                calls: 4,
                bytes: 4 * 35
            }
        );
        assert_eq!(
            s.get(CollectiveKind::AllReduceF64),
            OpStats { calls: 1, bytes: 8 }
        );
        assert_eq!(
            s.get(CollectiveKind::ReduceScatter),
            OpStats {
                calls: 1,
                bytes: 16
            }
        );
        assert_eq!(
            s.get(CollectiveKind::AllGather),
            OpStats {
                calls: 1,
                bytes: 16
            }
        );
        assert_eq!(
            s.get(CollectiveKind::BroadcastBytes),
            OpStats { calls: 1, bytes: 3 }
        );
        assert_eq!(
            s.get(CollectiveKind::AllGatherBytes),
            OpStats { calls: 1, bytes: 2 }
        );
        assert_eq!(
            s.get(CollectiveKind::Barrier),
            OpStats { calls: 1, bytes: 0 }
        );
        assert_eq!(s.total_calls(), 10);
    }
}

#[test]
fn local_is_identity_and_counts() {
    let c = Local::new(T);
    assert_eq!(
        (c.rank(), c.world_size(), c.backend_name()),
        (0, 1, "local")
    );
    let mut v = [1.5f32, -2.0];
    c.all_reduce_sum(&mut v).unwrap();
    assert_eq!(v, [1.5, -2.0]);
    let mut s = [0.0; 2];
    c.reduce_scatter_sum(&v, &mut s).unwrap();
    assert_eq!(s, v);
    let mut o = [0.0; 2];
    c.all_gather(&s, &mut o).unwrap();
    assert_eq!(o, v);
    assert_eq!(
        c.start_all_reduce_sum(vec![3.0]).unwrap().wait().unwrap(),
        vec![3.0]
    );
    let mut b = b"x".to_vec();
    c.broadcast_bytes(&mut b, 0).unwrap();
    assert!(c.broadcast_bytes(&mut b, 1).is_err());
    assert_eq!(c.all_gather_bytes(b"fp").unwrap(), vec![b"fp".to_vec()]);
    c.barrier().unwrap();
    assert!(c.all_gather(&s, &mut [0.0; 3]).is_err());
    assert_eq!(c.stats().get(CollectiveKind::AllReduceF32).calls, 2);
}

#[test]
fn communicator_is_object_safe_and_send() {
    fn assert_send<T: Send>() {}
    assert_send::<Box<dyn Communicator>>();
    assert_send::<Box<dyn PendingReduce>>();
    let boxed: Vec<Box<dyn Communicator>> = Threads::new(2, T)
        .into_iter()
        .map(|c| Box::new(c) as Box<dyn Communicator>)
        .collect();
    let out: Vec<f32> = std::thread::scope(|s| {
        let hs: Vec<_> = boxed
            .into_iter()
            .map(|c| {
                s.spawn(move || {
                    let mut v = [1.0];
                    c.all_reduce_sum(&mut v).unwrap();
                    v[0]
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(out, [2.0, 2.0]);
}

// ---- topology ----

fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let m: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |k| m.get(k).cloned()
}

#[test]
fn topology_from_each_launcher() {
    let cases: &[(&[(&str, &str)], Topology)] = &[
        (&[], Topology::single()),
        (
            &[
                ("OMPI_COMM_WORLD_RANK", "3"),
                ("OMPI_COMM_WORLD_SIZE", "4"),
                ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ],
            Topology {
                rank: 3,
                world_size: 4,
                local_rank: 1,
                launcher: Launcher::OpenMpi,
            },
        ),
        (
            &[
                ("PMI_RANK", "2"),
                ("PMI_SIZE", "4"),
                ("MPI_LOCALRANKID", "2"),
            ],
            Topology {
                rank: 2,
                world_size: 4,
                local_rank: 2,
                launcher: Launcher::Pmi,
            },
        ),
        (
            &[
                ("SLURM_PROCID", "5"),
                ("SLURM_NTASKS", "8"),
                ("SLURM_LOCALID", "1"),
            ],
            Topology {
                rank: 5,
                world_size: 8,
                local_rank: 1,
                launcher: Launcher::Slurm,
            },
        ),
        (
            &[("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")],
            Topology {
                rank: 1,
                world_size: 2,
                local_rank: 1,
                launcher: Launcher::EnvVars,
            },
        ),
        // PMI under srun: PMI wins, local rank falls back to SLURM_LOCALID.
        (
            &[
                ("PMI_RANK", "1"),
                ("PMI_SIZE", "2"),
                ("SLURM_PROCID", "1"),
                ("SLURM_NTASKS", "2"),
                ("SLURM_LOCALID", "1"),
            ],
            Topology {
                rank: 1,
                world_size: 2,
                local_rank: 1,
                launcher: Launcher::Pmi,
            },
        ),
        // Incomplete family is ignored; missing local rank is 0.
        (
            &[
                ("RANK", "1"),
                ("OMPI_COMM_WORLD_RANK", "0"),
                ("OMPI_COMM_WORLD_SIZE", "2"),
            ],
            Topology {
                rank: 0,
                world_size: 2,
                local_rank: 0,
                launcher: Launcher::OpenMpi,
            },
        ),
    ];
    for (pairs, expect) in cases {
        assert_eq!(
            Topology::from_env_with(&env_of(pairs)).unwrap(),
            *expect,
            "{pairs:?}"
        );
    }
}

#[test]
fn topology_rejects_bad_values() {
    for (pairs, needle) in [
        (&[("RANK", "x"), ("WORLD_SIZE", "2")][..], "RANK=\"x\""),
        (
            &[("RANK", "2"), ("WORLD_SIZE", "2")][..],
            "below the world size",
        ),
        (&[("PMI_RANK", "0"), ("PMI_SIZE", "0")][..], "PMI_SIZE"),
        (
            &[("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "7")][..],
            "LOCAL_RANK",
        ),
    ] {
        let e = Topology::from_env_with(&env_of(pairs))
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle), "{pairs:?}: {e}");
    }
}

#[test]
fn slurm_singletons_are_detected() {
    let env = env_of(&[("SLURM_PROCID", "2"), ("SLURM_NTASKS", "4")]);
    let e = Topology::check_slurm(1, &env).unwrap_err().to_string();
    assert!(
        e.contains("SLURM_NTASKS") && e.contains("srun --mpi=pmix") && e.contains("size 1"),
        "{e}"
    );
    assert!(Topology::check_slurm(4, &env).is_ok());
    // The step's own count wins over the allocation's.
    let step = env_of(&[
        ("SLURM_PROCID", "0"),
        ("SLURM_NTASKS", "8"),
        ("SLURM_STEP_NUM_TASKS", "4"),
    ]);
    assert!(Topology::check_slurm(4, &step).is_ok());
    // mpirun inside an allocation may use fewer ranks.
    let mpirun = env_of(&[
        ("SLURM_PROCID", "0"),
        ("SLURM_NTASKS", "8"),
        ("OMPI_COMM_WORLD_SIZE", "2"),
    ]);
    assert!(Topology::check_slurm(2, &mpirun).is_ok());
    // Not an srun task: nothing to check.
    assert!(Topology::check_slurm(1, &env_of(&[("SLURM_NTASKS", "8")])).is_ok());
}

#[test]
fn init_picks_local_for_a_single_process() {
    let c = init_with_env(Backend::Auto, T, &env_of(&[])).unwrap();
    assert_eq!((c.backend_name(), c.world_size()), ("local", 1));
    let c = init_with_env(
        Backend::None,
        T,
        &env_of(&[("RANK", "0"), ("WORLD_SIZE", "4")]),
    )
    .unwrap();
    assert_eq!(c.backend_name(), "local");
}

#[cfg(not(feature = "mpi"))]
#[test]
fn init_without_mpi_explains_itself() {
    let env = env_of(&[("PMI_RANK", "1"), ("PMI_SIZE", "4")]);
    let e = init_with_env(Backend::Auto, T, &env)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("4 ranks")
            && e.contains("PMI_RANK=1 PMI_SIZE=4")
            && e.contains("--features mpi"),
        "{e}"
    );
    let srun = env_of(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2")]);
    assert!(matches!(
        init_with_env(Backend::Auto, T, &srun),
        Err(CommError::NotBuiltWithMpi { world_size: 2, .. })
    ));
    let e = init_with_env(Backend::Mpi, T, &env_of(&[])).err().unwrap();
    assert!(matches!(e, CommError::MpiNotCompiled), "{e}");
    const { assert!(!MPI_COMPILED) };
}

#[test]
fn a_panicking_rank_is_reraised_and_others_fail_fast() {
    let start = Instant::now();
    let r = std::panic::catch_unwind(|| {
        Threads::run(2, Duration::from_secs(60), |c| {
            if c.rank() == 1 {
                panic!("rank 1 failed");
            }
            c.barrier()
        })
    });
    assert!(r.is_err());
    assert!(start.elapsed() < Duration::from_secs(10));
}
