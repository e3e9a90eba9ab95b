"""The verdict where the researcher watches: the study's note and figures in optuna-dashboard.

After a launch's summary and after every verification (write commands only; `best`, `report`
and the other read commands never write), kdsweep stores in the study, through
optuna-dashboard's own API:

* the study's note (`optuna_dashboard.save_note`, Markdown): the top trials with their
  binomial intervals and paired differences from the winner, the noise lines, the alpha=0
  comparison, and the seed verification with what it settled;
* the report's study-specific figures (`optuna_dashboard.save_plotly_graph_object`): the
  alpha x T contour of a KD study, MLP vs CNN by regulariser and DropBlock's block sizes for q1.
  Each has a fixed id, so writing again replaces it.
"""

from __future__ import annotations

import logging

from kdsweep.service import report, stats
from kdsweep.service.sweep import Sweep

log = logging.getLogger("kdsweep.service.dashboard")

FIGURES = ("kd_contour", "family", "dropblock")  # the report's figures that belong to one study
TOP = 5


def note_markdown(sweep: Sweep) -> str:
    """The study's note: what the sweep answered, and how much of it is noise."""
    from kdsweep.service import verify

    ranked = sweep.top(len(sweep.trials()))
    lines = [f"## kdsweep verdict: {sweep.name}", ""]
    if not ranked:
        return "\n".join(lines + ["No complete trial yet."])
    lines += [f"Top {min(TOP, len(ranked))} of {len(ranked)} complete trials ({sweep.metric}; "
              "± binomial standard error; difference from the winner paired on the validation images, 95% CI):", "",
              "| rank | trial | value | vs winner | params |", "|---|---|---|---|---|"]
    best = ranked[0]
    for i, t in enumerate(ranked[:TOP], 1):
        mask = stats.mask_of(t)
        se = f" ± {stats.binomial_se(t.value, len(mask)):.4f}" if mask is not None else ""
        diff = stats.compare_trials(best, t) if i > 1 else None
        vs = "winner" if i == 1 else (f"{-diff.mean:+.4f} ({-diff.high:+.4f} .. {-diff.low:+.4f})"
                                      if diff is not None else "–")
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())
        lines.append(f"| {i} | {t.number} | {t.value:.4f}{se} | {vs} | {params} |")
    lines += ["", "### How much of the top is noise", ""]
    lines += [f"- {line}" for line in verify.noise_summary(sweep)]
    checked = verify.summary_text(sweep)
    lines += ["", "### Seed verification", ""]
    if checked:
        lines += ["```", checked.rstrip(), "```"]
    else:
        lines.append(f"Not verified yet: `kdsweep best {sweep.name} --verify` races the top configs on fresh seeds.")
    return "\n".join(lines) + "\n"


def write_verdict(sweep: Sweep) -> None:
    """Store the note and the study-specific figures in the study (a write: write commands only).

    A failure here (an old optuna-dashboard, a storage hiccup) is logged, never fatal: the
    answer is already printed and in the report."""
    try:
        import optuna_dashboard

        optuna_dashboard.save_note(sweep.study, note_markdown(sweep))
        data = report.figure_data(sweep.study)
        for name in FIGURES:
            if name in data:
                fig = report.plotly_figure(sweep.study, name, data[name])
                if name == "kd_contour":  # Optuna's plot says only "Contour Plot"
                    fig.update_layout(title=f"alpha x T: {sweep.metric}")
                optuna_dashboard.save_plotly_graph_object(sweep.study, fig, graph_object_id=f"kdsweep-{name}")
    except Exception as exc:  # noqa: BLE001 - the note is a convenience; the verdict is printed
        log.warning("could not write the dashboard note of %r: %s: %s", sweep.name, type(exc).__name__, exc)

