#!/usr/bin/env bash
# Generates link-only stub libraries for the CUDA 13 / NCCL libraries that the `cuda` and `nccl`
# features link against, so that the binary links on a machine without a GPU driver, cuBLAS,
# cuRAND, NVRTC or NCCL. Each stub has the real soname, so the binary records the same NEEDED
# entries as a build against the real libraries and runs against them on a GPU machine.
# Every stub function traps (SIGILL), except the fat-binary registration hooks that static
# constructors call at start-up (no-ops), and cuInit, which reports CUDA_ERROR_NO_DEVICE (with
# cuGetErrorString/cuGetErrorName failing cleanly): with LD_LIBRARY_PATH=<stubs> the binary
# starts and behaves as on a machine without a GPU (every device probe fails, since cudarc calls
# cuInit first), so `LD_BIND_NOW=1 LD_LIBRARY_PATH=<stubs> sepdist --version` checks that every
# CUDA symbol it needs is provided, and test binaries run their CPU tests and skip the GPU ones.
# Any other CUDA call traps. Never run real work against the stubs.
#
# Symbol lists: the names cudarc's `sys` modules load (the `load::<_F>("name")` calls, the same
# names its `dynamic-linking` extern blocks declare), for the cudarc version in Cargo.lock; for
# cudart, the exports of the toolkit's real libcudart.so.13 plus the cudart symbols that
# candle-kernels' static library (libmoe.a) leaves undefined, when such an archive is given.
# Idempotent: regenerates only when the inputs change. Quiet on success.
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: launch/make-link-stubs.sh [-h] [--out DIR] [--archive LIB.a]... [--print-dir]

Writes lib{cuda,cublas,cublasLt,curand,nvrtc,cudart,nccl}.so.N stubs (and the unversioned
.so links the linker looks for) into DIR (default ${SEPDIST_CUDA_STUBS:-$HOME/.cache/sepdist/cuda13-stubs}).
Use the folder with LIBRARY_PATH=DIR at link time only.
  --archive LIB.a  also add the cuda*/__cuda* symbols this archive leaves undefined to libcudart
  --print-dir      print DIR on stdout
Environment: CUDA_HOME (toolkit root, for the real libcudart.so.13's symbol list; default the
toolkit of launch/install-cuda-toolkit.sh), CC (default cc).
USAGE
}

OUT=${SEPDIST_CUDA_STUBS:-$HOME/.cache/sepdist/cuda13-stubs}
archives=()
print_dir=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --out) OUT=$2; shift 2 ;;
        --archive) archives+=("$2"); shift 2 ;;
        --print-dir) print_dir=1; shift ;;
        *) usage >&2; exit 2 ;;
    esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CC=${CC:-cc}

# sonames of the CUDA 13.x / NCCL 2 libraries (what the real libraries carry, hence what a real
# build records as NEEDED): cudarc module -> "library soname".
# The real CUDA 13 libraries (checked on the 13.0 wheels) version their symbols with one node
# named after the soname (cublasCreate_v2@@libcublas.so.13); libcuda and libnccl do not. The
# stubs do the same, so the binary's version needs (readelf -V) match a real build too.
VERSIONED=" cublas cublasLt curand nvrtc cudart "
declare -A SONAME=(
    [driver]="cuda libcuda.so.1"
    [cublas]="cublas libcublas.so.13"
    [cublaslt]="cublasLt libcublasLt.so.13"
    [curand]="curand libcurand.so.10"
    [nvrtc]="nvrtc libnvrtc.so.13"
    [runtime]="cudart libcudart.so.13"
    [nccl]="nccl libnccl.so.2"
)

# The cudarc source that this workspace's Cargo.lock pins.
cudarc_dir() {
    cargo metadata --format-version 1 --features nccl --manifest-path "$ROOT/Cargo.toml" 2>/dev/null \
        | python3 -c '
import json, os, sys
m = json.load(sys.stdin)
p = [p for p in m["packages"] if p["name"] == "cudarc"]
if not p:
    sys.exit("make-link-stubs.sh: cudarc is not in the dependency graph (Cargo.toml features?)")
p.sort(key=lambda p: p["version"])
print(os.path.dirname(p[-1]["manifest_path"]))
'
}
CUDARC=$(cudarc_dir)
[[ -d $CUDARC/src/driver/sys ]] || { echo "make-link-stubs.sh: no cudarc source at $CUDARC" >&2; exit 1; }

# The toolkit of launch/install-cuda-toolkit.sh when CUDA_HOME is not set.
cuda_home=${CUDA_HOME:-${SEPDIST_CUDA_HOME:-$HOME/.cache/sepdist/cuda13}/nvidia/cu13}
real_cudart=""
if [[ -e $cuda_home/lib/libcudart.so.13 ]]; then
    real_cudart=$cuda_home/lib/libcudart.so.13
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Symbol list per library.
for mod in "${!SONAME[@]}"; do
    sys=$CUDARC/src/$mod/sys/mod.rs
    [[ -f $sys ]] || { echo "make-link-stubs.sh: $sys missing (cudarc layout changed?)" >&2; exit 1; }
    grep -oE 'load::<_F>\("[A-Za-z_][A-Za-z0-9_]*"\)' "$sys" | sed -E 's/.*\("([^"]+)"\)/\1/' >"$work/$mod.syms"
done
if [[ -n $real_cudart ]]; then
    nm -D --defined-only "$real_cudart" | awk '$2 ~ /^[TtWiV]$/ {print $3}' | sed 's/@.*//' >>"$work/runtime.syms"
fi
for a in "${archives[@]}"; do
    nm -u "$a" 2>/dev/null | awk '{print $NF}' | grep -E '^(__)?cuda' >>"$work/runtime.syms" || true
done
# Symbols every CUDA C++ object needs from cudart (fat binary registration, launches).
printf '%s\n' __cudaRegisterFatBinary __cudaRegisterFatBinaryEnd __cudaUnregisterFatBinary \
    __cudaRegisterFunction __cudaRegisterVar __cudaPushCallConfiguration __cudaPopCallConfiguration \
    cudaLaunchKernel cudaGetLastError cudaGetErrorString >>"$work/runtime.syms"

# Inputs fingerprint: skip the work when nothing changed.
{
    echo "stubs v4 $CUDARC $CC"
    for mod in $(printf '%s\n' "${!SONAME[@]}" | sort); do
        echo "${SONAME[$mod]}"
        sort -u "$work/$mod.syms"
    done
} >"$work/fingerprint"
if [[ -f $OUT/.fingerprint ]] && cmp -s "$work/fingerprint" "$OUT/.fingerprint"; then
    [[ $print_dir -eq 1 ]] && echo "$OUT"
    exit 0
fi

mkdir -p "$work/out"
for mod in "${!SONAME[@]}"; do
    read -r lib soname <<<"${SONAME[$mod]}"
    src=$work/$lib.c
    {
        echo "/* link-only stub for $soname, generated by sepdist launch/make-link-stubs.sh */"
        echo "void sepdist_link_stub_trap(void) { __builtin_trap(); }"
        echo "void *sepdist_link_stub_noop(void) { return 0; }"
        echo "int sepdist_link_stub_no_device(void) { return 100; /* CUDA_ERROR_NO_DEVICE */ }"
        echo "int sepdist_link_stub_invalid_value(void) { return 1; /* CUDA_ERROR_INVALID_VALUE */ }"
        sort -u "$work/$mod.syms" | while read -r s; do
            # Fat-binary registration runs from static constructors of CUDA objects at program
            # start: a no-op, so that the binary starts (e.g. --version) with the stubs.
            case "$s" in
                __cudaRegister* | __cudaUnregister*) target=sepdist_link_stub_noop ;;
                # Only in libcuda's list: "no GPU here" for every device probe.
                cuInit) [[ $lib == cuda ]] && target=sepdist_link_stub_no_device || target=sepdist_link_stub_trap ;;
                cuGetErrorString | cuGetErrorName) [[ $lib == cuda ]] && target=sepdist_link_stub_invalid_value || target=sepdist_link_stub_trap ;;
                *) target=sepdist_link_stub_trap ;;
            esac
            echo "void $s(void) __attribute__((alias(\"$target\")));"
        done
    } >"$src"
    n=$(sort -u "$work/$mod.syms" | wc -l)
    [[ $n -gt 0 ]] || { echo "make-link-stubs.sh: no symbols found for $lib" >&2; exit 1; }
    vflags=()
    if [[ $VERSIONED == *" $lib "* ]]; then
        echo "$soname { global: *; };" >"$work/$lib.map"
        vflags=(-Wl,--version-script="$work/$lib.map")
    fi
    "$CC" -shared -fPIC -nostdlib -O0 -w -Wl,-soname,"$soname" "${vflags[@]}" -o "$work/out/$soname" "$src"
    ln -sf "$soname" "$work/out/lib$lib.so"
done
cp "$work/fingerprint" "$work/out/.fingerprint"
mkdir -p "$(dirname "$OUT")"
rm -rf "$OUT.old"
[[ -e $OUT ]] && mv "$OUT" "$OUT.old"
mv "$work/out" "$OUT"
rm -rf "$OUT.old"
[[ $print_dir -eq 1 ]] && echo "$OUT"
exit 0
