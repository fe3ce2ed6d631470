#!/usr/bin/env bash
# Runs N ranks of sepdist on this machine under mpirun (MPICH or OpenMPI).
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: launch/run-local.sh -n N [--] SEPDIST_ARGS...

Starts N ranks of the sepdist binary with mpirun on this machine, e.g.
  launch/run-local.sh -n 4 -- train --config configs/quickstart.yaml

Environment:
  SEPDIST_BIN        binary to run (default: target/release/sepdist)
  MPIRUN             launcher (default: mpirun)
  OMP_NUM_THREADS, RAYON_NUM_THREADS
                     threads per rank (default: cores / N, at least 1)
USAGE
}

n=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        -n | --np)
            [[ $# -ge 2 ]] || { usage >&2; exit 2; }
            n="$2"; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        --) shift; break ;;
        *) break ;;
    esac
done

if ! [[ "$n" =~ ^[1-9][0-9]*$ ]]; then
    echo "run-local.sh: -n N (a positive number of ranks) is required" >&2
    usage >&2
    exit 2
fi

bin="${SEPDIST_BIN:-target/release/sepdist}"
if [[ ! -x "$bin" ]]; then
    echo "run-local.sh: $bin is not an executable: build it (cargo build --release --features mpi) or set SEPDIST_BIN" >&2
    exit 1
fi

mpirun="${MPIRUN:-mpirun}"
if ! command -v "$mpirun" >/dev/null 2>&1; then
    echo "run-local.sh: $mpirun not found: run launch/install-deps.sh or set MPIRUN" >&2
    exit 1
fi

# OpenMPI refuses root and more ranks than cores without these; MPICH needs (and knows) neither.
flags=()
if "$mpirun" --version 2>&1 | grep -qE 'Open MPI|OpenRTE'; then
    flags+=(--allow-run-as-root --oversubscribe)
fi

cores=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
per_rank=$(( cores / n ))
(( per_rank >= 1 )) || per_rank=1
# Ranks on one machine share its cores: one thread pool per rank of cores/N threads.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$per_rank}"
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-$per_rank}"

exec "$mpirun" "${flags[@]}" -n "$n" "$bin" "$@"
