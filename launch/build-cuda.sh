#!/usr/bin/env bash
# Builds sepdist with the `cuda` (or `nccl`) feature on any Linux x86_64 machine, GPU or not:
# installs the pinned CUDA 13.0 compiler toolkit from PyPI wheels (launch/install-cuda-toolkit.sh),
# generates link-only stub libraries (launch/make-link-stubs.sh), sets PATH, CUDA_HOME,
# CUDA_COMPUTE_CAP, CUDAFORGE_THREADS and LIBRARY_PATH, and runs cargo.
# The binary records the real sonames (libcuda.so.1, libcublas.so.13, ...) and runs on a GPU
# machine against the real libraries (driver >= 580, i.e. CUDA 13.0; see README).
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: launch/build-cuda.sh [-h] [--compute-cap N] [--stub-runtime] [SUBCOMMAND] [CARGO ARGS...]

Runs `cargo SUBCOMMAND CARGO ARGS` (SUBCOMMAND defaults to build; check, clippy, test, run work
too) with the CUDA 13.0 toolkit and link stubs. Adds `--features cuda` when no --features /
-F / --all-features is given. Examples:
  launch/build-cuda.sh --release --features nccl
  launch/build-cuda.sh --compute-cap 120 --release --features cuda,nccl   # Blackwell RTX/workstation
  launch/build-cuda.sh clippy --workspace --all-targets --features nccl -- -D warnings
  launch/build-cuda.sh --stub-runtime test -p sepdist-comm --features nccl   # no GPU needed

--compute-cap N   GPU architecture of the kernels (default $CUDA_COMPUTE_CAP, else 90 =
                  H100/H200 (sm_90a); 80 A100, 89 L40S/RTX 40, 100 B200, 120 RTX PRO 6000 /
                  RTX 50). Kernels are built for this one architecture only.
--stub-runtime    also run what cargo runs (test, run) against the link stubs
                  (LD_LIBRARY_PATH): the binaries start as on a machine without a GPU
                  (cuInit reports no device), so CPU tests run and GPU tests skip; any other
                  CUDA call traps. Never for real work.
Environment: SEPDIST_CUDA_HOME (toolkit cache), SEPDIST_CUDA_STUBS (stub folder),
CARGO_TARGET_DIR (default target-cuda/, so the CPU build's target/ is not rebuilt),
CUDAFORGE_THREADS (parallel nvcc jobs, default 2).
USAGE
}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cap=${CUDA_COMPUTE_CAP:-90}
stub_runtime=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --compute-cap) cap=$2; shift 2 ;;
        --compute-cap=*) cap=${1#*=}; shift ;;
        --stub-runtime) stub_runtime=1; shift ;;
        *) break ;;
    esac
done

sub=build
if [[ $# -gt 0 && $1 != -* ]]; then
    sub=$1
    shift
fi
have_features=0
for a in "$@"; do
    [[ $a == -- ]] && break
    case "$a" in
        --features | --features=* | -F | -F* | --all-features) have_features=1 ;;
    esac
done
feat=()
[[ $have_features -eq 1 ]] || feat=(--features cuda)

CU=$("$ROOT/launch/install-cuda-toolkit.sh" --print-home)
export PATH="$CU/bin:$PATH"
export CUDA_HOME="$CU"
export CUDA_COMPUTE_CAP="$cap"
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-2}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target-cuda}"

STUBS=$("$ROOT/launch/make-link-stubs.sh" --print-dir)
# Link time only (cargo does not track LIBRARY_PATH; the stubs change only with cudarc's version,
# which relinks anyway). The stubs never reach the binary's RUNPATH.
export LIBRARY_PATH="$STUBS${LIBRARY_PATH:+:$LIBRARY_PATH}"
if [[ $stub_runtime -eq 1 ]]; then
    export LD_LIBRARY_PATH="$STUBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

cd "$ROOT"
exec cargo "$sub" "${feat[@]}" "$@"
