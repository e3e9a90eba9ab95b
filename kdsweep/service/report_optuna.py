"""The report's figures that are Optuna's own plots as they are: parallel coordinates and
slices (one panel per parameter), interactive (plotly) and static (Optuna's matplotlib
variants). Only complete trials are drawn, as Optuna draws them.
"""

from __future__ import annotations

import warnings
from typing import Any

import optuna

NAMES = ("parallel", "slice")


def applicable(params: set[str]) -> list[str]:
    """Parallel coordinates need two parameters; a slice plot one."""
    return [n for n, least in (("parallel", 2), ("slice", 1)) if len(params) >= least]


def data(study: optuna.Study) -> dict[str, Any]:
    """What the figure rests on: the number of complete trials drawn."""
    return {"complete_trials": len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))}


def plotly_figure(study: optuna.Study, name: str, metric: str) -> Any:
    plot = (optuna.visualization.plot_parallel_coordinate if name == "parallel"
            else optuna.visualization.plot_slice)
    return plot(study, target_name=metric)


def png_figure(study: optuna.Study, name: str, metric: str, size: tuple[float, float]) -> Any:
    from optuna.visualization import matplotlib as mpl

    plot = mpl.plot_parallel_coordinate if name == "parallel" else mpl.plot_slice
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental
        axes = plot(study, target_name=metric)
    ax = axes.flat[0] if hasattr(axes, "flat") else axes
    fig = ax.figure
    if name == "slice":  # Optuna placed its colour bar beside the panels: widen, keep its layout
        params = len({p for t in study.get_trials(deepcopy=False) for p in t.params})
        fig.set_size_inches(max(size[0], 3.6 * params + 1.5), size[1])
    else:
        fig.set_size_inches(*size)
        fig.tight_layout()
    return fig
