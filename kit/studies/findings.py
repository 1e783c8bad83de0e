"""Notebook 90: every claim of the guide on one page, from the studies' verdicts.json files (never re-measures).

- `FindingsStudy`: the config (where the studies wrote their folders, where the findings go).
- `run_findings(study)`: reads every verdict once (`kit.report.collect_verdicts`), writes findings.json and
  findings.md under the study's out_dir, and returns a `Findings` with the claims table and the guide's checklist.
- `claims_html(findings, study)`, `plot_effects(findings)`: what the notebook shows.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from kit import report
from kit.config import StudyConfig, param
from kit.paths import OUTPUTS, resolve
from kit.plots import setup

VERDICT_COLORS = {"supported": "tab:green", "refuted": "tab:red", "no measurable effect": "tab:gray"}


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
        return (f"**Checklist:** {done} of {len(self.checklist)} items have a measured verdict on this machine. "
                f"Findings written to `{self.files['md']}`.")


def run_findings(study: FindingsStudy) -> Findings:
    """Read every study's verdicts once under study.out_root and write the findings files under study.out_dir."""
    verdicts = report.collect_verdicts(study.root_path)
    files = report.write_findings(study.root_path, study.out_path, verdicts=verdicts)
    return Findings(verdicts=verdicts, table=report.findings_table(verdicts=verdicts),
                    checklist=report.checklist(verdicts=verdicts), files=files)


def claims_html(findings: Findings, study: FindingsStudy) -> str:
    """The report's claims table, with links relative to <out_root>/report (where `kit report` puts it)."""
    return report.claims_html(findings.verdicts, study.root_path, study.root_path / report.REPORT_DIR)


def plot_effects(findings: Findings):
    """Every measured effect (ratio, candidate / baseline) with its 95 % interval, coloured by verdict."""
    setup()
    measured = [v for v in findings.verdicts if isinstance(v.get("effect"), (int, float))]
    fig, ax = plt.subplots(figsize=(8, 0.35 * max(len(measured), 3) + 1))
    for i, v in enumerate(measured):
        lo, hi = v.get("ci_low"), v.get("ci_high")
        color = VERDICT_COLORS.get(v["verdict"], "k")
        ax.plot([lo, hi] if lo is not None and hi is not None else [v["effect"]] * 2, [i, i], color=color)
        ax.plot(v["effect"], i, "o", color=color)
    ax.axvline(1.0, color="k", lw=0.8, ls="--")
    ax.set_yticks(range(len(measured)), [f"{v['claim']} ({v.get('study', '')})" for v in measured])
    ax.set_xlabel("effect (ratio, candidate / baseline) with 95 % CI")
    ax.set_title("measured claims (green supported, red refuted, grey no measurable effect)")
    ax.invert_yaxis()
    return fig
