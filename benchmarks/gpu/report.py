"""Merge the benchmark's result files into latest.json, results.json, results.md and plot.png.

    python report.py RESULTS_DIR OUT_DIR

RESULTS_DIR holds what the stages wrote: env.json, tutorial.json (bare Unsloth, the tutorial's
code path), ours.json (our trainer's executions, bench_ours.py), start.json, ttm.json and
ckpt.json (our trainer's CLI, bench_trainer.py). It runs on the GPU machine at the end of every
stage, and here on fetched files to rebuild the report.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HEADLINE_SHAPE = "llama-8b"
LARGE_STEP_ROWS = 32
"""Rows per optimizer step from which a step counts as large (the issue's batchSize 32 or more)."""


def load(path: Path, default: Any) -> Any:
    return json.loads(path.read_text()) if path.is_file() else default


def ours(rows: list[dict[str, Any]], data: str, split: str, batch: str = "2x4") -> dict[str, Any] | None:
    hits = [
        r
        for r in rows
        if r["shape"] == HEADLINE_SHAPE
        and r["data"] == data
        and r.get("micro_batches") == split
        and r.get("spec_batch") == batch
        and r.get("gradient_checkpointing", "auto") == "auto"
    ]
    return hits[-1] if hits else None


def loss_diff(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    if not a or not b:
        return None
    n = min(len(a["losses"]), len(b["losses"]))
    return round(max(abs(x - y) for x, y in zip(a["losses"][:n], b["losses"][:n], strict=True)), 6)


def large_step(rows: list[dict[str, Any]], data: str) -> dict[str, Any] | None:
    hits = [
        r
        for r in rows
        if r["shape"] == HEADLINE_SHAPE
        and r["data"] == data
        and r["batch"] * r["accumulation"] >= LARGE_STEP_ROWS
        and r.get("gradient_checkpointing", "auto") == "auto"
    ]
    return max(hits, key=lambda r: r["mfu_pct"]) if hits else None


def headline(src: Path) -> dict[str, Any]:
    env = load(src / "env.json", {})
    tutorial = {r["data"]: r for r in load(src / "tutorial.json", [])}
    rows = load(src / "ours.json", [])
    ttm, ckpt = load(src / "ttm.json", {}), load(src / "ckpt.json", {})
    auto = {d: ours(rows, d, "auto") for d in ("medical", "alpaca")}
    literal = {d: ours(rows, d, "literal") for d in ("medical", "alpaca")}
    diffs = [loss_diff(auto[d], literal[d]) for d in ("medical", "alpaca")]
    large = {d: large_step(rows, d) for d in ("medical", "alpaca")}

    def figure(row: dict[str, Any] | None, key: str) -> Any:
        return row.get(key) if row else None

    head = {
        # bench_ours' medical run, or else the CLI's 60 steps of the same recipe (ttm)
        "recipe_tok_s_medical": figure(auto["medical"], "tokens_per_second") or ttm.get("tokens_per_second"),
        "recipe_tok_s_alpaca": figure(auto["alpaca"], "tokens_per_second"),
        "seed_config_tok_s_medical": figure(tutorial.get("medical"), "tokens_per_second"),
        "seed_config_tok_s_alpaca": figure(tutorial.get("alpaca"), "tokens_per_second"),
        "recipe_loss_max_abs_diff": max((d for d in diffs if d is not None), default=None),
        "recipe_loss_max_abs_diff_medical": diffs[0],
        "recipe_loss_max_abs_diff_alpaca": diffs[1],
        "time_to_first_step_s": ttm.get("time_to_first_step_s"),
        "resume_to_first_step_s": ckpt.get("resume_to_first_step_s"),
        "export_default_s": ttm.get("export_default_s"),
        "time_to_model_s": ttm.get("time_to_model_s"),
        "time_to_model_unsloth_s": figure(tutorial.get("medical"), "time_to_model_s"),
        "time_to_model_unsloth_lower_bound_s": figure(tutorial.get("medical"), "time_to_model_lower_bound_s"),
        "large_step_mfu_pct_medical": figure(large["medical"], "mfu_pct"),
        "large_step_mfu_pct_alpaca": figure(large["alpaca"], "mfu_pct"),
        "large_step_config_medical": figure(large["medical"], "note"),
        "large_step_config_alpaca": figure(large["alpaca"], "note"),
        "checkpoint_stall_s": ckpt.get("checkpoint_stall_s"),
        "sigterm_to_s3_s": ckpt.get("sigterm_to_s3_s"),
        "gpu": env.get("gpu"),
        "versions": env.get("versions"),
    }
    head["not_measured"] = sorted(k for k, v in head.items() if v is None and not k.endswith("lower_bound_s"))
    return head


def markdown(rows: list[dict[str, Any]], head: dict[str, Any], extra: dict[str, Any]) -> str:
    lines = [
        "| engine | data | spec | executed | checkpointing | real tok/s | MFU % | peak GiB (reserved) "
        "| tokens/step | s/step | layers kept |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for x in rows:
        lines.append(
            f"| {x['engine']} | {x['data']} | {x.get('spec_batch', '2x4')} {x.get('micro_batches', '')} "
            f"| {x['batch']} x {x['accumulation']} | {x.get('gradient_checkpointing', 'unsloth')} "
            f"| {x['tokens_per_second']:,.0f} | {x['mfu_pct']:.1f} | {x['peak_reserved_gib']:.2f} "
            f"| {x['tokens_per_step']:,.0f} | {x['seconds_per_step']:.3f} | {x.get('layers_kept', '')} |"
        )
    lines += ["", "| headline (8B shape) | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in head.items() if k != "versions"]
    for name, value in extra.items():
        lines += ["", f"{name}:", "", "```", json.dumps(value, indent=1), "```"]
    return "\n".join(lines) + "\n"


def ttm_row(ttm: dict[str, Any]) -> dict[str, Any] | None:
    """The CLI's time-to-model run as a row of the speed table (medical, 2 x 4 run as 8 x 1)."""
    if not ttm.get("tokens_per_second"):
        return None
    return {
        "engine": "ours",
        "shape": HEADLINE_SHAPE,
        "data": "medical",
        "spec_batch": "2x4",
        "micro_batches": "auto (CLI, 60 steps)",
        "batch": 8,
        "accumulation": 1,
        "gradient_checkpointing": "auto",
        "tokens_per_second": ttm["tokens_per_second"],
        "mfu_pct": ttm["mfu_pct"],
        "peak_reserved_gib": ttm.get("peak_gpu_gib") or 0.0,
        "tokens_per_step": ttm["tokens_per_step"],
        "seconds_per_step": ttm["seconds_per_step"],
        "layers_kept": "32 of 32",
    }


def plot(
    rows: list[dict[str, Any]], ttm: dict[str, Any], tutorial: dict[str, Any] | None, path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, clock) = plt.subplots(1, 2, figsize=(13, 5.6), gridspec_kw={"width_ratios": [2, 3]})
    shown = [r for r in rows if r["shape"] == HEADLINE_SHAPE]
    labels = [
        f"{r['engine']}\n{r['data']} {r.get('spec_batch', '2x4')}\nrun as {r['batch']}x{r['accumulation']}"
        for r in shown
    ]
    colors = {"ours": "#2ca02c", "unsloth-tutorial": "#ff7f0e"}
    bars = speed.bar(
        range(len(shown)),
        [r["mfu_pct"] for r in shown],
        color=[colors.get(r["engine"], "#7f7f7f") for r in shown],
    )
    for bar, r in zip(bars, shown, strict=True):
        speed.annotate(
            f"{r['tokens_per_second']:,.0f} tok/s",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    speed.set_xticks(range(len(shown)), labels, fontsize=7, rotation=60, ha="right")
    speed.set_ylabel("MFU % (6N x real tok/s / 989 TFLOP/s)")
    speed.set_title("8B shape: rows per optimizer step as the spec says, run as executed")

    # Time to model, phase by phase: ours from its log, the tutorial as far as it got.
    phases = ttm.get("phases_s") or {}
    marks = [
        ("preflight (imports, data)", phases.get("preflight")),
        ("import unsloth", phases.get("unsloth_imported")),
        ("4-bit load", phases.get("base_loaded")),
        ("LoRA, plans", phases.get("model_loaded")),
        ("trainer + 1st step", phases.get("first_step")),
        ("59 more steps", ttm.get("train_end_s")),
        ("export q8_0", ttm.get("time_to_model_s")),
    ]
    left, palette = 0.0, plt.get_cmap("tab10")
    for i, (name, end) in enumerate(marks):
        if end is None:
            continue
        clock.barh(1, end - left, left=left, color=palette(i), label=name)
        left = end
    if tutorial:
        # The tutorial from its own figures: to the first step, the rest of training, then its
        # export (merge to 16-bit, conversion, store); an unfinished run shows how far it got.
        first = tutorial.get("time_to_first_step_s") or 0.0
        trained = tutorial.get("train_s") or first
        done = tutorial.get("time_to_model_s")
        spans = [
            ("tutorial: imports, 4-bit load, LoRA, 1st step", 0.0, first, "#fdd0a2"),
            ("tutorial: 59 more steps at 2 x 4", first, trained, "#ffbb78"),
            ("tutorial: merge to 16-bit", trained, trained + (tutorial.get("merge_s") or 0), "#c49c94"),
        ]
        if done is not None:
            spans.append(("tutorial: q8_0 conversion, store", spans[-1][2], done, "#8c564b"))
        for name, a, b, color in spans:
            if b > a:
                clock.barh(0, b - a, left=a, color=color, label=name)
        bound = done if done is not None else tutorial.get("time_to_model_lower_bound_s") or trained
        text = f"{bound:.0f} s" if done is not None else f"> {bound:.0f} s, no GGUF yet"
        clock.annotate(text, (bound, 0), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
    clock.annotate(
        f"{left:.0f} s", (left, 1), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8
    )
    clock.set_yticks([0, 1], ["bare Unsloth\n(tutorial)", "ours"])
    clock.set_xlabel("seconds from process start (seeds' medical recipe: 500 rows, 60 steps of 8)")
    clock.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    head = headline(src)
    ttm = load(src / "ttm.json", {})
    tutorial = load(src / "tutorial.json", [])
    rows = tutorial + load(src / "ours.json", []) + [r for r in [ttm_row(ttm)] if r]
    extra = {name: load(src / f"{name}.json", None) for name in ("start", "ttm", "ckpt")}
    extra = {k: {kk: vv for kk, vv in v.items() if kk != "losses"} for k, v in extra.items() if v}
    (out / "latest.json").write_text(json.dumps(head, indent=1) + "\n")
    (out / "results.json").write_text(
        json.dumps({"env": load(src / "env.json", {}), "headline": head, "results": rows, **extra}, indent=1)
    )
    (out / "results.md").write_text(markdown(rows, head, extra))
    if rows:
        medical = next((r for r in tutorial if r["data"] == "medical"), None)
        plot(rows, ttm, medical, out / "plot.png")
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
