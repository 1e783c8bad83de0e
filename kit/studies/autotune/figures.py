"""Notebook 85's figure: what the tuner screened (refused settings in red), and the profiles' request times."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from kit import plots
from kit.studies.autotune.tuner import TuneResult

if TYPE_CHECKING:  # the study's result type, for annotations only (study.py is the caller)
    from kit.studies.autotune.study import AutotuneResult

FIGURE_NAME = "autotune_profiles"
REQUEST_METRICS = (("TTFT", "samples_ttft_ms"), ("e2e", "samples_e2e_ms"))


def _screening_panel(ax, tune: TuneResult) -> None:
    screen = tune.table("screened")
    screen = screen[screen["score_s"].notna()]
    refused_labels = {r["settings"] for r in tune.refusals}
    colors = ["tab:red" if lab in refused_labels else "tab:blue" for lab in screen["label"]]
    ax.barh(range(len(screen)), screen["score_s"], color=colors)
    ax.set_yticks(range(len(screen)), [f"{a}: {c}" for a, c in zip(screen["axis"], screen["change"].astype(str))],
                  fontsize=7)
    ax.set_xlabel("modelled request time, s (screening median; red = refused)")
    ax.invert_yaxis()


def request_samples_long(measured: dict[str, dict]):
    """One row per request sample: profile, metric (TTFT / e2e), ms."""
    wide = pd.DataFrame([{"profile": n, "metric": m, "ms": mm["request"].get(col) or []}
                         for n, mm in measured.items() for m, col in REQUEST_METRICS])
    return plots.samples_long(wide, "ms").dropna(subset=["ms"]) if len(wide) else wide


def _requests_panel(ax, measured: dict[str, dict]) -> None:
    import seaborn as sns  # with pyplot, only when drawing: trial children import this package for its test kind

    long = request_samples_long(measured)
    if len(long):
        sns.pointplot(data=long, y="profile", x="ms", hue="metric", estimator=np.median, errorbar=("ci", 95),
                      ax=ax, linestyle="none", dodge=0.3)
    ax.set_xlabel("ms per RAG-shaped request (median, 95 % CI of samples)")
    ax.set_title("profiles as written (guide) and chosen from measurements (kit)")


def plot_profiles(result: "AutotuneResult") -> str:
    """The two panels side by side, saved as <out_dir>/figures/autotune_profiles.png; returns the path."""
    import matplotlib.pyplot as plt  # only when drawing: trial children import this package for its test kind

    plots.setup()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    _screening_panel(axes[0], result.tune)
    _requests_panel(axes[1], result.measured)
    fig.tight_layout()
    return plots.save_figure(fig, result.study.out_path, FIGURE_NAME)
