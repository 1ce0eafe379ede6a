#!/usr/bin/env bash
# GPU benchmark entry point; runs ON the device machine from the repository root:
#     bash benchmarks/gpu/run.sh STAGE...      (wheels in .whl/, from benchmarks/gpu/fetch_wheels.sh)
# Stages (each at most ~9 minutes, so one `run` call each; /tmp survives between calls while the
# machine is warm, and every stage rebuilds what it needs when it is missing):
#   validate   3B shape, few steps: every engine, the varlen kernel check, the checkpoint scenario
#   8b-engines 8B shape: bare Unsloth (seeds' and automatic configs, plain and varlen) and HF + PEFT + bnb
#   8b-trainer 8B shape: our trainer (seeds' config as committed, automatic config with the hooks),
#              and the checkpoint cost against moto's S3 server
#   8b-export  8B shape (3B when /dev/shm is small): the trainer's export (merge, f16 GGUF, the
#              EXPORT_QUANT types, default q8_0, llama.cpp runs), timed per stage; needs .whl-llama/
#              (benchmarks/gpu/fetch_llama_tools.sh) carried too; resumes where a cut call stopped
# Every stage ends with report.py over all results so far: $OUT/results.{json,md}, plot.png.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/bench-out}
RES=/tmp/bench-results
mkdir -p "$OUT" "$RES" /tmp/models /tmp/data
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
    UNSLOTH_DISABLE_STATISTICS=1 TOKENIZERS_PARALLELISM=false UNSLOTH_COMPILE_LOCATION=/tmp/unsloth_compiled_cache
if [ ! -f /tmp/site/.installed ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    touch /tmp/site/.installed
fi
export PYTHONPATH=/tmp/site
B=benchmarks/gpu
log() { echo "== $(date -u +%H:%M:%S) $*"; }
# A failing step is reported and the stage goes on: one broken engine must not hide the others.
step() { log "$1"; shift; "$@" || echo "!! FAILED ($?): $*"; }
keep_logs() { (cd /tmp && find bench-trainer -name '*.log' -o -name 'job.yaml' | tar czf "$OUT/logs.tgz" -T - 2>/dev/null) || true; }
trap keep_logs EXIT
model() { [ -f "/tmp/models/$1/bench-params.json" ] || { log "build $1"; python3 $B/prepare.py model "$1" "/tmp/models/$1"; }; }
data() { for d in medical alpaca; do [ -f "/tmp/data/$d.jsonl" ] || python3 $B/prepare.py data $d /tmp/data/$d.jsonl; done; }
versions() {
    python3 - <<'PY' > "$RES/env.json"
import json, subprocess, importlib.metadata as m, torch
names = ["torch", "transformers", "peft", "trl", "unsloth", "unsloth_zoo", "bitsandbytes", "accelerate", "datasets", "triton"]
gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                     capture_output=True, text=True).stdout.strip()
print(json.dumps({"gpu": gpu, "cuda": torch.version.cuda, "versions": {n: m.version(n) for n in names}}))
PY
}
[ -f "$RES/env.json" ] || versions
data
for stage in "$@"; do
    case $stage in
    validate)
        model llama-3b
        step "varlen kernel check" python3 $B/check_varlen.py "$RES/varlen-check.json"
        step "unsloth 3b" env BENCH_PROFILE_DIR=$RES python3 $B/bench_unsloth.py /tmp/models/llama-3b /tmp/data "$RES/validate.json" \
            medical:2x4:plain:6 alpaca:tok8192:plain:6p alpaca:tok8192:varlen:6p
        step "hf 3b" python3 $B/bench_hf.py /tmp/models/llama-3b /tmp/data "$RES/validate.json" medical:2x4:6
        step "trainer 3b" python3 $B/bench_trainer.py /tmp/models/llama-3b /tmp/data "$RES/validate.json" \
            medical:2x4:6 alpaca:auto:6 medical:auto:ckpt
        ;;
    8b-engines)
        model llama-8b
        step "unsloth 8b" env BENCH_PROFILE_DIR=$RES python3 $B/bench_unsloth.py /tmp/models/llama-8b /tmp/data \
            "$RES/8b.json" medical:2x4:plain:10 alpaca:2x4:plain:10 medical:auto:plain:7 medical:auto:varlen:8p \
            alpaca:auto:plain:6 alpaca:auto:varlen:8p alpaca:tok16384:varlen:7
        step "hf 8b" timeout 170 python3 $B/bench_hf.py /tmp/models/llama-8b /tmp/data "$RES/8b.json" medical:2x4:10
        ;;
    8b-trainer)
        model llama-8b
        step "trainer 8b" python3 $B/bench_trainer.py /tmp/models/llama-8b /tmp/data "$RES/8b.json" \
            medical:2x4:10 alpaca:auto:9 medical:auto:ckpt
        ;;
    8b-checkpoint)  # the checkpoint scenario of 8b-trainer alone
        model llama-8b
        step "trainer 8b checkpoint" python3 $B/bench_trainer.py /tmp/models/llama-8b /tmp/data "$RES/8b.json" \
            medical:auto:ckpt
        ;;
    8b-export)
        if [ ! -d /tmp/site/llama_cpp ]; then
            tar -xzf .whl-llama/llama_cpp.tgz -C /tmp/site
            python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl-llama/*.whl
        fi
        [ -d /tmp/llama.cpp-0.3.36 ] || tar -xzf .whl-llama/converter.tgz -C /tmp
        # The bindings were built elsewhere: fail in a second, not after minutes of merging.
        python3 -c "import llama_cpp; llama_cpp.llama_backend_init(); print(llama_cpp.llama_print_system_info().decode())"
        # The default export (q8_0; f16 as the quantizer's input). Base, merged model and f16 GGUF
        # (16 GB each) plus q8_0 twice (work folder and store) do not fit the 64 GiB disk: base and
        # store go to memory when /dev/shm can hold them, else the 3B shape runs instead.
        shm=$(df -BG --output=avail /dev/shm | tail -1 | tr -dc 0-9)
        if [ "${shm:-0}" -ge 40 ]; then root=/dev/shm/export shape=llama-8b; else root=/tmp/export shape=llama-3b; fi
        df -h /tmp /dev/shm
        step "export $shape" timeout "${EXPORT_TIMEOUT:-500}" env LLAMA_CPP_DIR=/tmp/llama.cpp-0.3.36 \
            python3 $B/bench_export.py "$root" "$RES/export-$shape.json" --store "$root/store" \
            --work /tmp/export-work --shape "$shape" --quant ${EXPORT_QUANT:-q8_0}
        cp "$RES/export-$shape.json" "$OUT/" 2>/dev/null || true
        ;;
    *) echo "unknown stage $stage"; exit 2 ;;
    esac
done
log "report"; python3 $B/report.py "$RES" "$OUT"
