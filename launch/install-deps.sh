#!/usr/bin/env bash
# Installs what the `mpi` feature needs to build and test: an MPI (MPICH: runs as root and
# oversubscribes without flags) and libclang (rsmpi's bindgen). Debian/Ubuntu only.
# Idempotent and quiet when everything is present: safe to call from CI on every run.
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: launch/install-deps.sh [-h]

Installs mpich, libmpich-dev and libclang-dev with apt-get when mpirun, mpicc or libclang
is missing (as root, or through sudo). Prints nothing when nothing is missing.
USAGE
}

case "${1:-}" in
    -h | --help) usage; exit 0 ;;
    "") ;;
    *) usage >&2; exit 2 ;;
esac

have_libclang() {
    # bindgen loads libclang.so or libclang-NN.so (not libclang-cpp, a different library);
    # LIBCLANG_PATH overrides the search.
    if [[ -n "${LIBCLANG_PATH:-}" ]] && compgen -G "${LIBCLANG_PATH}/libclang.so*" >/dev/null; then
        return 0
    fi
    if command -v ldconfig >/dev/null 2>&1 && ldconfig -p 2>/dev/null | grep -Eq 'libclang(-[0-9.]+)?\.so'; then
        return 0
    fi
    compgen -G "/usr/lib/llvm-*/lib/libclang.so*" >/dev/null \
        || compgen -G "/usr/lib/llvm-*/lib/libclang-[0-9]*.so*" >/dev/null
}

missing=()
command -v mpirun >/dev/null 2>&1 || missing+=(mpich)
command -v mpicc >/dev/null 2>&1 || missing+=(libmpich-dev)
have_libclang || missing+=(libclang-dev)

if [[ ${#missing[@]} -eq 0 ]]; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-deps.sh: missing ${missing[*]} and no apt-get here: install an MPI (MPICH or OpenMPI) and libclang with your package manager" >&2
    exit 1
fi

if [[ $(id -u) -eq 0 ]]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
else
    echo "install-deps.sh: need root or sudo to install ${missing[*]}" >&2
    exit 1
fi

echo "install-deps.sh: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! { "${SUDO[@]}" apt-get update -qq && "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "install-deps.sh: apt-get failed" >&2
    exit 1
fi
