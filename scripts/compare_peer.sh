#!/usr/bin/env bash
# sepdist against the PyTorch peer (the `bs-roformer` package's BSRoformer) on
# configs/bench_cpu.yaml, measured on this machine in alternation: RUNS runs of each, each
# run STEPS timed steps after one warm-up, with THREADS threads. Prints the median step time,
# samples/s and peak RSS of both, and the ratios. Not part of CI.
#
#   cargo build --release && scripts/compare_peer.sh [--runs 3] [--steps 5] [--threads 2]
#
# The peer goes into a virtualenv ($PEER_VENV, default /tmp/sepdist-peer-venv) created on
# first use: `pip install torch bs-roformer==1.2.4` from PyPI (about 5 GB with torch's CUDA
# libraries; the CPU is what is measured).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
runs=3 steps=5 threads=2
while [[ $# -gt 0 ]]; do
    case "$1" in
        --runs) runs=$2; shift 2 ;;
        --steps) steps=$2; shift 2 ;;
        --threads) threads=$2; shift 2 ;;
        -h | --help) sed -n 2,12p "$0"; exit 0 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
venv=${PEER_VENV:-/tmp/sepdist-peer-venv}
if ! "$venv/bin/python" -c "import torch, bs_roformer" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet torch bs-roformer==1.2.4
fi
bin=$ROOT/target/release/sepdist
[[ -x $bin ]] || { echo "build first: cargo build --release" >&2; exit 2; }
cd "$ROOT"
export RAYON_NUM_THREADS=$threads OMP_NUM_THREADS=$threads
declare -a ours_t ours_m peer_t peer_m
for ((r = 1; r <= runs; r++)); do
    out=$("$bin" bench --config configs/bench_cpu.yaml --steps "$steps" --warmup 1)
    ours_t+=("$(awk '/^median step/ {print $3}' <<<"$out")")
    ours_m+=("$(awk '/^peak RSS/ {print $3 * 1073741824}' <<<"$out")")
    line=$("$venv/bin/python" scripts/peer_bench.py --steps "$steps" --warmup 1 --threads "$threads" | tail -1)
    peer_t+=("$(sed -E 's/.*median_step_s=([0-9.]+).*/\1/' <<<"$line")")
    peer_m+=("$(sed -E 's/.*peak_rss_bytes=([0-9]+).*/\1/' <<<"$line")")
    echo "run $r: sepdist ${ours_t[-1]} s, peer ${peer_t[-1]} s" >&2
done
python3 - "$threads" "${ours_t[*]}" "${ours_m[*]}" "${peer_t[*]}" "${peer_m[*]}" <<'PY'
import statistics, sys
threads = sys.argv[1]
ot, om, pt, pm = ([float(x) for x in a.split()] for a in sys.argv[2:6])
med = statistics.median
batch = 2
rows = [
    ("median step (s)", med(ot), med(pt)),
    ("samples/s", batch / med(ot), batch / med(pt)),
    ("peak RSS (GB)", med(om) / 1e9, med(pm) / 1e9),
]
print(f"bench_cpu, {threads} threads, medians of {len(ot)} alternating runs")
print(f"{'':18} {'sepdist':>10} {'peer':>10} {'ratio':>8}")
for name, a, b in rows:
    print(f"{name:18} {a:10.3f} {b:10.3f} {a / b:8.3f}")
PY
