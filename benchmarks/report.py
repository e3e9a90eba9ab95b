"""Results as a console table, JSON and the Markdown page docs/benchmarks.md."""

from __future__ import annotations

import datetime
import json
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

GPU_ENTRIES = ("gpu_resnet18_train_32px", "gpu_resnet18_train_224px", "gpu_resnet50_teacher_224px",
               "gpu_compile_reuse", "gpu_trials_per_device")


WHAT = {
    "core_vs_reference": "train images/s of `train()` over a torchvision FashionMNIST + per-sample "
    "transforms + DataLoader loop (num_workers = cores, pinned memory on CUDA), same Q1 CNN, "
    "batch, epochs, precision, memory format. Goal >= 1 on CPU, >= 3 on a GPU.",
    "q2_vs_plain_ce": "seconds per Q2 trial (teacher training and logit-cache fills amortised over "
    "the benchmark sweep, included) over a plain cross-entropy trial of the same student; the "
    "uncached variant (teacher forward every step) is in the details. Goal <= 1.10.",
    "teacher_setups": "2 workers, 6 Q2 trials through the launcher: teacher trainings (value) and "
    "the most teacher passes any (image, view) got (ratio). Goal: 1 and <= 1.",
    "pruning_epoch_savings": "replayed over recorded tables of Q1 learning curves "
    "(benchmarks/curves/q1*.json: Q1's space at 4,000 images of 14 px, 9 epochs; not the q1 smoke "
    "preset): epochs the unpruned sweep needs to get within 0.5 pt of its final best over the "
    "epochs the pruned sweep needs (a miss is charged its whole budget plus an unpruned rerun), "
    "mean over >= 200 random 16-configuration sequences of a table recorded apart from those "
    "tuned on, intervals from a bootstrap over configurations, beside CurvePruner, Hyperband, "
    "successive halving, median and WilcoxonPruner and the perfect-foresight ceilings at epochs "
    "1-3; baseline: CurvePruner. Goal >= 1.5 with <= 2% missed, ahead of every other pruner, "
    "< 5 ms per should_prune at 2,000 trials on SQLite.",
    "pruning_q2": "the same replay on q2's own table (benchmarks/curves/q2.json, the q2 smoke "
    "preset): q2's pruner's mean ratio. Goal > 1.0 with <= 2% missed, or NopPruner where none pays.",
    "pruning_q1_smoke": "the same replay on the q1 smoke preset's own tables (benchmarks/curves/"
    "q1_smoke.json tunes, q1_smoke_holdout.json is scored): q1's pruner's mean ratio there. Goal "
    "> 1.0 with <= 2% missed, or NopPruner where none pays.",
    "worker_scaling": "finished trials/hour, 2 single-thread workers over 2 x 1 single-thread "
    "worker (goal >= 0.85); 4 workers vs 2 in the details (goal >= 0.9).",
    "storage_overhead_ms": "Optuna + storage ms per trial (pop, sample, 10 x report + prune check, "
    "tell; 4 workers, trivial objective), the worse of SQLite and PostgreSQL. Goal < 50 ms.",
    "q2_fused": "trials/hour of Q2 students with `--fuse 4` and `--fuse 8` over one trial at a time "
    "(K=1), and over 4 worker processes on the device, warm teacher and logit cache. Goal on a GPU: "
    ">= 2.8x K=1 at 32 px (cifar stem), with a 224 px figure; on a CPU: recorded.",
    "trial_dead_time": "seconds from one trial's last report to the next trial's first training "
    "step in the real worker loop (finish + take the slot, TPE sampling, stored attributes, "
    "train() set-up), median, at N=50 and N=2,000 finished trials (Q2, ResNet18 student, SQLite). "
    "Goal < 0.5 s at N=2,000 on a CPU.",
    "cli_startup_s": "seconds of a fresh `kdsweep launch q2 --workers 0` (a usage error) over a bare "
    "`python -c pass`; `--help` timings in the details. Goal: under 0.5 s.",
    "gpu_resnet18_train_32px": "ResNet18 (CIFAR stem) 32 px training images/s through `train()`: "
    "the sweep's settings and the techniques tried on top (compile, batch 1024) side by side, "
    "with model FLOP utilisation against 989 TFLOP/s dense bf16 (H100). Goal >= 75,000 img/s.",
    "gpu_resnet18_train_224px": "the Q2 paper student as a sweep trains it (32 -> 224 px resize on "
    "the device, ImageNet stem, batch 256): training images/s and FLOP utilisation.",
    "gpu_resnet50_teacher_224px": "ResNet50 inference images/s at 224 px as the logit cache runs it.",
    "gpu_compile_reuse": "wall time of a second compiled trial in the same process over the first.",
    "gpu_trials_per_device": "trial throughput with K = 1, 2, 4 workers on one GPU "
    "(`kdsweep launch --trials-per-device K`).",
}


def machine_time() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")


def machine() -> dict[str, Any]:
    import torch

    from benchmarks.common import cores

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu, "cores": cores(), "python": platform.python_version(),
        "torch": torch.__version__, "date_utc": machine_time(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def rows(entries: Sequence[dict[str, Any]]) -> list[list[str]]:
    out = []
    for e in entries:
        if str((e.get("details") or {}).get("mode", "")).startswith("--quick"):
            e = {**e, "name": e["name"] + " (quick)"}
        if e.get("skipped"):
            out.append([e["name"], "skipped", "", "", "", "", e["skipped"], ""])
            continue
        extra = e.get("details", {}).get("ratio_std")
        r = _fmt(e["ratio"]) + (f" ± {_fmt(extra)}" if isinstance(extra, float) else "")
        out.append([e["name"], _fmt(e["value"]), e["unit"], _fmt(e["baseline"]), r, e["goal"],
                    _fmt(e.get("met")), _fmt(e.get("wall_s"))])
    return out


HEADER = ["entry", "value", "unit", "baseline", "ratio", "goal", "met", "wall s"]


def table(entries: Sequence[dict[str, Any]]) -> str:
    body = rows(entries)
    widths = [max(len(r[i]) for r in [HEADER] + body) for i in range(len(HEADER))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))
                     for r in [HEADER] + body)


def read_entries(path: Path) -> list[dict[str, Any]]:
    """The entries stored in results file `path` ([] where there is none yet)."""
    if not path.exists():
        return []
    try:
        return list(json.loads(path.read_text())["entries"])
    except (ValueError, KeyError, TypeError) as exc:
        raise click.ClickException(f"{path} is not a results file ({exc}): move it away or pass another --output.") from None


def merged(stored: Sequence[dict[str, Any]], fresh: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """`stored` with each entry of `fresh` in place of the stored one of its name (new names last)."""
    by_name = {e["name"]: e for e in fresh}
    out = [by_name.pop(e["name"], e) for e in stored]
    return out + list(by_name.values())


def write_json(path: Path, entries: Sequence[dict[str, Any]], meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"machine": meta, "entries": list(entries)}, indent=1, default=str))
    tmp.replace(path)


BULKY = ("curves", "params", "tune_ids", "score_ids")  # per-trial data: in the JSON, too long for the page


def _brief(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _brief(v) for k, v in value.items() if k not in BULKY}
    if isinstance(value, list):
        return [_brief(v) for v in value]
    return value


def markdown(entries: Sequence[dict[str, Any]], meta: dict[str, Any], command: str,
             note: str | None = None) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python -m benchmarks` (see `benchmarks/`); every ratio is measured side by",
        "side with its baseline in the same run. Regenerate this page with:",
        "",
        "```bash",
        command,
        "```",
        "",
        "## Latest run",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in meta.items()),
        "",
        *([note, ""] if note else []),
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows(entries)]
    measured_gpu = [e for e in entries if e["name"] in GPU_ENTRIES and not e.get("skipped")]
    lines += [""]
    if not measured_gpu:
        lines += ["**GPU figures are not yet measured**: this run had no GPU. Run `bash "
                  "benchmarks/gpu.sh` on a GPU machine (ResNet18 32 px training images/s, "
                  "ResNet50 224 px teacher images/s, FLOP utilisation, core_vs_reference on the GPU, "
                  "`--trials-per-device` scaling).", ""]
    lines += ["## What each entry measures", ""]
    lines += [f"- `{name}`: {text}" for name, text in WHAT.items()]
    lines += ["", "## Details", ""]
    for e in entries:
        lines += [f"### {e['name']}", "", "```json",
                  json.dumps(_brief(e.get("details") or {"skipped": e.get("skipped")}), default=str,
                             indent=1),
                  "```", ""]
    return "\n".join(lines)
