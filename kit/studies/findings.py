"""Notebook 90: every claim of the guide on one page, from the studies' verdicts.json files (never re-measures).

- `FindingsStudy`: the config (where the studies wrote their folders, where the findings go).
- `run_findings(study)`: reads every verdict once (`kit.report.collect_verdicts`), writes findings.json and
  findings.md under the study's out_dir, and returns a `Findings` with the claims table and the guide's checklist.
- `actions_html`, `claims_html(findings, study)`, `plot_effects(findings)`: what the notebook shows: the settings
  to change on this machine, each claim's one-line headline, and every effect on a "better ->" scale.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from kit import report
from kit.config import StudyConfig, param
from kit.paths import OUTPUTS, resolve
from kit.plots import libs, setup
from kit.verdicts import VERDICTS


@dataclass
class FindingsStudy(StudyConfig):
    """Configuration of notebook 90. model and repetitions are unused (it measures nothing); they are there
    because every study config has them."""

    out_dir: str = param("outputs/90_findings", "findings.json, findings.md and the figure")
    out_root: str = param(OUTPUTS, "where the studies wrote their folders (relative: to the repository root)")

    @property
    def root_path(self) -> Path:
        """out_root as an absolute path."""
        return resolve(self.out_root)


@dataclass
class Findings:
    verdicts: list[dict]      # one entry per claim and study (kit.report.collect_verdicts), "not run" where none
    table: pd.DataFrame       # kit.report.findings_table's columns
    checklist: list[dict]     # the guide's 8 items (kit.report.checklist)
    files: dict[str, Path]    # findings.json and findings.md

    def counts_text(self) -> str:
        claims = self.table.drop_duplicates("claim")
        counts = claims["verdict"].value_counts()
        return f"**{len(claims)} claims:** " + ", ".join(f"{n} {v}" for v, n in counts.items())

    def checklist_table(self) -> pd.DataFrame:
        return report.checklist_table(verdicts=self.verdicts)

    def checklist_text(self) -> str:
        done = sum(c["ticked"] for c in self.checklist)
        return (f"**Checklist:** {done} of {len(self.checklist)} items were tested on this machine (every claim "
                f"behind them decided or mixed). Findings written to `{self.files['md']}`.")


def run_findings(study: FindingsStudy) -> Findings:
    """Read every study's verdicts once under study.out_root and write the findings files under study.out_dir."""
    verdicts = report.collect_verdicts(study.root_path)
    files = report.write_findings(study.root_path, study.out_path, verdicts=verdicts)
    return Findings(verdicts=verdicts, table=report.findings_table(verdicts=verdicts),
                    checklist=report.checklist(verdicts=verdicts), files=files)


def actions_html(findings: Findings, study: FindingsStudy) -> str:
    """The report's first screen: the settings to change on this machine, ranked, and what stays undecided."""
    return report.actions_html(findings.verdicts, study.root_path, study.root_path / report.REPORT_DIR)


def claims_html(findings: Findings, study: FindingsStudy) -> str:
    """Each claim as one line with its label; details and figures one click away (links relative to
    <out_root>/report, where `kit report` puts the page)."""
    return report.claims_html(findings.verdicts, study.root_path, study.root_path / report.REPORT_DIR)


def effect_points(verdicts: list[dict]) -> tuple[list[dict], list[dict]]:
    """(ratios on the "better" scale, other effects): one point per claim, or per condition of a mixed claim.
    A ratio where lower is better is inverted (kit.report.better_ratio); an effect that is not such a ratio (a
    rank correlation, a share) keeps its own scale."""
    ratios, others = [], []
    for v in verdicts:
        if v.get("verdict") not in VERDICTS:
            continue
        parts = ([({**c, "claim": v["claim"]}, f"{v['claim']}: {c.get('condition', '')}") for c in v["conditions"]]
                 if v.get("conditions") and v["verdict"] == "mixed" else [(v, v["claim"])])
        for part, name in parts:
            br = report.better_ratio(part)
            if br is not None:
                ratios.append({"name": name, "point": br[0], "lo": br[1], "hi": br[2], "verdict": part["verdict"],
                               "band": report.to_float(part.get("band"))})
            elif isinstance(part.get("effect"), (int, float)):
                lo, hi = part.get("ci_low"), part.get("ci_high")
                others.append({"name": name, "point": part["effect"], "lo": part["effect"] if lo is None else lo,
                               "hi": part["effect"] if hi is None else hi, "verdict": part["verdict"],
                               "metric": part.get("metric", "")})
    return ratios, others


TICKS = (0.1, 0.25, 0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)


def _draw(ax, points: list[dict]) -> None:
    for i, p in enumerate(points):
        color = report.LABEL_COLORS.get(p["verdict"], "k")
        ax.plot([p["lo"], p["hi"]], [i, i], color=color, lw=2)
        ax.plot(p["point"], i, "o", color=color)
    ax.set_yticks(range(len(points)), [p["name"] for p in points])
    ax.set_ylim(len(points) - 0.5, -0.5)


def plot_effects(findings: Findings):
    """Every claim's effect with its interval on a "better ->" scale (times better, log axis, a time ratio
    inverted), coloured by label; effects that are not ratios (rank correlation, share ...) in a panel of their
    own."""
    setup()
    plt = libs().plt
    ratios, others = effect_points(findings.verdicts)
    n = max(len(ratios), len(others), 3)
    fig, axes = plt.subplots(1, 2 if others else 1, figsize=(11 if others else 8, 0.32 * n + 1.6), squeeze=False,
                             gridspec_kw={"width_ratios": [2, 1]} if others else None)
    ax = axes[0][0]
    _draw(ax, ratios)
    if ratios:
        ax.set_xscale("log")
        lo = min(p["lo"] for p in ratios)
        hi = max(p["hi"] for p in ratios)
        ticks = [t for t in TICKS if lo / 1.1 <= t <= hi * 1.1] or [1.0]
        ax.xaxis.set_major_locator(plt.FixedLocator(ticks))
        ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda x, _: f"x{x:g}"))
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        band = max((p["band"] or 0 for p in ratios), default=0)
        if band:
            ax.axvspan(1 - band, 1 + band, color="0.92", zorder=0)
    ax.axvline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel("times better than the baseline (interval)  better →")
    ax.set_title("ratios, right is better\n(time ratios inverted)", fontsize=10)
    if others:
        _draw(axes[0][1], others)
        axes[0][1].axvline(0.0, color="k", lw=0.6, ls=":")
        axes[0][1].set_xlabel("effect on its own scale (see each claim's metric)")
        axes[0][1].set_title("not ratios\n(own scale)", fontsize=10)
    handles = [plt.Line2D([], [], color=c, marker="o", lw=2, label=k) for k, c in report.LABEL_COLORS.items()
               if any(p["verdict"] == k for p in ratios + others)]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.05 if handles else 0, 1, 1))
    return fig
