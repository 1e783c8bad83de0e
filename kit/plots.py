"""Plot helpers shared by the studies: one look, error bars always, figures saved next to the rows they show."""
from __future__ import annotations

import functools
import os
import sys
from types import SimpleNamespace

from kit.paths import resolve as resolve_path


@functools.cache
def libs() -> SimpleNamespace:
    """matplotlib's pyplot, numpy and seaborn, imported on first use with a headless-safe backend (Agg unless a
    display or a Jupyter kernel is there). Deferred on purpose: they take over a second and about 95 MB to
    import, and the trial children that import study modules (test kinds) never draw; their RSS is measured."""
    import matplotlib  # deferred: see the docstring

    if not os.environ.get("DISPLAY") and "ipykernel" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: see the docstring
    import numpy as np  # deferred: see the docstring
    import seaborn as sns  # deferred: see the docstring

    return SimpleNamespace(plt=plt, np=np, sns=sns)


def setup() -> None:
    """The house theme."""
    libs().sns.set_theme(style="whitegrid", context="notebook")


def save_figure(fig, out_dir: str | os.PathLike, name: str) -> str:
    """Save as PNG under out_dir/figures/<name>.png and return the absolute path (for verdict evidence).
    A relative out_dir is taken from the repository root (kit.paths.resolve), not the working directory."""
    path = resolve_path(out_dir) / "figures" / f"{name}.png"
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
    plt, np, sns = libs().plt, libs().np, libs().sns
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


def panel_figure(panels, ncols: int, figsize: tuple[float, float]):
    """The frame of a study's multi-panel figure: one axis per (title, draw) in `panels`, row by row.

    draw(ax) plots its panel, or leaves it empty when its part has no rows; the title is set either way.
    Returns the Figure; the caller saves it (`save_figure`)."""
    setup()
    plt = libs().plt
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, squeeze=False)
    for ax, (title, draw) in zip(axes.flat, panels):
        draw(ax)
        ax.set_title(title)
    fig.tight_layout()
    return fig


def median_plot(data, x: str, y: str, ax, kind: str = "point", hue: str | None = None, **kw):
    """Median per x (and hue) with seaborn's 95 % bootstrap interval of the rows: kind "point" or "bar"."""
    np, sns = libs().np, libs().sns
    if kind == "point":
        kw.setdefault("markersize", 4)
        return sns.pointplot(data=data, x=x, y=y, hue=hue, estimator=np.median, errorbar=("ci", 95), ax=ax, **kw)
    return sns.barplot(data=data, x=x, y=y, hue=hue, estimator=np.median, errorbar=("ci", 95), ax=ax, **kw)
