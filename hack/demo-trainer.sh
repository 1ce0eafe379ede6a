#!/usr/bin/env bash
# The trainer demo: build a tiny Llama + SentencePiece tokenizer locally (no hub), check the
# checked-in example with preflight, train a 4-bit LoRA adapter on the CPU, print where it is.
# Usage: hack/demo-trainer.sh [PYTHON]   (default .venv/bin/python; run from anywhere)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
JOB=examples/tiny/job.yaml
export PYTHONPATH="$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
export FINETUNE_PROGRESS_PORT=${FINETUNE_PROGRESS_PORT:-0}
export FINETUNE_SUMMARY_PATH=out/tiny-demo-summary.json
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if [[ ! -f out/tiny-model/config.json ]]; then
  echo "== building the tiny model in out/tiny-model"
  "$PY" -c 'import sys; from pathlib import Path; from trainer_fixtures import build_tiny_model, demo_text
build_tiny_model(Path("out/tiny-model"), extra_text=demo_text(Path(sys.argv[1])))' examples/tiny/data.jsonl
fi
rm -rf out/tiny-demo  # a fresh run each time (otherwise it resumes from its final checkpoint)

echo "== preflight"
"$PY" -m finetune_trainer preflight "$JOB" --log-format text
echo "== training (CPU, 4-bit NF4 + LoRA)"
start=$(date +%s)
"$PY" -m finetune_trainer run "$JOB" --device cpu
echo "== done in $(( $(date +%s) - start ))s; summary (${FINETUNE_SUMMARY_PATH}):"
"$PY" - "$FINETUNE_SUMMARY_PATH" <<'PYEOF'
import json, sys
s = json.load(open(sys.argv[1]))
for key in ("exitReason", "steps", "finalLoss", "evalLossBefore", "finalEvalLoss", "tokens", "tokensPerSecond",
            "trainSeconds", "checkpointUri"):
    print(f"  {key}: {s.get(key)}")
print(f"adapter: {s.get('adapterUri')}")
for a in s.get("artifacts") or []:
    if a["name"].startswith("gguf-") or a["name"] in ("loss-plot", "metrics", "samples-md"):
        print(f"{a['name']}: {a['uri']} ({a['sizeBytes']} bytes)")
PYEOF
