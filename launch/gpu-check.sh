#!/usr/bin/env bash
# The GPU check of issue 7 on a machine with an NVIDIA GPU and the CUDA 13 runtime libraries
# (a Python environment's nvidia-* wheels) but no Rust toolchain, with the executables that
# launch/package-gpu-check.sh built elsewhere (folder gpu-check/):
#   1. the CUDA op tests (every custom op and the whole separator on CUDA against the CPU);
#   2. synthetic data, `sepdist plan --fit` for the GPU's free memory, `sepdist bench` of the
#      fitted setting (a smaller micro-batch, same effective batch, if it runs out of memory),
#      `sepdist train` for a few steps (progress line, validation, checkpoint);
#   3. a table: samples/s, MFU, measured peak memory against the plan's prediction.
# Every stage runs under `timeout` inside one time budget; logs and the table go to $OUT (or
# --out) when set. Exit status 0 only when every stage passed.
set -uo pipefail

usage() {
    cat <<'USAGE'
usage: launch/gpu-check.sh [options]

  --quick              the op tests only
  --skip-ops           no op tests
  --no-fit             bench and train the configured setting (with --set), not `plan --fit`'s
  --dry-run            print the commands, run nothing
  --device cuda|cpu    cuda (default); cpu rehearses bench/plan/train parsing and the table on
                       a machine without a GPU (with --bin, and --set to shrink the model)
  --pkg DIR            package folder (default gpu-check/ at the repository root)
  --bin FILE           this sepdist instead of the package's
  --ops FILE           this op test executable instead of the package's
  --config FILE        (default configs/musdb18_memory_optimized.yaml)
  --set KEY=VALUE      extra override for plan, bench and train (repeatable)
  --steps N            timed bench steps (default 20); --warmup N (default 2)
  --train-steps N      training steps (default 20; 0 skips training)
  --profile-steps N    timed steps of `sepdist bench --profile` after the bench (the step split
                       by block kind, the device synchronized at block boundaries; default 2;
                       0 skips)
  --budget SIZE        memory budget for `plan --fit` (default: the GPU's free memory; cpu:
                       the plan's MemAvailable)
  --time-budget S      seconds for the whole check (default 450)
  --oom-batch N        out-of-memory check (issue 11): micro-batch N of the config, refused
                       before allocation, then started with --force so that the device runs
                       out of memory during a step (default 32; 0 skips)
  --xlarge-steps N     training steps of configs/musdb18_xlarge.yaml with the setting that
                       `plan --fit` gives for the GPU (training.on_oom: refit; default 2; 0 skips)
  --out DIR            where logs and the summary go (default $OUT, else a temporary folder)
Environment: SEPDIST_CUDA_LIBS (colon-separated library folders used instead of searching the
Python environment).
USAGE
}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
pkg="$ROOT/gpu-check"
quick=0
skip_ops=0
no_fit=0
dry=0
device=cuda
bin=""
ops_bin=""
config="$ROOT/configs/musdb18_memory_optimized.yaml"
sets=()
steps=20
warmup=2
train_steps=20
budget=""
time_budget=450
oom_batch=32
xlarge_steps=2
profile_steps=2
out=${OUT:-}

need() {
    [[ $# -ge 2 && -n $2 ]] || { echo "gpu-check: $1 needs a value" >&2; exit 2; }
}
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --quick) quick=1; shift ;;
        --skip-ops) skip_ops=1; shift ;;
        --no-fit) no_fit=1; shift ;;
        --dry-run) dry=1; shift ;;
        --device) need "$@"; device=$2; shift 2 ;;
        --pkg) need "$@"; pkg=$2; shift 2 ;;
        --bin) need "$@"; bin=$2; shift 2 ;;
        --ops) need "$@"; ops_bin=$2; shift 2 ;;
        --config) need "$@"; config=$2; shift 2 ;;
        --set) need "$@"; sets+=(--set "$2"); shift 2 ;;
        --steps) need "$@"; steps=$2; shift 2 ;;
        --warmup) need "$@"; warmup=$2; shift 2 ;;
        --train-steps) need "$@"; train_steps=$2; shift 2 ;;
        --budget) need "$@"; budget=$2; shift 2 ;;
        --time-budget) need "$@"; time_budget=$2; shift 2 ;;
        --out) need "$@"; out=$2; shift 2 ;;
        --oom-batch) need "$@"; oom_batch=$2; shift 2 ;;
        --xlarge-steps) need "$@"; xlarge_steps=$2; shift 2 ;;
        --profile-steps) need "$@"; profile_steps=$2; shift 2 ;;
        *) echo "gpu-check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
case "$device" in
    cuda | cpu) ;;
    *) echo "gpu-check: --device must be cuda or cpu, not '$device'" >&2; exit 2 ;;
esac
for n in "$steps" "$warmup" "$train_steps" "$time_budget" "$oom_batch" "$xlarge_steps" "$profile_steps"; do
    [[ $n =~ ^[0-9]+$ ]] || { echo "gpu-check: '$n' is not a whole number" >&2; exit 2; }
done

start=$(date +%s)
deadline=$((start + time_budget))
work=$(mktemp -d /tmp/gpu-check.XXXXXX)
if [[ -z $out ]]; then
    out="$work/out"
fi
mkdir -p "$out"
# The data, the run and the unpacked executables go; the logs stay.
trap 'rm -rf "$work/data" "$work/run" "$work/bin" "$work/data_xlarge" "$work/oom" "$work/xlarge"' EXIT
# The whole transcript goes to the console and to gpu-check.log.
exec > >(tee "$out/gpu-check.log") 2>&1

failures=()
notes=()
fail() {
    failures+=("$1")
    echo "FAIL: $1"
}
note() {
    notes+=("$1")
    echo "note: $1"
}
say() {
    printf '[%4ds] %s\n' "$(($(date +%s) - start))" "$*"
}

# Seconds a stage may take: what it wants, capped by the time left less 15 s for the summary.
# Prints 0 when less than 10 s would be left.
allow() {
    local left=$((deadline - $(date +%s) - 15))
    local t=$1
    ((t > left)) && t=$left
    ((t < 10)) && t=0
    echo "$t"
}

# run_stage NAME SECONDS LOG CMD...: runs CMD under timeout, output to the console and LOG
# (appended); returns CMD's status, 124 on timeout, 125 when no time is left.
run_stage() {
    local name=$1 want=$2 logf=$3
    shift 3
    if [[ $dry -eq 1 ]]; then
        printf 'would run (%s, at most %ss): %s\n' "$name" "$want" "$*"
        return 0
    fi
    local t
    t=$(allow "$want")
    if [[ $t -eq 0 ]]; then
        fail "$name: no time left in the ${time_budget}s budget"
        return 125
    fi
    say "$name (at most ${t}s): $*"
    echo "\$ $*" >>"$logf"
    timeout --kill-after=10 "$t" "$@" 2>&1 | tee -a "$logf"
    local rc=${PIPESTATUS[0]}
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then
        echo "$name: stopped after ${t}s (timeout)" | tee -a "$logf"
        rc=124
    fi
    say "$name: exit status $rc"
    return "$rc"
}

# Decompresses NAME from the package unless given; prints the executable's path.
unpack() {
    local name=$1 given=$2
    if [[ -n $given ]]; then
        echo "$given"
    elif [[ -f $pkg/$name.xz ]]; then
        mkdir -p "$work/bin"
        if command -v xz >/dev/null; then
            xz -dc "$pkg/$name.xz" >"$work/bin/$name" || return 1
        else
            python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
                "$pkg/$name.xz" "$work/bin/$name" || return 1
        fi
        chmod +x "$work/bin/$name"
        echo "$work/bin/$name"
    elif [[ -f $pkg/$name ]]; then
        echo "$pkg/$name"
    fi
}

# The library folders of the Python environment's nvidia-* wheels (CUDA 13 puts them in
# nvidia/cu13/lib; older wheels in nvidia/<name>/lib), colon-separated, cu13 first.
cuda_lib_dirs() {
    python3 - <<'PY' 2>/dev/null
import os, site, sysconfig
roots = []
try:
    import nvidia
    roots += [os.path.abspath(p) for p in nvidia.__path__]
except Exception:
    pass
paths = set()
try:
    paths.update(site.getsitepackages())
except Exception:
    pass
paths.update(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
roots += [os.path.join(p, "nvidia") for p in sorted(paths)]
dirs = []
for r in roots:
    if not os.path.isdir(r):
        continue
    for d in sorted(os.listdir(r), key=lambda d: (d != "cu13", d)):
        lib = os.path.join(r, d, "lib")
        if os.path.isdir(lib) and lib not in dirs:
            dirs.append(lib)
print(":".join(dirs))
PY
}

say "gpu-check: device $device, config $config, budget ${time_budget}s, logs in $out"
[[ -f $pkg/MANIFEST ]] && sed 's/^/  /' "$pkg/MANIFEST"
if [[ $dry -eq 1 ]]; then
    S=${bin:-$pkg/sepdist}
    OPS=${ops_bin:-$pkg/ops_cuda}
else
    S=$(unpack sepdist "$bin") || S=""
    OPS=$(unpack ops_cuda "$ops_bin") || OPS=""
    if [[ -z $S || ! -x $S ]]; then
        echo "gpu-check: no sepdist executable (run launch/package-gpu-check.sh first, or --bin)" >&2
        exit 1
    fi
fi

# --- CUDA libraries and the GPU ------------------------------------------------------------
gpu_name=""
gpu_driver=""
free_mib=""
if [[ $device == cuda && $dry -eq 0 ]]; then
    dirs=${SEPDIST_CUDA_LIBS:-$(cuda_lib_dirs)}
    # libcuda.so.1 comes with the driver, outside the wheels.
    for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu; do
        [[ -e $d/libcuda.so.1 ]] && dirs="$dirs:$d"
    done
    dirs=${dirs#:}
    if [[ -z $dirs ]]; then
        fail "no CUDA 13 libraries found (no site-packages/nvidia/*/lib; set SEPDIST_CUDA_LIBS)"
    fi
    export LD_LIBRARY_PATH="$dirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    for exe in "$S" "$OPS"; do
        [[ -n $exe ]] || continue
        missing=$(ldd "$exe" 2>&1 | grep 'not found' | awk '{print $1}' | tr '\n' ' ')
        [[ -z $missing ]] || fail "$(basename "$exe") cannot load: $missing"
    done
    if command -v nvidia-smi >/dev/null; then
        smi=$(nvidia-smi --query-gpu=name,driver_version,memory.total,memory.free \
            --format=csv,noheader,nounits -i 0 2>&1)
        echo "nvidia-smi: $smi"
        IFS=',' read -r gpu_name gpu_driver _ free_mib <<<"$smi"
        gpu_name=$(echo "$gpu_name" | xargs)
        gpu_driver=$(echo "$gpu_driver" | xargs)
        free_mib=$(echo "$free_mib" | xargs)
        [[ $free_mib =~ ^[0-9]+$ ]] || { fail "nvidia-smi gave no free memory: $smi"; free_mib=""; }
    else
        fail "nvidia-smi not found: no NVIDIA driver on this machine"
    fi
fi

# --- 1. op tests -------------------------------------------------------------------------------
ops_log="$out/ops.log"
: >"$ops_log"
if [[ $device == cpu ]]; then
    note "op tests not run: they compare CUDA with the CPU (rehearsal on the CPU)"
elif [[ $skip_ops -eq 1 ]]; then
    note "op tests not run (--skip-ops)"
elif [[ -z $OPS ]]; then
    fail "no op test executable (ops_cuda) in $pkg"
else
    # SEPDIST_REQUIRE_CUDA=1: a test that cannot open the device fails instead of skipping.
    # A failed comparison panics in an assert: the message says it all, a backtrace would not.
    SEPDIST_REQUIRE_CUDA=1 RUST_BACKTRACE=0 run_stage "op tests" 180 "$ops_log" "$OPS" \
        --test-threads=1 --nocapture
    rc=$?
    if [[ $dry -eq 0 ]]; then
        if grep -q '^skipped:\|skipped: no CUDA device' "$ops_log"; then
            fail "op tests skipped: no CUDA device opened"
        fi
        if [[ $rc -ne 0 ]] || ! grep -q '^test result: ok' "$ops_log"; then
            result=$(grep -m1 '^test result:' "$ops_log")
            first=$(grep -m1 -A1 'panicked at' "$ops_log" | tail -1)
            fail "op tests failed (status $rc; ${result:-no test result}); first: $first"
        fi
    fi
fi

# --- 2. data, plan, bench, train ---------------------------------------------------------------
plan_log="$out/plan.log"
bench_log="$out/bench.log"
train_log="$out/train.log"
: >"$plan_log"
: >"$bench_log"
: >"$train_log"
fit_sets=()
run_sets=()
plan_device=cpu
case "$gpu_name" in
    *H200* | *H100*) plan_device=h200 ;;
    *"RTX PRO 6000"*) plan_device=rtx-pro-6000 ;;
    "") [[ $device == cuda ]] && plan_device=h200 ;;
    *) plan_device=h200; note "planner has no spec for '$gpu_name': planning as h200 with its free memory" ;;
esac
[[ $device == cuda && -z $budget && -n $free_mib ]] && budget="${free_mib}MiB"
precision=fp32
bench_ok=0
bench_rc=1
train_ok=0

# micro-batch and accumulation of the config with `sets` and ARGS applied.
setting_of() {
    "$S" config show "$config" "${sets[@]}" "$@" 2>/dev/null |
        awk '$1 == "batch_size:" {b = $2} $1 == "gradient_accumulation_steps:" {a = $2}
             $1 == "precision:" {p = $2} END {print b, a, p}'
}

if [[ $quick -eq 0 ]]; then
    dev_flag=()
    if [[ $dry -eq 1 ]] || "$S" bench --help 2>/dev/null | grep -q -- '--device'; then
        dev_flag=(--device "$device")
    elif [[ $device == cuda ]]; then
        fail "this sepdist has no --device option: it cannot train on CUDA (rebuild the package)"
    else
        note "this sepdist has no --device option: bench and train run on its default device (the CPU)"
    fi
    data="$work/data"
    # 12 s tracks: longer than the 10 s segments; synth_000 is held out for validation.
    run_stage "synthetic data" 90 "$train_log" "$S" data synth --config "$config" \
        --out "$data" --tracks 4 --seconds 12 || fail "sepdist data synth failed"

    plan_args=(plan --config "$config" "${sets[@]}" --device "$plan_device")
    [[ -n $budget ]] && plan_args+=(--budget "$budget")
    if [[ $no_fit -eq 1 ]]; then
        run_stage "plan" 60 "$plan_log" "$S" "${plan_args[@]}"
    else
        run_stage "plan --fit" 60 "$plan_log" "$S" "${plan_args[@]}" --fit
    fi
    rc=$?
    if [[ $no_fit -eq 1 ]]; then
        [[ $rc -eq 0 || $rc -eq 3 ]] || fail "sepdist plan failed (status $rc)"
    elif [[ $dry -eq 1 ]]; then
        fit_sets=(--set "training.batch_size=<fitted>" --set "training.gradient_accumulation_steps=<fitted>")
    elif [[ $rc -eq 0 ]]; then
        line=$(grep -m1 -A1 '^fit:' "$plan_log" | grep -E '^ +--set ' | head -1)
        read -r -a fit_sets <<<"$line"
        say "fitted: ${fit_sets[*]:-the configured setting}"
    elif [[ $rc -eq 3 ]]; then
        fail "plan --fit: nothing fits ${budget:-the budget}; running the configured setting"
    else
        fail "sepdist plan failed (status $rc)"
    fi

    read -r mb acc precision <<<"$(setting_of "${fit_sets[@]}")"
    [[ $mb =~ ^[0-9]+$ && $acc =~ ^[0-9]+$ ]] || { mb=1; acc=1; }
    precision=${precision:-fp32}
    common=(--config "$config" --set "dataset.root=$data" "${sets[@]}")
    run_sets=("${fit_sets[@]}")
    # Device memory in use, sampled every 200 ms while a stage runs (nvidia-smi).
    smi_sample() {
        [[ $device == cuda && $dry -eq 0 ]] && command -v nvidia-smi >/dev/null || return 0
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 -lms 200 >"$1" 2>/dev/null &
        echo $! >"$1.pid"
    }
    smi_stop() {
        [[ -f $1.pid ]] || return 0
        kill "$(cat "$1.pid")" 2>/dev/null
        wait "$(cat "$1.pid")" 2>/dev/null
        rm -f "$1.pid"
    }
    if [[ $device == cuda && $dry -eq 0 ]] && command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 >"$work/smi_idle.txt" 2>/dev/null
    fi

    # Bench; out of memory: half the micro-batch, twice the accumulation (same effective batch).
    while :; do
        smi_sample "$work/smi_bench.txt"
        run_stage "bench ${mb}×${acc}" 200 "$bench_log" "$S" bench "${dev_flag[@]}" "${common[@]}" \
            "${run_sets[@]}" --steps "$steps" --warmup "$warmup"
        rc=$?
        bench_rc=$rc
        smi_stop "$work/smi_bench.txt"
        if [[ $rc -eq 0 ]]; then
            bench_ok=1
            break
        fi
        [[ $dry -eq 1 ]] && break
        if [[ $rc -ne 124 && $rc -ne 125 ]] && tail -n 50 "$bench_log" | grep -qi 'out of memory\|OUT_OF_MEMORY' && [[ $mb -gt 1 ]]; then
            note "bench ran out of memory at micro-batch $mb × accumulation $acc (planned to fit)"
            if ((mb % 2 == 0)); then
                mb=$((mb / 2)); acc=$((acc * 2))
            else
                acc=$((acc * mb)); mb=1
            fi
            run_sets=(--set "training.batch_size=$mb" --set "training.gradient_accumulation_steps=$acc")
            continue
        fi
        fail "sepdist bench failed (status $rc) at micro-batch $mb × accumulation $acc"
        break
    done
    # The plan's prediction for the setting that ran (when it differs from the fitted one).
    if [[ $dry -eq 0 && "${run_sets[*]}" != "${fit_sets[*]}" ]]; then
        run_stage "plan of the setting run" 30 "$plan_log" "$S" "${plan_args[@]}" "${run_sets[@]}" ||
            fail "sepdist plan of micro-batch $mb × accumulation $acc failed"
    fi

    # Where the step goes, block kind by block kind (a run of its own: the synchronization
    # at every block boundary would slow the bench's figures).
    if [[ $profile_steps -gt 0 && ($bench_ok -eq 1 || $dry -eq 1) ]]; then
        run_stage "profile" 120 "$out/profile.log" "$S" bench "${dev_flag[@]}" "${common[@]}" \
            "${run_sets[@]}" --steps "$profile_steps" --warmup 1 --profile ||
            fail "sepdist bench --profile failed"
    fi

    # A bench too slow for its time still lets the training steps measure the rate.
    if [[ $train_steps -eq 0 ]]; then
        note "train not run (--train-steps 0)"
    elif [[ $bench_ok -eq 1 || $bench_rc -eq 124 || $dry -eq 1 ]]; then
        run_dir="$work/run"
        smi_sample "$work/smi_train.txt"
        run_stage "train" 200 "$train_log" "$S" train "${dev_flag[@]}" "${common[@]}" "${run_sets[@]}" \
            --set "training.max_steps=$train_steps" --set training.log_every=1 \
            --set "training.eval_every=$train_steps" --set training.checkpoint_every=0 \
            --set "dataset.validation_tracks=[synth_000]" --set "training.output_dir=$run_dir" \
            --memory-report
        rc=$?
        smi_stop "$work/smi_train.txt"
        if [[ $dry -eq 0 ]]; then
            [[ -f $run_dir/metrics.jsonl ]] && cp "$run_dir/metrics.jsonl" "$out/metrics.jsonl"
            steps_seen=$(grep -cE '^epoch [0-9]+ step [0-9]+/[0-9]+: loss=' "$train_log")
            if [[ $rc -ne 0 ]]; then
                fail "sepdist train failed (status $rc)"
            elif [[ $steps_seen -ne $train_steps ]]; then
                fail "sepdist train printed $steps_seen progress lines, expected $train_steps"
            elif grep -E '^epoch [0-9]+ step' "$train_log" | grep -qiE 'loss=(nan|inf)'; then
                fail "sepdist train: a non-finite loss"
            else
                train_ok=1
            fi
        fi
    else
        note "train not run: bench failed"
    fi
fi

# --- 4. out of memory (issue 11) and the xlarge preset --------------------------------------------
oom_log="$out/oom.log"
xlarge_log="$out/xlarge.log"
: >"$oom_log"
: >"$xlarge_log"
oom_result=""
xlarge_result=""
if [[ $quick -eq 0 && $oom_batch -gt 0 ]]; then
    oom_sets=(--set "training.batch_size=$oom_batch" --set training.gradient_accumulation_steps=1
        --set training.max_steps=2 --set training.eval_every=0 --set training.checkpoint_every=0
        --set "training.output_dir=$work/oom")
    # Refused before anything is allocated: exit 4 and the fitted overrides.
    run_stage "oom: pre-flight, micro-batch $oom_batch" 60 "$oom_log" "$S" train "${dev_flag[@]}" \
        "${common[@]}" "${oom_sets[@]}"
    rc=$?
    if [[ $dry -eq 0 ]]; then
        if [[ $rc -eq 4 ]] && grep -q 'nothing was allocated' "$oom_log"; then
            oom_result="pre-flight refused micro-batch $oom_batch (exit 4)"
        else
            fail "oom: the pre-flight did not refuse micro-batch $oom_batch (status $rc)"
        fi
    fi
    # Started anyway: the device runs out of memory inside a step; a diagnosis, no backtrace.
    mark=$(wc -l <"$oom_log")
    RUST_BACKTRACE=1 run_stage "oom: run time, micro-batch $oom_batch, --force" 120 "$oom_log" "$S" \
        train "${dev_flag[@]}" "${common[@]}" "${oom_sets[@]}" --force
    rc=$?
    if [[ $dry -eq 0 ]]; then
        tail_part=$(tail -n +"$((mark + 1))" "$oom_log")
        if grep -qi 'panicked\|stack backtrace' <<<"$tail_part"; then
            fail "oom: run time: a panic or backtrace instead of the diagnosis (status $rc)"
        elif [[ $rc -eq 4 ]] && grep -qi 'out of memory' <<<"$tail_part"; then
            oom_result+="; --force: CUDA out of memory diagnosed at run time (exit 4)"
        else
            fail "oom: run time: status $rc without the out-of-memory diagnosis"
        fi
    fi
fi
if [[ $quick -eq 0 && $xlarge_steps -gt 0 ]]; then
    xconfig="$ROOT/configs/musdb18_xlarge.yaml"
    xdata="$work/data_xlarge"
    # 17 s tracks: longer than the preset's 15 s segments.
    run_stage "xlarge: synthetic data" 60 "$xlarge_log" "$S" data synth --config "$xconfig" \
        --out "$xdata" --tracks 3 --seconds 17 || fail "xlarge: sepdist data synth failed"
    xplan=(plan --config "$xconfig" --device "$plan_device")
    [[ -n $budget ]] && xplan+=(--budget "$budget")
    run_stage "xlarge: plan --fit" 60 "$xlarge_log" "$S" "${xplan[@]}" --fit
    xfit=()
    if [[ $dry -eq 0 ]]; then
        line=$(grep -m1 -A1 '^fit:' "$xlarge_log" | grep -E '^ +--set ' | head -1)
        read -r -a xfit <<<"$line"
    fi
    mark=$(wc -l <"$xlarge_log")
    smi_sample "$work/smi_xlarge.txt"
    run_stage "xlarge: train $xlarge_steps steps ${xfit[*]}" 200 "$xlarge_log" "$S" train \
        "${dev_flag[@]}" --config "$xconfig" --set "dataset.root=$xdata" "${xfit[@]}" \
        --set "training.max_steps=$xlarge_steps" --set training.log_every=1 \
        --set training.eval_every=0 --set training.checkpoint_every=0 --set training.on_oom=refit \
        --set "dataset.validation_tracks=[synth_000]" --set "training.output_dir=$work/xlarge" \
        --memory-report
    rc=$?
    smi_stop "$work/smi_xlarge.txt"
    if [[ $dry -eq 0 ]]; then
        tail_part=$(tail -n +"$((mark + 1))" "$xlarge_log")
        seen=$(grep -cE '^epoch [0-9]+ step [0-9]+/[0-9]+: loss=' <<<"$tail_part")
        # The trainer's refit lines only (the echoed command line also says on_oom=refit).
        refits=$(grep -c '^training.on_oom: refit: ' <<<"$tail_part")
        xlarge_result="${xfit[*]:-as configured}: status $rc, $seen of $xlarge_steps steps"
        [[ $refits -gt 0 ]] && xlarge_result+=", refit lines: $refits"
        [[ $rc -eq 0 && $seen -eq $xlarge_steps ]] || fail "xlarge: $xlarge_result"
    fi
fi

# --- 5. summary --------------------------------------------------------------------------------
if [[ $dry -eq 1 ]]; then
    say "dry run: nothing was run"
    exit 0
fi
export GC_OUT="$out" GC_WORK="$work" GC_DEVICE="$device" GC_GPU="$gpu_name" GC_DRIVER="$gpu_driver"
export GC_PLAN_DEVICE="$plan_device" GC_PRECISION="$precision" GC_QUICK="$quick"
export GC_SETTING="${run_sets[*]:-}" GC_FITTED="${fit_sets[*]:-}" GC_BUDGET="$budget"
export GC_BENCH_OK="$bench_ok" GC_TRAIN_OK="$train_ok"
export GC_OOM="$oom_result" GC_XLARGE="$xlarge_result"
export GC_COMMIT
GC_COMMIT=$(grep -m1 '^commit:' "$pkg/MANIFEST" 2>/dev/null | cut -d' ' -f2-)
python3 - <<'PY' | tee "$out/summary.txt"
import json, os, re

env = os.environ
out = env["GC_OUT"]

def read(name):
    try:
        with open(os.path.join(out, name)) as f:
            return f.read()
    except OSError:
        return ""

UNITS = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}

def size(text):
    """Bytes of '83.6 GB' (the planner's decimal units)."""
    v, u = text.split()
    return float(v) * UNITS[u]

def run_lines(text):
    """A `sepdist train` log's progress lines and its --memory-report peak line (or None)."""
    lines = re.findall(r"^epoch \d+ step \d+/\d+: .*$", text, re.M)
    rep = re.search(r"^  peak allocated .*$", text, re.M)
    return lines, rep.group(0).strip() if rep else None

def gb(x):
    if x is None:
        return "n/a"
    return f"{x / 1e9:.2f} GB" if x >= 1e9 else f"{x / 1e6:.1f} MB"

def pct(measured, predicted):
    if measured is None or not predicted:
        return ""
    d = 100.0 * (measured - predicted) / predicted
    flag = "" if abs(d) <= 10 else "  (outside issue 7's 10 %)"
    return f"{d:+.1f} % vs plan{flag}"

summary = {"device": env["GC_DEVICE"], "gpu": env["GC_GPU"], "driver": env["GC_DRIVER"],
           "commit": env.get("GC_COMMIT", "")}
rows = []

# Op tests.
ops = read("ops.log")
m = re.search(r"^test result: ok\. (\d+) passed", ops, re.M)
worst = [float(x) for x in re.findall(r"worst relative difference ([0-9.eE+-]+)", ops)]
worst += [float(x) for x in re.findall(r"gradients, worst ([0-9.eE+-]+)", ops)]
worst16 = [float(x) for x in re.findall(r"bf16 against the CPU's fp32 ([0-9.eE+-]+)", ops)]
if m:
    summary["op_tests_passed"] = int(m.group(1))
    summary["op_worst_relative_bf16"] = max(worst16) if worst16 else None
    summary["op_worst_relative"] = max(worst) if worst else None
    rows.append(("op tests (CUDA vs CPU)", f"{m.group(1)} passed, worst relative difference "
                 + (f"{max(worst):.1e}" if worst else "n/a")
                 + (f"; bf16 against the CPU's fp32 {max(worst16):.1e}" if worst16 else "")))
elif env["GC_DEVICE"] == "cuda":
    rows.append(("op tests (CUDA vs CPU)", "FAILED or not run (ops.log)"))

# The plan: the last prediction printed is the setting that ran.
plan = read("plan.log")
preds = re.findall(r"predicted peak ([0-9.]+ [kMGT]?B)", plan)
predicted = size(preds[-1]) if preds else None
summary["plan_peak_bytes"] = predicted

bench = read("bench.log")
# The last (passing) bench's figures.
last = bench.rsplit("$ ", 1)[-1]
def num(pattern, text=last):
    m = re.search(pattern, text, re.M)
    return float(m.group(1)) if m else None
step = num(r"^median step\s+([0-9.]+) s")
sps = num(r"^samples/s\s+([0-9.]+)")
fwd = num(r"^model FLOPs\s+([0-9.]+) GFLOP forward per sample")
threads = num(r"× (\d+) thread\(s\)")
gbatch = num(r"global batch (\d+)")
bench_mem = {k: float(v) * 2**30 for k, v in re.findall(r"^(peak heap|peak RSS)\s+([0-9.]+) GiB", last, re.M)}
# The device's memory pool: `peak cuda:0   X GiB allocated, Y GiB reserved (memory pool)`.
m = re.search(r"^peak (\S+)\s+([0-9.]+) GiB allocated, ([0-9.]+) GiB reserved", last, re.M)
if m:
    bench_mem[f"peak allocated ({m.group(1)} pool)"] = float(m.group(2)) * 2**30
    bench_mem[f"peak reserved ({m.group(1)} pool)"] = float(m.group(3)) * 2**30

if env["GC_QUICK"] != "1":
    rows.append(("setting", (env["GC_SETTING"] or "as configured")
                 + f"; {env['GC_PRECISION']}; fitted by plan for {env['GC_BUDGET'] or 'the default budget'}"
                 + ("" if env["GC_SETTING"] == env["GC_FITTED"] else f" (fitted: {env['GC_FITTED']})")))
    metrics = [json.loads(l) for l in read("metrics.jsonl").splitlines() if l.startswith("{")]
    train = [m for m in metrics if m.get("kind") == "train"]
    if step is not None and env["GC_BENCH_OK"] == "1":
        summary.update(median_step_s=step, samples_per_s=sps, global_batch=gbatch)
        rows.append(("bench", f"median step {step:.4f} s, {sps:.3f} samples/s (global batch {gbatch:.0f})"))
    else:
        rows.append(("bench", "FAILED or not run (bench.log)"))
        # The training steps' own rate instead (median, the first two steps left out).
        rates = sorted(m["samples_per_s"] for m in train[2:] if m.get("samples_per_s"))
        if rates:
            sps = rates[len(rates) // 2]
            summary["samples_per_s"] = sps
            rows.append(("train samples/s", f"{sps:.3f} (median of steps 3..{len(train)} in metrics.jsonl)"))
        m = re.search(r"^FLOPs: ([0-9.]+) ([PTGM]?)FLOP forward per sample", plan, re.M)
        if m:
            fwd = float(m.group(1)) * {"P": 1e6, "T": 1e3, "G": 1, "M": 1e-3, "": 1e-9}[m.group(2)]
    if sps and fwd is not None:
        # Model FLOPs: forward + backward = 3 × forward per sample (recomputation not counted).
        gpu = env["GC_GPU"]
        if env["GC_DEVICE"] == "cpu":
            # The planner's CPU spec: 50 GFLOP/s per thread.
            peak, what = (threads or 1) * 50e9, f"{threads or 1:.0f} threads × 50 GFLOP/s (the planner's CPU figure)"
        elif "RTX PRO 6000" in gpu:
            peak, what = ((500e12, "dense bf16 500 TFLOP/s") if env["GC_PRECISION"] == "bf16"
                          else (250e12, "TF32 250 TFLOP/s: an fp32 run against the TF32 tensor-core peak"))
        else:
            peak, what = ((989e12, "H200 dense bf16 989 TFLOP/s") if env["GC_PRECISION"] == "bf16"
                          else (494e12, "H200 TF32 494 TFLOP/s: an fp32 run against the TF32 tensor-core peak"))
        achieved = 3 * fwd * 1e9 * sps
        summary.update(model_flops_per_s=achieved, peak_flops=peak, mfu=achieved / peak)
        rate = f"{achieved / 1e12:.2f} TFLOP/s" if achieved >= 1e12 else f"{achieved / 1e9:.2f} GFLOP/s"
        rows.append(("MFU", f"{100 * achieved / peak:.2f} % = {rate} "
                     f"(3 × {fwd:.4g} GFLOP forward per sample × samples/s) / {what}"))

    # Measured memory against the plan.
    rows.append(("plan's predicted peak", gb(predicted) if predicted else "n/a (plan.log)"))
    for k, v in bench_mem.items():
        host = env["GC_DEVICE"] == "cuda" and k in ("peak heap", "peak RSS")
        rows.append((f"bench {k}", f"{gb(v)}  " + ("(host memory)" if host else pct(v, predicted))))
    for key in ("mem_peak_allocated", "mem_peak_reserved"):
        vals = [m[key] for m in train if key in m]
        if vals:
            summary[key] = max(vals)
            rows.append((f"train {key.replace('mem_', '').replace('_', ' ')}",
                         f"{gb(max(vals))}  {pct(max(vals), predicted)}  (metrics.jsonl, largest over {len(vals)} steps)"))
    def smi_peak(name):
        try:
            with open(os.path.join(env["GC_WORK"], name)) as f:
                vals = [int(x) for x in f.read().split() if x.isdigit()]
        except OSError:
            return None
        return max(vals) * 2**20 if vals else None
    idle = smi_peak("smi_idle.txt") or 0
    for stage in ("bench", "train"):
        p = smi_peak(f"smi_{stage}.txt")
        if p is not None:
            used = p - idle
            summary[f"nvidia_smi_{stage}_bytes"] = used
            rows.append((f"device memory used ({stage})", f"{gb(used)}  {pct(used, predicted)}  "
                         "(nvidia-smi, above idle: CUDA context + pool)"))
    # The progress line.
    tlog = read("train.log")
    lines, rep = run_lines(tlog)
    if lines:
        rows.append(("train", f"{len(lines)} progress lines; last: {lines[-1]}"))
        summary["last_progress_line"] = lines[-1]
    val = re.findall(r"^step \d+: validation loss .*$", tlog, re.M)
    if val:
        rows.append(("validation", val[-1]))
    if rep:
        rows.append(("train --memory-report", rep))
    # The profile: each block kind's forward and backward seconds per step and its share.
    prof = read("profile.log")
    m = re.search(r"^profile\s+mean per step ([0-9.]+) s", prof, re.M)
    if m:
        rows.append(("profile", f"mean step {float(m.group(1)):.3f} s (bench --profile: forward s, backward s, share)"))
        for kind, blocks, f, b, share in re.findall(
                r"^  (band split|time transformer|band transformer|head)\s+(\d+)\s+([0-9.]+)\s+([0-9.]+)\s+[0-9.]+\s+([0-9.]+) %$",
                prof, re.M):
            rows.append((f"  {kind} × {blocks}", f"{float(f):.3f} s + {float(b):.3f} s, {share} %"))
            summary.setdefault("profile", []).append(
                {"kind": kind, "blocks": int(blocks), "forward_s": float(f), "backward_s": float(b)})

if env.get("GC_OOM"):
    rows.append(("out of memory", env["GC_OOM"]))
if env.get("GC_XLARGE"):
    rows.append(("xlarge", env["GC_XLARGE"]))
    lines, rep = run_lines(read("xlarge.log"))
    if lines:
        rows.append(("xlarge train", lines[-1]))
    if rep:
        rows.append(("xlarge --memory-report", rep))
    p = smi_peak("smi_xlarge.txt")
    if p is not None:
        rows.append(("device memory used (xlarge)", gb(p - (smi_peak("smi_idle.txt") or 0))))

head = f"gpu-check summary: {env['GC_GPU'] or env['GC_DEVICE']}"
if env["GC_DRIVER"]:
    head += f", driver {env['GC_DRIVER']}"
if summary["commit"]:
    head += f", sepdist {summary['commit']}"
print(head)
width = max((len(k) for k, _ in rows), default=0)
for k, v in rows:
    print(f"  {k:<{width}}  {v}")
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
PY

for n in "${notes[@]}"; do
    echo "note: $n"
done | tee -a "$out/summary.txt"
if [[ ${#failures[@]} -gt 0 ]]; then
    {
        echo "gpu-check FAILED (${#failures[@]}):"
        for f in "${failures[@]}"; do
            echo "  - $f"
        done
    } | tee -a "$out/summary.txt"
    say "done, with failures"
    exit 1
fi
echo "gpu-check passed" | tee -a "$out/summary.txt"
say "done"
