#!/usr/bin/env bash
# Installs the CUDA 13.0 compiler toolkit (nvcc, cudart headers, CCCL, CRT, NVVM) that the
# `cuda` / `nccl` features need at build time, from pinned PyPI wheels, into a cache folder.
# No GPU, driver or root needed. Idempotent and quiet when the toolkit is already there.
#
# Pinned to 13.0: cudarc 0.19.x knows CUDA up to 13.4 (fails on newer), and driver 580 = 13.0.
# nvcc's wheel lists its dependencies unpinned, hence `--no-deps` and an explicit list.
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: launch/install-cuda-toolkit.sh [-h] [--print-home]

Installs nvidia-cuda-nvcc==13.0.88 and the matching runtime/cccl/crt/nvvm wheels with
`pip install --no-deps --target` into ${SEPDIST_CUDA_HOME:-$HOME/.cache/sepdist/cuda13}
(about 100 MB download). The toolkit root (CUDA_HOME) is then <dir>/nvidia/cu13.
--print-home  print that CUDA_HOME on stdout (after installing if needed).
USAGE
}

print_home=0
case "${1:-}" in
    -h | --help) usage; exit 0 ;;
    --print-home) print_home=1 ;;
    "") ;;
    *) usage >&2; exit 2 ;;
esac

DIR=${SEPDIST_CUDA_HOME:-$HOME/.cache/sepdist/cuda13}
CU=$DIR/nvidia/cu13
WHEELS=(
    "nvidia-cuda-nvcc==13.0.88"
    "nvidia-cuda-runtime==13.0.*"
    "nvidia-cuda-cccl==13.0.*"
    "nvidia-cuda-crt==13.0.*"
    "nvidia-nvvm==13.0.*"
)
# A stamp records the pins: changing the list above reinstalls.
STAMP=$DIR/.sepdist-installed
want=$(printf '%s\n' "${WHEELS[@]}")

complete() {
    [[ -f $STAMP && "$(cat "$STAMP")" == "$want" ]] \
        && [[ -x $CU/bin/nvcc ]] \
        && [[ -f $CU/include/cuda_runtime.h ]] \
        && [[ -f $CU/include/cuda_fp16.h ]] \
        && [[ -d $CU/include/cuda/std || -d $CU/include/cccl/cuda/std ]] \
        && compgen -G "$CU/lib/libcudart_static.a" >/dev/null
}

if ! complete; then
    PY=${PYTHON:-$(command -v python3 || command -v python || true)}
    if [[ -z ${PYTHON:-} ]] && { [[ -z $PY ]] || ! "$PY" -m pip --version >/dev/null 2>&1; } \
        && [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        # Fresh Debian/Ubuntu (CI): pip from the distribution. `pip install --target` is not
        # subject to PEP 668's externally-managed-environment refusal.
        echo "install-cuda-toolkit.sh: installing python3-pip" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >/dev/null \
            || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >/dev/null; }
        PY=$(command -v python3 || true)
    fi
    if [[ -z $PY ]] || ! "$PY" -m pip --version >/dev/null 2>&1; then
        echo "install-cuda-toolkit.sh: need python3 with pip (Debian: apt-get install python3-pip; or set PYTHON)" >&2
        exit 1
    fi
    echo "install-cuda-toolkit.sh: installing CUDA 13.0 toolkit wheels into $DIR" >&2
    tmp="$DIR.tmp.$$"
    rm -rf "$tmp"
    mkdir -p "$(dirname "$DIR")"
    log=$(mktemp)
    trap 'rm -rf "$log" "$tmp"' EXIT
    if ! "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --no-compile \
        --only-binary=:all: --target "$tmp" "${WHEELS[@]}" >"$log" 2>&1; then
        cat "$log" >&2
        echo "install-cuda-toolkit.sh: pip install failed" >&2
        exit 1
    fi
    printf '%s\n' "${WHEELS[@]}" >"$tmp/.sepdist-installed"
    rm -rf "$DIR"
    mv "$tmp" "$DIR"
    if ! complete; then
        echo "install-cuda-toolkit.sh: installed, but $CU lacks nvcc, headers or libcudart_static.a" >&2
        exit 1
    fi
    "$CU/bin/nvcc" --version >/dev/null
fi

if [[ $print_home -eq 1 ]]; then
    echo "$CU"
fi
