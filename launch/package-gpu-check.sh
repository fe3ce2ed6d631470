#!/usr/bin/env bash
# Builds what launch/gpu-check.sh runs on a GPU machine that has no Rust toolchain: the
# `sepdist` binary and the CUDA op test executable, both `--release --features cuda` (through
# launch/build-cuda.sh: no GPU needed here), stripped and xz-compressed into one folder with a
# MANIFEST (commit, compute capability, sizes, sha256) and a copy of gpu-check.sh. That folder
# is what the device tool carries (`carry: ["gpu-check"]`); it must stay well under 64 MiB.
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: launch/package-gpu-check.sh [-h] [--out DIR] [--compute-cap N] [--no-xz]

Builds target-cuda/release/sepdist and the ops_cuda test executable with
launch/build-cuda.sh (--release --features cuda, no MPI or NCCL: one rank), strips them and
writes DIR/sepdist.xz, DIR/ops_cuda.xz, DIR/gpu-check.sh and DIR/MANIFEST.
  --out DIR          package folder (default gpu-check/ at the repository root, git-ignored)
  --compute-cap N    GPU architecture of the kernels (default 90: H100/H200; 120: RTX PRO 6000)
  --no-xz            keep the stripped executables uncompressed (about 8 times larger)
USAGE
}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
out="$ROOT/gpu-check"
cap=${CUDA_COMPUTE_CAP:-90}
compress=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --out) out=$2; shift 2 ;;
        --out=*) out=${1#*=}; shift ;;
        --compute-cap) cap=$2; shift 2 ;;
        --compute-cap=*) cap=${1#*=}; shift ;;
        --no-xz) compress=0; shift ;;
        *) echo "package-gpu-check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
for tool in strip python3 sha256sum; do
    command -v "$tool" >/dev/null || { echo "package-gpu-check: '$tool' is not installed" >&2; exit 1; }
done
if [[ $compress -eq 1 ]] && ! command -v xz >/dev/null; then
    echo "package-gpu-check: 'xz' is not installed (apt-get install xz-utils, or --no-xz)" >&2
    exit 1
fi

build=("$ROOT/launch/build-cuda.sh" --compute-cap "$cap")
cd "$ROOT"
echo "== building sepdist (release, features cuda, sm_$cap)"
"${build[@]}" build --release --features cuda --bin sepdist
target=${CARGO_TARGET_DIR:-$ROOT/target-cuda}
bin="$target/release/sepdist"

echo "== building the CUDA op tests"
# cargo prints one JSON object per artifact; the test executable is the one with an
# "executable" and the target name ops_cuda.
json=$("${build[@]}" test --release --features cuda -p sepdist-model --test ops_cuda --no-run \
    --message-format=json)
ops=$(python3 -c '
import json, sys
exe = [m["executable"] for m in map(json.loads, sys.stdin.read().splitlines())
       if m.get("reason") == "compiler-artifact" and m.get("executable")
       and m["target"]["name"] == "ops_cuda"]
print(exe[-1] if exe else "")' <<<"$json")
if [[ -z $ops || ! -x $ops ]]; then
    echo "package-gpu-check: cargo named no ops_cuda test executable" >&2
    exit 1
fi

mkdir -p "$out"
rm -f "$out"/sepdist "$out"/sepdist.xz "$out"/ops_cuda "$out"/ops_cuda.xz "$out"/MANIFEST
for pair in "sepdist:$bin" "ops_cuda:$ops"; do
    name=${pair%%:*}
    src=${pair#*:}
    strip -o "$out/$name" "$src"
    if [[ $compress -eq 1 ]]; then
        xz -T0 -6 -f "$out/$name"
    fi
done
cp "$ROOT/launch/gpu-check.sh" "$out/gpu-check.sh"

commit=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)
dirty=$(git -C "$ROOT" status --porcelain 2>/dev/null | wc -l)
{
    echo "sepdist gpu-check package"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m)"
    echo "commit: $commit ($dirty uncommitted change(s) in the tree when built)"
    echo "features: cuda (one rank; no MPI, no NCCL); kernels: sm_$cap (CUDA_COMPUTE_CAP=$cap)"
    echo "runtime: driver >= 580 (CUDA 13.0), libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libcudart.so.13 libnvrtc.so.13"
    echo "files:"
    (cd "$out" && for f in sepdist* ops_cuda* gpu-check.sh; do
        printf '  %s %s bytes sha256 %s\n' "$f" "$(stat -c %s "$f")" "$(sha256sum "$f" | cut -d' ' -f1)"
    done)
} >"$out/MANIFEST"
cat "$out/MANIFEST"
total=$(du -sb "$out" | cut -f1)
echo "== $out: $total bytes ($((total / 1048576)) MiB) in all"
if [[ $total -gt $((48 * 1048576)) ]]; then
    echo "package-gpu-check: $total bytes leave too little of the device tool's 64 MiB for the tree" >&2
    exit 1
fi
