"""Merge the benchmark's result files into results.json, results.md, plot.png and latest.json.

    python report.py RESULTS_DIR OUT_DIR

RESULTS_DIR holds what the stages wrote (env.json, validate.json, 8b.json, varlen-check.json,
checkpoint-*.json, export-*.json, profile-*.txt); it runs on the GPU machine at the end of every
stage, and here on fetched files to rebuild the report.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

HEADLINE_SHAPE = "llama-8b"


def find(results: list[dict[str, Any]], **want: Any) -> dict[str, Any] | None:
    """The last result matching every field in `want` (`batch=None` skips the field)."""
    hits = [r for r in results if all(v is None or r.get(k) == v for k, v in want.items())]
    return hits[-1] if hits else None


def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> float | None:
    if not a or not b or not b.get(key):
        return None
    return round(a[key] / b[key], 3)


def headline(
    results: list[dict[str, Any]], env: dict[str, Any], checkpoint: dict[str, Any]
) -> dict[str, Any]:
    r = [x for x in results if x["shape"] == HEADLINE_SHAPE]
    ours_seed = find(r, engine="ours", data="medical", batch=2, accumulation=4)
    uns_seed = find(r, engine="unsloth", data="medical", batch=2, accumulation=4, attention="plain")
    uns_seed_alpaca = find(r, engine="unsloth", data="alpaca", batch=2, accumulation=4, attention="plain")
    hf_seed = find(r, engine="hf", data="medical", batch=2, accumulation=4)
    auto_medical = next(
        (x for x in r if x["engine"] == "ours" and x["data"] == "medical" and x["batch"] > 2), None
    )
    auto_alpaca = next(
        (x for x in r if x["engine"] == "ours" and x["data"] == "alpaca" and x["batch"] > 2), None
    )
    return {
        "ours_vs_unsloth_tokens_ratio": ratio(ours_seed, uns_seed, "tokens_per_second"),
        "ours_vs_unsloth_memory_ratio": ratio(ours_seed, uns_seed, "peak_reserved_gib"),
        "ours_vs_hf_tokens_ratio": ratio(ours_seed, hf_seed, "tokens_per_second"),
        "ours_vs_hf_memory_ratio": ratio(ours_seed, hf_seed, "peak_reserved_gib"),
        "auto_vs_seed_tokens_ratio_medical": ratio(auto_medical, uns_seed, "tokens_per_second"),
        "auto_vs_seed_tokens_ratio_alpaca": ratio(auto_alpaca, uns_seed_alpaca, "tokens_per_second"),
        "mfu_pct_medical": auto_medical["mfu_pct"] if auto_medical else None,
        "mfu_pct_alpaca": auto_alpaca["mfu_pct"] if auto_alpaca else None,
        "checkpoint_stall_s": checkpoint.get("checkpoint_stall_s"),
        "sigterm_to_s3_s": checkpoint.get("sigterm_to_exit_s"),
        "gpu": env.get("gpu"),
        "versions": env.get("versions"),
    }


def markdown(results: list[dict[str, Any]], head: dict[str, Any], extra: dict[str, Any]) -> str:
    lines = [
        "| shape | engine | data | batch x accum | attention | real tok/s | MFU % | peak GiB (reserved) "
        "| tokens/step | s/step | time to 1st step s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for x in results:
        ttfs = x["time_to_first_step_s"]
        lines.append(
            f"| {x['shape']} | {x['engine']} | {x['data']} | {x['batch']} x {x['accumulation']} "
            f"| {x['attention']} "
            f"| {x['tokens_per_second']:,.0f} | {x['mfu_pct']:.1f} | {x['peak_reserved_gib']:.2f} "
            f"| {x['tokens_per_step']:,.0f} | {x['seconds_per_step']:.2f} | {'' if ttfs is None else ttfs} |"
        )
    lines += ["", "| headline (8B shape) | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in head.items() if k not in ("versions",)]
    for name, value in extra.items():
        lines += ["", f"{name}:", "", "```", json.dumps(value, indent=1), "```"]
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({x["shape"] for x in results}, reverse=True)
    fig, axes = plt.subplots(len(shapes), 1, figsize=(11, 4.2 * len(shapes)), squeeze=False)
    for ax, shape in zip(axes[:, 0], shapes, strict=True):
        rows = [x for x in results if x["shape"] == shape]
        labels = [
            f"{x['engine']}\n{x['data']} {x['batch']}x{x['accumulation']}\n{x['attention']}" for x in rows
        ]
        colors = {"ours": "#2ca02c", "unsloth": "#ff7f0e", "hf": "#7f7f7f"}
        bars = ax.bar(
            range(len(rows)), [x["mfu_pct"] for x in rows], color=[colors[x["engine"]] for x in rows]
        )
        for bar, x in zip(bars, rows, strict=True):
            ax.annotate(
                f"{x['tokens_per_second']:,.0f}",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
            )
        ax.set_xticks(range(len(rows)), labels, fontsize=6)
        ax.set_ylabel("MFU % (6N x real tok/s / 989 TFLOP/s)")
        ax.set_title(f"{shape}: real tokens/s above each bar")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    env = json.loads((src / "env.json").read_text()) if (src / "env.json").is_file() else {}
    results: list[dict[str, Any]] = []
    for name in ("validate.json", "8b.json"):
        if (src / name).is_file():
            results += json.loads((src / name).read_text())
    extra: dict[str, Any] = {}
    found = [*src.glob("checkpoint-*.json"), *src.glob("export-*.json"), *src.glob("varlen-check.json")]
    for path in sorted(found):
        extra[path.stem] = json.loads(path.read_text())
    checkpoint = extra.get(f"checkpoint-{HEADLINE_SHAPE}", {})
    head = headline(results, env, checkpoint)
    (out / "results.json").write_text(
        json.dumps({"env": env, "headline": head, "results": results, **extra}, indent=1)
    )
    (out / "latest.json").write_text(json.dumps(head, indent=1))
    (out / "results.md").write_text(markdown(results, head, extra))
    if results:
        plot(results, out / "plot.png")
    for profile in sorted(src.glob("profile-*.txt"))[:3]:
        shutil.copy(profile, out / profile.name)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
