#!/usr/bin/env bash
# GPU benchmark and GPU tests; runs ON the lent GPU machine from the repository root:
#     bash benchmarks/gpu/run.sh STAGE...
# with the wheels of benchmarks/gpu/fetch_wheels.sh in .whl/ and the llama.cpp bindings and
# converter of benchmarks/gpu/fetch_llama_tools.sh in .whl-llama/ (both carried by the call).
# Every stage rebuilds what it needs when it is missing (/tmp survives between calls while the
# machine is warm), and the report is rebuilt from all results so far at the end.
# Stages:
#   pytest    tests/gpu (marker gpu): the CUDA path on a tiny model (PYTEST_ARGS="-k x" for some); -> pytest-gpu.txt
#   ours      8B shape, our trainer's executions in one process (bench_ours.py): the seeds' 8-row
#             recipe run as written (literal 2 x 4) and as the trainer chooses (auto), both length
#             distributions, large steps, the profile of an 8-row alpaca step
#   tutorial  8B shape, bare Unsloth as the tutorial runs it (bench_tutorial.py): time to model of
#             the seeds' medical recipe and the seeds' config on both distributions
#   start     8B shape, our trainer's CLI on 6 large steps: where the time to the first step goes
#   ttm       8B shape, our trainer's CLI on the seeds' medical recipe to the q8_0 GGUF in storage
#   ckpt      8B shape, our trainer's CLI against moto's S3: checkpoint stall, SIGTERM to S3, resume
#             to the first step from the cached 4-bit weights
#   engines, varlen, export: bare Unsloth and HF + PEFT + bnb at the seeds' config; the varlen
#             attention kernel check; the export alone (EXPORT_QUANT="q8_0 q4_k_m" adds types)
# Figures land in $OUT: latest.json, results.json, results.md, plot.png, pytest-gpu.txt, logs.tgz,
# rewritten after every stage.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/bench-out}
RES=/tmp/bench-results
mkdir -p "$OUT" "$RES" /tmp/data
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
    UNSLOTH_DISABLE_STATISTICS=1 TOKENIZERS_PARALLELISM=false
if [ ! -f /tmp/site/.installed ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl .whl-llama/*.whl
    tar -xzf .whl-llama/llama_cpp.tgz -C /tmp/site
    touch /tmp/site/.installed
fi
[ -d /tmp/llama.cpp-0.3.36 ] || tar -xzf .whl-llama/converter.tgz -C /tmp
export PYTHONPATH=/tmp/site LLAMA_CPP_DIR=/tmp/llama.cpp-0.3.36
B=benchmarks/gpu
log() { echo "== $(date -u +%H:%M:%S) $*"; }
# A failing step is reported and the stage goes on: one broken measurement must not hide the others.
# Each step ends by STAGE_TIMEOUT seconds (default 400) and the whole call by the wall-clock second
# DEADLINE (seconds since the epoch; default none), so that a call never runs past the device's limit
# and the figures of the finished stages always come back.
# Seconds a step may take: STAGE_TIMEOUT, or less where DEADLINE is nearer.
budget() {
    local left=${STAGE_TIMEOUT:-400}
    if [ -n "${DEADLINE:-}" ]; then
        local rest=$((DEADLINE - $(date +%s)))
        [ "$rest" -lt "$left" ] && left=$rest
    fi
    echo "$left"
}
step() {
    local name=$1 left; left=$(budget); shift
    [ "$left" -lt 30 ] && { echo "!! SKIPPED (deadline): $name"; return 0; }
    log "$name (at most ${left}s)"
    timeout --signal=TERM --kill-after=15 "$left" "$@" || echo "!! FAILED ($?): $name"
}
report() { python3 $B/report.py "$RES" "$OUT" | tail -40; keep_logs; }
# $OUT takes 8 files: the report's four, pytest-gpu.txt, and everything else in logs.tgz (the raw
# result files, profiler tables, trainer logs).
keep_logs() {
    (cd /tmp && { ls -d bench-results/* 2>/dev/null; find bench-trainer-* -maxdepth 3 -name '*.log' 2>/dev/null; } \
        | tar czf "$OUT/logs.tgz" -T - 2>/dev/null) || true
}
trap keep_logs EXIT
# The 8B model (16 GB) goes to memory when /dev/shm holds it: written and read at memory speed, as
# from a local disk whose page cache holds it (the machine has 128 GB).
shm=$(df -BG --output=avail /dev/shm | tail -1 | tr -dc 0-9)
MODELS=$([ "${shm:-0}" -ge 40 ] && echo /dev/shm/models || echo /tmp/models)
model() { [ -f "$MODELS/$1/bench-params.json" ] || { log "build $1 in $MODELS"; python3 $B/prepare.py model "$1" "$MODELS/$1"; }; }
data() { for d in medical alpaca; do [ -f "/tmp/data/$d.jsonl" ] || python3 $B/prepare.py data $d /tmp/data/$d.jsonl "$1"; done; }
versions() {
    python3 - <<'PY' > "$RES/env.json"
import json, subprocess, importlib.metadata as m, torch
names = ["torch", "transformers", "peft", "trl", "unsloth", "unsloth_zoo", "bitsandbytes", "accelerate", "datasets", "triton", "llama_cpp_python"]
def version(n):
    try:
        return m.version(n)
    except m.PackageNotFoundError:
        return None
gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                     capture_output=True, text=True).stdout.strip()
print(json.dumps({"gpu": gpu, "cuda": torch.version.cuda, "cpus": __import__("os").cpu_count(), "versions": {n: version(n) for n in names}}))
PY
}
[ -f "$RES/env.json" ] || versions
for stage in "$@"; do
    case $stage in
    pytest)
        log "pytest tests/gpu (at most $(budget)s)"
        set +e
        PYTHONPATH=tests:trainer-image:/tmp/site timeout "$(budget)" python3 -m pytest tests/gpu -m gpu --noconftest \
            -p no:cacheprovider -rA -s ${PYTEST_ARGS:-} 2>&1 | tee "$RES/pytest-gpu.txt" | grep -E "passed|failed|PASSED|FAILED|ERROR|difference"
        set -e
        cp "$RES/pytest-gpu.txt" "$OUT/"
        ;;
    ours)
        model llama-8b; data "$MODELS/llama-8b"
        step "ours 8b" env BENCH_PROFILE_DIR=$RES python3 $B/bench_ours.py "$MODELS/llama-8b" /tmp/data "$RES/ours.json" \
            ${OURS:-medical:2x4:auto:12 medical:2x4:literal:12 alpaca:2x4:auto:12p alpaca:2x4:literal:12 medical:32x1:auto:8 alpaca:128x1:auto:8}
        ;;
    tutorial)
        model llama-8b; data "$MODELS/llama-8b"
        step "tutorial 8b" python3 $B/bench_tutorial.py "$MODELS/llama-8b" /tmp/data "$RES/tutorial.json"
        ;;
    start|ttm|ckpt)
        model llama-8b; data "$MODELS/llama-8b"
        step "trainer 8b $stage" python3 $B/bench_trainer.py "$MODELS/llama-8b" /tmp/data "$RES" "$stage"
        ;;
    engines)  # bare Unsloth (plain and varlen attention) and HF + PEFT + bnb at the seeds' config
        model llama-8b; data "$MODELS/llama-8b"
        step "unsloth 8b" env BENCH_PROFILE_DIR=$RES python3 $B/bench_unsloth.py "$MODELS/llama-8b" /tmp/data \
            "$RES/engines.json" medical:2x4:plain:10 alpaca:2x4:plain:10 alpaca:8x1:varlen:10
        step "hf 8b" timeout 170 python3 $B/bench_hf.py "$MODELS/llama-8b" /tmp/data "$RES/engines.json" medical:2x4:10
        ;;
    varlen)  # one attention layer: per-sequence SDPA against the bundled varlen kernel
        step "varlen kernel check" python3 $B/check_varlen.py "$RES/varlen-check.json"
        ;;
    export)  # the export alone on a random adapter, EXPORT_QUANT types (default q8_0), per stage
        step "export 8b" timeout "${EXPORT_TIMEOUT:-500}" python3 $B/bench_export.py /tmp/export \
            "$RES/export-llama-8b.json" --shape llama-8b --quant ${EXPORT_QUANT:-q8_0}
        ;;
    *) echo "unknown stage $stage"; exit 2 ;;
    esac
    log "report after $stage"; report  # after every stage: a call cut short still returns the rest
done
