"""`kdsweep report`: interactive HTML, PNG figures and a markdown summary of one study.

Every figure is computed once as plain data (`figure_data`), then drawn twice: as a plotly
figure (HTML, interactive; Optuna's own plots where Optuna has one) and with matplotlib (PNG,
no kaleido or browser needed). Which study-specific figures apply is read from the parameters
the trials hold, so any study file gets the generic ones and q1/q2 get theirs:

* every study: optimisation history, intermediate values (pruned trials marked), importances;
* `kd.alpha` and `kd.temperature` (q2): the alpha x T contour of validation accuracy, with the
  complete trials, the pruned ones (x) and the alpha=0 reference run (the student alone);
* `model.family` (q1): validation accuracy of MLP vs CNN (by regulariser) at the matched budget,
  and (`flops`) against each trial's forward FLOPs per image, one series per family;
* `dropblock.size` (q1): validation accuracy by DropBlock block size.

A sibling `<study>.verify` study (see kdsweep/service/verify.py) adds its seed statistics to the summary.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from kdsweep.service import keys, report_optuna
from kdsweep.service.sweep import Sweep

log = logging.getLogger("kdsweep.service.report")

PNG_SIZE = (8.0, 5.0)  # inches; at PNG_DPI the images are 800 x 500 pixels
PNG_DPI = 100
KD_PARAMS = ("kd.alpha", "kd.temperature")


class ReportError(RuntimeError):
    """The study cannot be reported on (e.g. nothing finished); one sentence saying why."""


def _complete(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None]


def _maximize(study: optuna.Study) -> bool:
    return study.direction == optuna.study.StudyDirection.MAXIMIZE


def _param_names(study: optuna.Study) -> set[str]:
    return {k for t in study.get_trials(deepcopy=False) for k in t.params}


def applicable(study: optuna.Study) -> list[str]:
    """Names of the figures that apply to `study`, in report order."""
    names = ["history", "intermediate", "importance"]
    params = _param_names(study)
    if all(p in params for p in KD_PARAMS):
        names.append("kd_contour")
    if "model.family" in params:
        names.append("family")
        if any(keys.FLOPS in t.user_attrs for t in _complete(study)):
            names.append("flops")
    if "dropblock.size" in params:
        names.append("dropblock")
    return names + report_optuna.applicable(params)


# ---------------------------------------------------------------- the data behind each figure


def history_data(study: optuna.Study) -> dict[str, Any]:
    """Complete trials in order: numbers, values, and the best value so far after each."""
    done = sorted(_complete(study), key=lambda t: t.number)
    pick = max if _maximize(study) else min
    best: list[float] = []
    for t in done:
        best.append(t.value if not best else pick(best[-1], t.value))
    pruned = [t for t in _pruned(study) if t.intermediate_values]
    winner = next((t for t in done if t.value == best[-1]), None) if done else None
    return {"trial": [t.number for t in done], "value": [t.value for t in done], "best": best,
            "pruned_trial": [t.number for t in pruned],
            "pruned_value": [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
            "winner": None if winner is None else {"trial": winner.number, "value": winner.value},
            "reference": None}  # the alpha=0 run's value, filled in by write_report for KD sweeps


def intermediate_data(study: optuna.Study) -> dict[str, Any]:
    """Per trial with reported epochs: its curve and whether it was pruned (stopped early)."""
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        if not t.intermediate_values:
            continue  # infeasible trials are PRUNED before any epoch
        steps = sorted(t.intermediate_values)
        out.append({"trial": t.number, "pruned": t.state == TrialState.PRUNED,
                    "step": steps, "value": [t.intermediate_values[s] for s in steps]})
    return {"trials": out}


def importance_data(study: optuna.Study) -> dict[str, float]:
    """Optuna's parameter importances (normalised to sum 1); empty when they cannot be had."""
    done = _complete(study)
    if len(done) < 3 or not _param_names(study):
        return {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dict(optuna.importance.get_param_importances(study))
    except (RuntimeError, ValueError, ZeroDivisionError) as exc:
        log.warning("parameter importances unavailable: %s", exc)
        return {}


def kd_contour_data(study: optuna.Study) -> dict[str, Any]:
    """alpha, T and validation accuracy of every complete trial; alpha, T and last reported
    value of every pruned one; `reference`: the alpha=0 run's value (the student alone, from
    the `.baseline` sibling), filled in by write_report."""
    done = [t for t in _complete(study) if all(p in t.params for p in KD_PARAMS)]
    pruned = [t for t in _pruned(study) if all(p in t.params for p in KD_PARAMS)]
    bounds = {}
    for p in KD_PARAMS:  # the searched range, so the plot shows where the sampler did not go
        dist = next((t.distributions[p] for t in done), None)
        if dist is not None and hasattr(dist, "low"):
            bounds[p] = [dist.low, dist.high]
    return {"alpha": [t.params["kd.alpha"] for t in done],
            "temperature": [t.params["kd.temperature"] for t in done],
            "value": [t.value for t in done], "trial": [t.number for t in done], "bounds": bounds,
            "pruned": {"alpha": [t.params["kd.alpha"] for t in pruned],
                       "temperature": [t.params["kd.temperature"] for t in pruned],
                       "value": [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
                       "trial": [t.number for t in pruned]},
            "reference": None}


def flops_data(study: optuna.Study) -> dict[str, Any]:
    """Validation accuracy of complete trials against their forward FLOPs per image, one series
    per family (mlp, cnn), each accuracy with its binomial standard error sqrt(p (1 - p) / n)
    over the n validation images (the trial's own count, else the study's val_size); the
    winner is the best of them."""
    val_size = ((study.user_attrs.get(keys.DEFINITION) or {}).get("config") or {}).get("data", {}).get("val_size")
    series: dict[str, dict[str, list]] = {}
    for t in _complete(study):
        if "model.family" not in t.params or t.user_attrs.get(keys.FLOPS) is None:
            continue
        n = t.user_attrs.get(keys.VAL_N) or val_size
        s = series.setdefault(str(t.params["model.family"]), {"trial": [], "flops": [], "value": [], "se": []})
        s["trial"].append(t.number)
        s["flops"].append(float(t.user_attrs[keys.FLOPS]))
        s["value"].append(t.value)
        s["se"].append(math.sqrt(t.value * (1 - t.value) / n) if n and 0 <= t.value <= 1 else None)
    points = [(v, fam, s["trial"][i], s["flops"][i]) for fam, s in series.items() for i, v in enumerate(s["value"])]
    best = (max if _maximize(study) else min)(points, default=None)
    return {"series": {k: series[k] for k in sorted(series, key=lambda k: (k != "mlp", k))},
            "winner": None if best is None else {"trial": best[2], "family": best[1], "flops": best[3],
                                                 "value": best[0]}}


def _budget(study: optuna.Study) -> int | None:
    definition = study.user_attrs.get(keys.DEFINITION) or {}
    return (definition.get("config") or {}).get("model", {}).get("budget")


def family_data(study: optuna.Study) -> dict[str, Any]:
    """Validation accuracy of complete trials grouped by family and CNN regulariser.

    Factorized and plain CNNs are grouped together here (the regulariser is the question);
    `factorized` lists which values came from factorized kernels.
    """
    groups: dict[str, list[float]] = {}
    factorized: dict[str, list[bool]] = {}
    pruned: dict[str, int] = {}
    flops: dict[str, list[float]] = {}
    for t in _complete(study):
        if "model.family" not in t.params:
            continue
        key = _family_key(t.params)
        groups.setdefault(key, []).append(t.value)
        if t.user_attrs.get(keys.FLOPS) is not None:
            flops.setdefault(key, []).append(float(t.user_attrs[keys.FLOPS]))
        factorized.setdefault(key, []).append(bool(t.params.get("cnn.factorized", False)))
    for t in _pruned(study):
        if "model.family" in t.params:
            pruned[_family_key(t.params)] = pruned.get(_family_key(t.params), 0) + 1
    order = sorted(groups, key=lambda k: (k != "mlp", k))
    return {"groups": {k: groups[k] for k in order}, "factorized": {k: factorized[k] for k in order},
            "pruned": pruned, "budget": _budget(study),
            "flops": {k: statistics.fmean(flops[k]) for k in order if k in flops}}  # mean per image


def _with_pruned_only(groups: Mapping[str, list[float]], pruned: Mapping[str, int]) -> dict[str, list[float]]:
    """The groups with complete trials, then those whose every trial was pruned (empty)."""
    return {**groups, **{g: [] for g in sorted(pruned) if g not in groups}}


def _family_key(params: Mapping[str, Any]) -> str:
    return "mlp" if params["model.family"] != "cnn" else f"cnn/{params.get('reg.kind', 'none')}"


def _pruned(study: optuna.Study) -> list[FrozenTrial]:
    """Trials the pruner stopped (not infeasible ones, which never trained)."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)) if t.intermediate_values]


def dropblock_data(study: optuna.Study) -> dict[str, Any]:
    """Validation accuracy (and rate) of complete DropBlock trials by block size."""
    by: dict[int, list[float]] = {}
    rates: dict[int, list[float]] = {}
    pruned: dict[int, int] = {}
    for t in _complete(study):
        if "dropblock.size" in t.params:
            size = int(t.params["dropblock.size"])
            by.setdefault(size, []).append(t.value)
            rates.setdefault(size, []).append(float(t.params.get("reg.rate", float("nan"))))
    for t in _pruned(study):
        if "dropblock.size" in t.params:
            pruned[int(t.params["dropblock.size"])] = pruned.get(int(t.params["dropblock.size"]), 0) + 1
    return {"sizes": {s: by[s] for s in sorted(by)}, "rates": {s: rates[s] for s in sorted(rates)},
            "pruned": pruned}


DATA = {
    "history": history_data,
    "intermediate": intermediate_data,
    "importance": importance_data,
    "kd_contour": kd_contour_data,
    "family": family_data,
    "flops": flops_data,
    "dropblock": dropblock_data,
    "parallel": report_optuna.data,
    "slice": report_optuna.data,
}


def figure_data(study: optuna.Study) -> dict[str, Any]:
    """The data behind every applicable figure, by figure name (see `applicable`)."""
    return {name: DATA[name](study) for name in applicable(study)}


# ---------------------------------------------------------------- plotly (HTML)


def plotly_figure(study: optuna.Study, name: str, data: Any) -> Any:
    """The interactive figure `name`; Optuna's own plot where one exists."""
    import plotly.graph_objects as go

    metric = _metric(study)
    if name in report_optuna.NAMES:
        return report_optuna.plotly_figure(study, name, metric)
    if name == "history":
        return optuna.visualization.plot_optimization_history(study, target_name=metric)
    if name == "importance":
        return optuna.visualization.plot_param_importances(study, target_name=metric)
    if name == "kd_contour":
        return _kd_contour_plotly(study, data, metric)
    fig = go.Figure()
    if name == "intermediate":
        for tr in data["trials"]:
            fig.add_trace(go.Scatter(
                x=tr["step"], y=tr["value"], name=f"trial {tr['trial']}" + (" (pruned)" if tr["pruned"] else ""),
                mode="lines+markers",
                line={"dash": "dot" if tr["pruned"] else "solid", "color": "#d62728" if tr["pruned"] else None},
                marker={"symbol": ["circle"] * (len(tr["step"]) - 1) + ["x" if tr["pruned"] else "circle"],
                        "size": [5] * (len(tr["step"]) - 1) + [11 if tr["pruned"] else 5]},
            ))
        fig.update_layout(title="Intermediate values (pruned trials dotted, x where stopped)",
                          xaxis_title="epoch", yaxis_title=metric)
    elif name == "family":
        for group, values in _with_pruned_only(data["groups"], data["pruned"]).items():
            fig.add_trace(go.Box(y=values, name=group, boxpoints="all", jitter=0.3))
        budget = f" at {data['budget']:,} parameters" if data["budget"] else ""
        fig.update_layout(title=f"MLP vs CNN by regulariser{budget}", yaxis_title=metric)
    elif name == "dropblock":
        for size, values in data["sizes"].items():
            fig.add_trace(go.Box(y=values, name=f"block {size}", boxpoints="all", jitter=0.3))
        fig.update_layout(title="DropBlock: validation accuracy by block size", yaxis_title=metric)
    elif name == "flops":
        for family, s in data["series"].items():
            fig.add_trace(go.Scatter(x=s["flops"], y=s["value"], mode="markers", name=family,
                                     error_y={"type": "data", "array": [e or 0.0 for e in s["se"]]},
                                     text=[f"trial {n}" for n in s["trial"]]))
        if data["winner"]:
            w = data["winner"]
            fig.add_trace(go.Scatter(x=[w["flops"]], y=[w["value"]], mode="markers",
                                     name=f"winner (trial {w['trial']}, {w['family']})",
                                     marker={"symbol": "star", "size": 16, "color": "#ffbf00",
                                             "line": {"color": "black", "width": 1}}))
        fig.update_layout(title=f"{metric} against forward FLOPs per image (bars: 1 binomial SE)",
                          xaxis={"type": "log", "title": "forward FLOPs per image"}, yaxis_title=metric)
    return fig


def _kd_contour_plotly(study: optuna.Study, data: Mapping[str, Any], metric: str) -> Any:
    """Optuna's contour, with the pruned trials (x) and the alpha=0 reference (a dashed line
    at alpha = 0, its value in the legend) drawn over it."""
    import plotly.graph_objects as go

    fig = optuna.visualization.plot_contour(study, params=list(KD_PARAMS), target_name=metric)
    pruned = data.get("pruned") or {}
    if pruned.get("trial"):
        fig.add_trace(go.Scatter(
            x=pruned["alpha"], y=pruned["temperature"], mode="markers", name=f"pruned ({len(pruned['trial'])})",
            marker={"symbol": "x", "size": 9, "color": "#d62728"},
            text=[f"trial {n}: {v:.4f} at its last epoch" for n, v in zip(pruned["trial"], pruned["value"],
                                                                           strict=True)]))
    if data.get("reference") is not None:
        ts = data["temperature"] + pruned.get("temperature", [])
        low, high = data["bounds"].get("kd.temperature") or [min(ts, default=1.0), max(ts, default=1.0)]
        fig.add_trace(go.Scatter(x=[0.0, 0.0], y=[low, high], mode="lines", line={"dash": "dash", "color": "#2ca02c"},
                                 name=f"alpha=0 reference (student alone): {data['reference']:.4f}"))
    fig.update_layout(title=f"alpha x T: {metric}", showlegend=True,
                      legend={"orientation": "h", "yanchor": "top", "y": -0.15})
    return fig


# ---------------------------------------------------------------- matplotlib (PNG)


def png_figure(study: optuna.Study, name: str, data: Any) -> Any:
    """The static matplotlib figure `name` (PNG_SIZE at PNG_DPI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    metric = _metric(study)
    if name in report_optuna.NAMES:
        return report_optuna.png_figure(study, name, metric, PNG_SIZE)
    fig, ax = plt.subplots(figsize=PNG_SIZE, dpi=PNG_DPI)
    if name == "history":
        ax.scatter(data["trial"], data["value"], s=18, label="complete trial")
        if data.get("pruned_trial"):
            ax.scatter(data["pruned_trial"], data["pruned_value"], s=22, marker="x", color="#7f7f7f",
                       label="pruned (its last epoch)")
        ax.step(data["trial"], data["best"], where="post", color="#d62728", label="best so far")
        if data.get("winner"):
            w = data["winner"]
            ax.scatter([w["trial"]], [w["value"]], s=160, marker="*", color="#ffbf00", edgecolor="black",
                       zorder=5, label=f"winner (trial {w['trial']})")
        if data.get("reference") is not None:
            ax.axhline(data["reference"], color="#2ca02c", linestyle="--", label="student alone (alpha=0)")
        ax.set(xlabel="trial", ylabel=metric, title=f"{study.study_name}: optimisation history")
        ax.legend()
    elif name == "intermediate":
        for tr in data["trials"]:
            if tr["pruned"]:
                ax.plot(tr["step"], tr["value"], ":", color="#d62728", alpha=0.7)
                ax.plot(tr["step"][-1], tr["value"][-1], "x", color="#d62728", markersize=8)
            else:
                ax.plot(tr["step"], tr["value"], "-o", color="#1f77b4", markersize=3, alpha=0.8)
        ax.plot([], [], "-o", color="#1f77b4", label="complete")
        ax.plot([], [], ":x", color="#d62728", label="pruned (x: stopped)")
        ax.set(xlabel="epoch", ylabel=metric, title=f"{study.study_name}: intermediate values")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
    elif name == "importance":
        if data:
            names = list(data)[::-1]
            ax.barh(names, [data[k] for k in names])
            ax.set(xlabel="importance (sums to 1)", title=f"{study.study_name}: parameter importances")
        else:
            ax.text(0.5, 0.5, "not enough complete trials for importances", ha="center", va="center")
            ax.set_axis_off()
    elif name == "kd_contour":
        a, t, v = data["alpha"], data["temperature"], data["value"]
        if len(v) >= 4 and len(set(a)) > 1 and len(set(t)) > 1:
            try:
                cs = ax.tricontourf(a, t, v, levels=12, cmap="viridis", alpha=0.8)
                bar = fig.colorbar(cs, ax=ax, label=metric)
                if data.get("reference") is not None:  # where the student alone sits on the scale
                    bar.ax.axhline(data["reference"], color="#2ca02c", linestyle="--", linewidth=2)
            except (ValueError, RuntimeError):  # collinear points: no triangulation
                pass
        sc = ax.scatter(a, t, c=v, cmap="viridis", edgecolors="black", s=30, label=f"complete ({len(v)})")
        if len(v) < 4:
            fig.colorbar(sc, ax=ax, label=metric)
        pruned = data.get("pruned") or {}
        if pruned.get("trial"):
            ax.scatter(pruned["alpha"], pruned["temperature"], marker="x", color="#d62728", s=40,
                       label=f"pruned ({len(pruned['trial'])})")
        if data.get("reference") is not None:
            ax.axvline(0.0, color="#2ca02c", linestyle="--", linewidth=2,
                       label=f"alpha=0 reference (student alone): {data['reference']:.4f}")
        else:
            ax.plot([], [], " ", label="alpha=0 reference: not run yet")
        ax.legend(loc="best", fontsize=8, framealpha=0.9)
        for param, setter in (("kd.alpha", ax.set_xlim), ("kd.temperature", ax.set_ylim)):
            if param in data["bounds"]:
                low, high = data["bounds"][param]
                pad = 0.02 * (high - low)
                setter(low - pad, high + pad)
        ax.set(xlabel="alpha (weight of the teacher's soft term)", ylabel="temperature T",
               title=f"{study.study_name}: {metric} over alpha x T")
    elif name == "flops":
        for family, s in data["series"].items():
            ax.errorbar(s["flops"], s["value"], yerr=[e or 0.0 for e in s["se"]], fmt="o", markersize=4,
                        capsize=3, alpha=0.8, label=f"{family} (n={len(s['value'])})")
        if data["winner"]:
            w = data["winner"]
            ax.scatter([w["flops"]], [w["value"]], s=200, marker="*", color="#ffbf00", edgecolor="black",
                       zorder=5, label=f"winner (trial {w['trial']}, {w['family']})")
        ax.set_xscale("log")
        ax.set(xlabel="forward FLOPs per image (log scale)", ylabel=metric,
               title=f"{study.study_name}: {metric} against compute (complete trials; bars: 1 binomial SE)")
        ax.legend()
    elif name in ("family", "dropblock"):
        if name == "family":
            pruned = data["pruned"]
            groups = _with_pruned_only(data["groups"], pruned)  # a group all pruned is a finding too
            budget = f" at {data['budget']:,} parameters" if data["budget"] else ""
            title = f"{study.study_name}: MLP vs CNN by regulariser{budget}"
        else:
            groups = {f"block {s}": v for s, v in data["sizes"].items()}
            pruned = {f"block {s}": n for s, n in data["pruned"].items()}
            title = f"{study.study_name}: DropBlock block size"
        if not any(groups.values()):
            ax.text(0.5, 0.5, "no complete trial in any group yet", ha="center", va="center",
                    transform=ax.transAxes)
        labels = list(groups)
        for i, label in enumerate(labels):
            values = groups[label]
            xs = [i + 0.08 * ((j % 5) - 2) for j in range(len(values))]
            ax.scatter(xs, values, s=18, alpha=0.7)
            if values:
                ax.hlines(statistics.fmean(values), i - 0.3, i + 0.3, color="black")
        ax.set_xticks(range(len(labels)), [
            f"{k}\n(n={len(groups[k])}" + (f", +{pruned[k]} pruned)" if pruned.get(k) else ")") for k in labels])
        ax.set(ylabel=metric, title=title + " (complete trials; bar: mean)")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- the report


def _metric(study: optuna.Study) -> str:
    return (study.user_attrs.get(keys.DEFINITION) or {}).get("metric", "value")


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def top_table(study: optuna.Study, top: int = 10) -> str:
    """The best `top` complete trials as a markdown table."""
    done = sorted(_complete(study), key=lambda t: t.value, reverse=_maximize(study))[:top]
    if not done:
        return "No complete trials.\n"
    names = sorted({k for t in done for k in t.params})
    # Parameters and forward FLOPs side by side: Q1 budgets match the first, not the second.
    cols: list[tuple[str, list[str]]] = [
        ("epochs", [str(t.user_attrs.get(keys.EPOCHS_RUN, "")) for t in done]),
        ("params", [f"{c:,}" if (c := t.user_attrs.get(keys.PARAMS_COUNT)) is not None else "–" for t in done]),
        ("MFLOPs/image", [f"{f / 1e6:.2f}" if (f := t.user_attrs.get(keys.FLOPS)) is not None else "–" for t in done]),
    ] + [(k, [_fmt(t.params[k]) if k in t.params else "–" for t in done]) for k in names]
    # A column equal in every row says nothing row by row: once, under the table.
    same = [(h, v[0]) for h, v in cols if len(done) > 1 and len(set(v)) == 1]
    cols = [(h, v) for h, v in cols if (h, v[0]) not in same or len(set(v)) > 1]
    lines = ["| rank | trial | " + _metric(study) + " | " + " | ".join(h for h, _ in cols) + " |",
             "|---" * (3 + len(cols)) + "|"]
    for i, t in enumerate(done, 1):
        lines.append("| " + " | ".join([str(i), str(t.number), f"{t.value:.4f}", *(v[i - 1] for _, v in cols)]) + " |")
    known = [(h, v) for h, v in same if v not in ("–", "")]  # a column nobody recorded just goes
    if known:
        lines += ["", "Every row: " + ", ".join(f"{h} {v}" for h, v in known) + "."]
    return "\n".join(lines) + "\n"


def summary_markdown(sweep: Sweep, files: Mapping[str, list[str]], data: Mapping[str, Any],
                     verify_text: str | None = None) -> str:
    study = sweep.study
    # Failed means failed for good: re-queued attempts are counted apart (see Sweep.counts).
    counts = sweep.counts().as_dict()
    lines = [f"# Study `{study.study_name}`", ""]
    desc = study.user_attrs.get(keys.DESCRIPTION)
    if desc:
        lines += [desc, ""]
    definition = study.user_attrs.get(keys.DEFINITION) or {}
    if definition:
        lines += [f"Study file `{definition.get('study')}`, preset `{definition.get('preset')}`, "
                  f"{study.direction.name.lower()} {_metric(study)}.", ""]
    lines += [", ".join(f"{n.replace('_', ' ')} {c}" for n, c in counts.items() if c) + ".", ""]
    lines += ["## Top trials", "", top_table(study)]
    from kdsweep.service import verify

    lines += ["## How much of the top is noise", ""]
    lines += [f"- {line}" for line in verify.noise_summary(sweep)] + [""]
    if verify_text:
        lines += ["## Seed verification", "", "```", verify_text.rstrip(), "```", ""]
    if "family" in data:
        lines += ["## MLP vs CNN by regulariser", "", "Complete trials only; pruned ones are counted. "
                  "The groups share a parameter budget, not a compute budget (MFLOPs per image).", "",
                  "| group | n | mean | best | pruned | MFLOPs/image |", "|---|---|---|---|---|---|"]
        flops = data["family"].get("flops", {})
        for g, v in data["family"]["groups"].items():
            f = flops.get(g)
            lines.append(f"| {g} | {len(v)} | {statistics.fmean(v):.4f} | {max(v):.4f} | "
                         f"{data['family']['pruned'].get(g, 0)} | {f'{f / 1e6:.2f}' if f else '–'} |")
        for g in sorted(set(data["family"]["pruned"]) - set(data["family"]["groups"])):
            lines.append(f"| {g} | 0 | – | – | {data['family']['pruned'][g]} | – |")
        lines.append("")
    if "dropblock" in data:
        lines += ["## DropBlock block size", ""]
        if data["dropblock"]["sizes"]:
            lines += ["| block | n | mean | best | pruned |", "|---|---|---|---|---|"]
            for s, v in data["dropblock"]["sizes"].items():
                lines.append(f"| {s} | {len(v)} | {statistics.fmean(v):.4f} | {max(v):.4f} | "
                             f"{data['dropblock']['pruned'].get(s, 0)} |")
        else:
            lines.append("No complete DropBlock trial yet (all were pruned or none was sampled).")
        lines.append("")
    if data.get("importance"):
        lines += ["## Parameter importances", "",
                  f"From {len(_complete(sweep.study))} complete trials (Optuna's fANOVA estimate; "
                  "with few trials it is rough: read the order, not the decimals).", ""]
        lines += [f"- `{k}`: {v:.3f}" for k, v in data["importance"].items()] + [""]
    lines += ["## Figures", ""]
    for name, names in files.items():
        lines.append(f"- {name}: " + ", ".join(f"[{f}]({f})" for f in names))
    return "\n".join(lines) + "\n"


def write_report(sweep: Sweep, out: Path, verify_text: str | None = None) -> dict[str, list[str]]:
    """Write `<name>.html`, `<name>.png`, `data.json` and `summary.md` into `out`.

    Returns {figure name: [file names]}. Raises ReportError when no trial has finished.
    """
    import matplotlib.pyplot as plt

    study = sweep.study
    if not _complete(study) and not intermediate_data(study)["trials"]:
        raise ReportError(f"study {study.study_name!r} has no finished trial to report on yet.")
    out.mkdir(parents=True, exist_ok=True)
    data = figure_data(study)
    from kdsweep.service import baseline

    reference = baseline.result(sweep) if baseline.find(sweep) is not None else None
    if reference is not None:
        for name in ("history", "kd_contour"):
            if name in data:
                data[name]["reference"] = reference.value
    files: dict[str, list[str]] = {}
    for name, d in data.items():
        written = []
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna's experimental-plot warnings
                fig = plotly_figure(study, name, d)
            # One plotly.min.js beside the pages, not 4 MB inside each: works offline.
            fig.write_html(out / f"{name}.html", include_plotlyjs="directory")
            written.append(f"{name}.html")
        except (ValueError, RuntimeError) as exc:  # e.g. too few trials for Optuna's plot
            log.warning("no interactive %s figure: %s", name, exc)
        pfig = png_figure(study, name, d)
        pfig.savefig(out / f"{name}.png", dpi=PNG_DPI)
        plt.close(pfig)
        written.append(f"{name}.png")
        files[name] = written
    (out / "data.json").write_text(json.dumps(data, indent=1, default=_json_default))
    (out / "summary.md").write_text(summary_markdown(sweep, files, data, verify_text))
    return files


def _json_default(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return str(v)
