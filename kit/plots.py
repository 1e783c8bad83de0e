"""Plot helpers shared by the studies: one look, error bars always, figures saved next to the rows they show."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import matplotlib

# Headless-safe backend, chosen before pyplot is imported: Agg unless a display or a Jupyter kernel is there.
if not os.environ.get("DISPLAY") and "ipykernel" not in sys.modules:
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after the backend choice above
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402


def setup() -> None:
    """The house theme."""
    sns.set_theme(style="whitegrid", context="notebook")


def save_figure(fig, out_dir: str | os.PathLike, name: str) -> str:
    """Save as PNG under out_dir/figures/<name>.png and return the path (for verdict evidence)."""
    path = Path(out_dir) / "figures" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return str(path)


def samples_long(df, value: str = "samples_ts"):
    """Explode a list column of raw samples into one row per sample (for seaborn's own error bars)."""
    d = df[df[value].notna()].explode(value).copy()
    d[value] = d[value].astype(float)
    return d


def speed_plot(df, x: str, y: str = "samples_ts", hue: str | None = "test", ax=None, title: str = "",
               ylabel: str = "tokens/s", logx: bool = False):
    """Median with a 95 % bootstrap interval of the raw samples per x (and hue): what every speed sweep shows."""
    setup()
    long = samples_long(df, y) if y.startswith("samples_") else df
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    sns.pointplot(data=long, x=x, y=y, hue=hue, estimator=np.median, errorbar=("ci", 95), ax=ax,
                  dodge=0.2 if hue else False, markersize=4, linewidth=1.2, native_scale=logx)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_ylabel(ylabel)
    ax.set_title(title or f"{ylabel} against {x} (median, 95 % CI of samples)")
    return ax
