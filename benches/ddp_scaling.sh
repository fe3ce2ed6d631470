#!/usr/bin/env bash
# Weak scaling of data parallelism on this machine: the same per-rank work (batch_size ×
# accumulation) on 1 rank and on N ranks, one thread per rank. Prints samples/s of each and
# the efficiency = samples/s(N) / (N × samples/s(1)). Not part of CI.
#
#   benches/ddp_scaling.sh [-n N] [--steps S] [--accumulation A] [--config FILE]
#
# Needs a release build with MPI: cargo build --release --features mpi
set -euo pipefail
cd "$(dirname "$0")/.."

ranks=2 steps=4 accumulation=4 config=configs/bench_cpu.yaml
while [[ $# -gt 0 ]]; do
    case "$1" in
        -n) ranks="$2"; shift 2 ;;
        --steps) steps="$2"; shift 2 ;;
        --accumulation) accumulation="$2"; shift 2 ;;
        --config) config="$2"; shift 2 ;;
        -h | --help) sed -n '2,9p' "$0"; exit 0 ;;
        *) echo "ddp_scaling.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
bin="${SEPDIST_BIN:-target/release/sepdist}"
[[ -x "$bin" ]] || { echo "ddp_scaling.sh: build first: cargo build --release --features mpi" >&2; exit 1; }
mpirun_flags=()
if mpirun --version 2>/dev/null | grep -q "Open MPI"; then
    mpirun_flags=(--allow-run-as-root --oversubscribe)
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Median samples/s over the steps after the first (warm-up) of a run's metrics.
median_rate() {
    python3 -c '
import json, statistics, sys
rates = [json.loads(l)["samples_per_s"] for l in open(sys.argv[1]) if "\"train\"" in l][1:]
print(f"{statistics.median(rates):.3f}")' "$1"
}

run() {
    local n="$1" out="$work/n$1"
    RAYON_NUM_THREADS=1 OMP_NUM_THREADS=1 mpirun "${mpirun_flags[@]}" -n "$n" "$bin" train \
        --config "$config" --set "training.output_dir=$out" \
        --set "training.gradient_accumulation_steps=$accumulation" \
        --set "training.max_steps=$((steps + 1))" --set distributed.backend=mpi \
        >/dev/null 2>"$work/n$n.log" || { cat "$work/n$n.log" >&2; exit 1; }
    median_rate "$out/metrics.jsonl"
}

# Generate the dataset once, outside the timed runs.
"$bin" data synth --config "$config" >/dev/null
one=$(run 1)
many=$(run "$ranks")
python3 -c "
one, many, n = $one, $many, $ranks
print(f'machine: {open(\"/proc/cpuinfo\").read().split(\"model name\")[1].split(\":\")[1].split(chr(10))[0].strip()}, {__import__(\"os\").cpu_count()} cores')
print(f'config: $config, batch per rank x accumulation = ' + str($accumulation) + ' micro-batches, 1 thread per rank')
print(f'1 rank : {one:.3f} samples/s')
print(f'{n} ranks: {many:.3f} samples/s')
print(f'weak-scaling efficiency: {many / (n * one) * 100:.1f} %')
"
