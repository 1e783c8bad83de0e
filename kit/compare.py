"""Two runs side by side: per claim, the label in each run and the effect with its interval; every flip flagged,
with what the first run already said about it (inconclusive, borderline) and what changed between the runs (the
effect moved, or only the interval's width: a noisier or quieter run); what differs in their provenance (build, CPU,
model); and each run's machine speed from its speed probe. Like llama.cpp's compare-llama-bench.py, but with
intervals.

`python -m kit compare RUN_A RUN_B [--html FILE] [-o md|csv|json]` prints the table (kit.__main__); `python -m kit
report --compare RUN_B` (or `kit run --compare-to RUN_B`) adds it to the report (kit.report). Reads files only.
"""
from __future__ import annotations

import html
import json
import math
import os
from typing import Sequence

import pandas as pd

from kit.drift import read_drift
from kit.environment import ENVIRONMENT_FILE
from kit.paths import resolve
from kit.results import RESULTS_FILE, read_rows
from kit.verdicts import CLAIM_IDS, INCONCLUSIVE, VERDICTS_FILE, label_of

NOT_RUN = "not run"
WIDTH_CHANGE = 1.5  # an interval this many times as wide (or narrow) in B as in A is named in a flip's cause
# what a row says about the process that measured it (kit.sweep's provenance columns)
PROVENANCE_FIELDS = ("build_commit", "ggml_version", "llama_cpp_python_version", "cpu_info", "gpu_info", "backends",
                     "hostname", "model_filename", "model_sha256", "kit_version")
# environment.json names the same things differently
_ENV_NAMES = {"ggml_commit": "build_commit", "ggml_version": "ggml_version",
              "llama_cpp_python": "llama_cpp_python_version", "cpu_info": "cpu_info", "gpu_info": "gpu_info",
              "backends": "backends", "hostname": "hostname"}


def run_verdicts(root: str | os.PathLike) -> dict[tuple[str, str], dict]:
    """Every verdict under a run's output root: {(claim, study folder): verdicts.json entry}."""
    out: dict[tuple[str, str], dict] = {}
    base = resolve(root)
    if not base.is_dir():
        raise FileNotFoundError(f"{base}: no such output folder")
    for d in sorted(p for p in base.iterdir() if (p / VERDICTS_FILE).is_file()):
        try:
            entries = json.loads((d / VERDICTS_FILE).read_text())["verdicts"]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
        for v in entries:
            if isinstance(v, dict) and v.get("claim") in CLAIM_IDS:
                out[(v["claim"], d.name)] = v
    return out


def _label(v: dict | None) -> str:
    if v is None:
        return NOT_RUN
    try:
        return label_of(v)
    except (TypeError, ValueError):
        return str(v.get("verdict", "?"))


def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def effect_text(v: dict | None) -> str:
    """'1.13 [1.08, 1.19]', or '' where the verdict has no effect."""
    if v is None or _num(v.get("effect")) is None:
        return ""
    eff = f"{v['effect']:.3g}"
    if _num(v.get("ci_low")) is not None and _num(v.get("ci_high")) is not None:
        eff += f" [{v['ci_low']:.3g}, {v['ci_high']:.3g}]"
    return eff


def _pair(a: dict[tuple[str, str], dict], b: dict[tuple[str, str], dict]) -> list[tuple[str, str, dict | None,
                                                                                        dict | None]]:
    """(claim, study, verdict in A, verdict in B) in claim order; a claim whose study folder was renamed between
    the runs is still paired when each run has it once."""
    out = []
    for claim in CLAIM_IDS:
        ka = [k for k in a if k[0] == claim]
        kb = [k for k in b if k[0] == claim]
        if len(ka) == 1 and len(kb) == 1 and ka != kb:
            out.append((claim, ka[0][1], a[ka[0]], b[kb[0]]))
            continue
        for key in sorted(set(ka) | set(kb), key=lambda k: k[1]):
            out.append((claim, key[1], a.get(key), b.get(key)))
    return out


def _first_run_said(va: dict | None) -> str:
    """What run A's verdict already said about its own reliability."""
    if va is None:
        return NOT_RUN
    if va.get("verdict") == INCONCLUSIVE:
        return "inconclusive"
    if va.get("borderline"):
        return "borderline"
    return "decided"


def _condition_changes(va: dict | None, vb: dict | None) -> str:
    """Sub-verdicts (conditions) whose label differs between the runs: 'depth 1024: refuted -> inconclusive'."""
    ca = {c.get("condition"): c for c in (va or {}).get("conditions") or []}
    cb = {c.get("condition"): c for c in (vb or {}).get("conditions") or []}
    changes = []
    for name in list(dict.fromkeys([*ca, *cb])):
        la, lb = ca.get(name, {}).get("verdict", NOT_RUN), cb.get(name, {}).get("verdict", NOT_RUN)
        if la != lb:
            changes.append(f"{name}: {la} -> {lb}")
    return "; ".join(changes)


def compare_runs(run_a: str | os.PathLike, run_b: str | os.PathLike) -> pd.DataFrame:
    """One row per claim (and study) found in either run: label and effect with interval in each, `flip` where
    both ran and the labels differ (a borderline flag alone is no flip), what run A said about it, and which
    sub-verdicts changed."""
    rows = []
    for claim, study, va, vb in _pair(run_verdicts(run_a), run_verdicts(run_b)):
        ea, eb = _num((va or {}).get("effect")), _num((vb or {}).get("effect"))
        both = va is not None and vb is not None
        rows.append({
            "claim": claim, "study": study,
            "verdict_a": (va or {}).get("verdict", NOT_RUN), "verdict_b": (vb or {}).get("verdict", NOT_RUN),
            "label_a": _label(va), "label_b": _label(vb),
            "effect_a": ea, "ci_low_a": _num((va or {}).get("ci_low")), "ci_high_a": _num((va or {}).get("ci_high")),
            "effect_b": eb, "ci_low_b": _num((vb or {}).get("ci_low")), "ci_high_b": _num((vb or {}).get("ci_high")),
            "b_over_a": round(eb / ea, 4) if ea and eb is not None else None,
            "flip": both and va.get("verdict") != vb.get("verdict"),
            "first_run": _first_run_said(va),
            "conditions_changed": _condition_changes(va, vb),
            "metric": (va or vb or {}).get("metric", ""),
            "n_a": _n(va), "n_b": _n(vb),
        })
        rows[-1]["cause"] = flip_cause(rows[-1]) if rows[-1]["flip"] else ""
    cols = ["claim", "study", "verdict_a", "verdict_b", "label_a", "label_b", "effect_a", "ci_low_a", "ci_high_a",
            "effect_b", "ci_low_b", "ci_high_b", "b_over_a", "flip", "first_run", "cause", "conditions_changed",
            "metric", "n_a", "n_b"]
    return pd.DataFrame(rows, columns=cols)


def _n(v: dict | None) -> int | None:
    """Samples per side behind a verdict's interval (the smaller side), where the verdict says."""
    ns = [_num((v or {}).get(k)) for k in ("n_baseline", "n_candidate")]
    ns = [int(x) for x in ns if x is not None]
    return min(ns) if ns else None


def _log_width(lo, hi) -> float | None:
    if lo is None or hi is None or pd.isna(lo) or pd.isna(hi) or lo <= 0 or hi <= lo:
        return None
    return math.log(hi / lo)


def flip_cause(row) -> str:
    """What changed between the runs for a flipped claim, from the two intervals alone: whether each run's point
    lies inside the other's interval (the same effect, measured with different precision) or not (the effect
    moved), and how much wider or narrower B's interval is, with the samples per side where they differ. '' where
    either run has no interval."""
    ea, eb = row["effect_a"], row["effect_b"]
    la, ha, lb, hb = row["ci_low_a"], row["ci_high_a"], row["ci_low_b"], row["ci_high_b"]
    if any(x is None or pd.isna(x) for x in (ea, eb, la, ha, lb, hb)):
        return ""
    inside = la <= eb <= ha and lb <= ea <= hb
    parts = ["each run's effect lies inside the other's interval" if inside else
             "the effect moved: a run's effect lies outside the other's interval"]
    wa, wb = _log_width(la, ha), _log_width(lb, hb)
    if wa and wb and (wb / wa >= WIDTH_CHANGE or wa / wb >= WIDTH_CHANGE):
        wider = wb > wa
        ratio = wb / wa if wider else wa / wb
        n_a, n_b = row.get("n_a"), row.get("n_b")
        same_n = n_a is not None and n_a == n_b
        why = (" with the same samples per side: a noisier run" if same_n and wider else
               " with the same samples per side: a quieter run" if same_n else
               f" (samples per side: A {n_a}, B {n_b})" if n_a is not None and n_b is not None else "")
        parts.append(f"B's interval x{ratio:.1f} as wide as A's{why}" if wider else
                     f"A's interval x{ratio:.1f} as wide as B's{why}")
    return "; ".join(parts)


def run_provenance(root: str | os.PathLike) -> dict[str, list[str]]:
    """The distinct values of each provenance field in a run: from every row of every results.jsonl under it
    and from each study's environment.json (the latest sweep's machine and build)."""
    seen: dict[str, set[str]] = {f: set() for f in PROVENANCE_FIELDS}
    base = resolve(root)
    for d in sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []:
        env = d / ENVIRONMENT_FILE
        if env.is_file():
            try:
                data = json.loads(env.read_text())
            except json.JSONDecodeError:
                data = {}
            for k, f in _ENV_NAMES.items():
                if data.get(k) not in (None, ""):
                    seen[f].add(str(data[k]))
        for row in read_rows(d / RESULTS_FILE):
            for f in PROVENANCE_FIELDS:
                if row.get(f) not in (None, ""):
                    seen[f].add(str(row[f]))
    return {f: sorted(v) for f, v in seen.items()}


def provenance_diff(run_a: str | os.PathLike, run_b: str | os.PathLike) -> pd.DataFrame:
    """One row per provenance field: the values in each run, and whether they differ."""
    pa, pb = run_provenance(run_a), run_provenance(run_b)
    return pd.DataFrame([{"field": f, "run_a": ", ".join(pa[f]) or "-", "run_b": ", ".join(pb[f]) or "-",
                          "differs": pa[f] != pb[f]} for f in PROVENANCE_FIELDS])


def machine_speed(root: str | os.PathLike) -> str:
    """The run's speed probe (kit.drift) as one phrase: 'tg64 87.0 -> 80.9, pp128 281 -> 247 t/s (start -> end)',
    or 'not probed'. Two runs of one machine at different speeds differ in noise too, which moves intervals."""
    tests = (read_drift(root) or {}).get("tests") or []
    parts = [f"{t['test']} {t['start_ts']:.3g} -> {t['end_ts']:.3g}" for t in tests
             if _num(t.get("start_ts")) is not None and _num(t.get("end_ts")) is not None]
    return ", ".join(parts) + " t/s (start -> end of the run)" if parts else "not probed"


def load_comparison(run_a: str | os.PathLike, run_b: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame,
                                                                                   tuple[str, str]]:
    """Everything `kit compare` and the report's section show: the claims, the provenance, each run's speed."""
    return (compare_runs(run_a, run_b), provenance_diff(run_a, run_b), (machine_speed(run_a), machine_speed(run_b)))


def _ci(row, side: str) -> str:
    eff = row[f"effect_{side}"]
    if eff is None or pd.isna(eff):
        return ""
    lo, hi = row[f"ci_low_{side}"], row[f"ci_high_{side}"]
    return f"{eff:.3g}" + (f" [{lo:.3g}, {hi:.3g}]" if lo is not None and not pd.isna(lo) else "")


def flip_note(row) -> str:
    """'FLIP (inconclusive in A)' / 'FLIP (borderline in A)' / 'FLIP (decided in A)', or ''."""
    if not row["flip"]:
        if row["verdict_a"] == NOT_RUN or row["verdict_b"] == NOT_RUN:
            return "only in one run"
        return ""
    return f"FLIP ({row['first_run']} in A)" + (f": {row['cause']}" if row.get("cause") else "")


def row_note(row) -> str:
    """The flip note, then the conditions whose sub-verdict changed."""
    parts = [flip_note(row)] + ([f"conditions: {row['conditions_changed']}"] if row["conditions_changed"] else [])
    return "; ".join(p for p in parts if p)


def summary_lines(df: pd.DataFrame) -> list[str]:
    """How many claims kept their label, and each flip with what run A said about it."""
    both = df[(df["verdict_a"] != NOT_RUN) & (df["verdict_b"] != NOT_RUN)]
    flips = df[df["flip"]]
    lines = [f"same label in both runs: {len(both) - len(flips)} of {len(both)} claims measured in both"]
    if len(flips):
        lines.append("flips: " + " | ".join(f"{r.claim} {r.verdict_a} -> {r.verdict_b} ({r.first_run} in A)"
                                             + (f": {r.cause}" if r.cause else "") for r in flips.itertuples()))
        warned = flips["first_run"].isin(["inconclusive", "borderline"])
        lines.append("every flip was inconclusive or borderline in A: " + ("yes" if warned.all() else
                     "no: " + ", ".join(flips[~warned]["claim"])))
    else:
        lines.append("no flips")
    return lines


def format_comparison(df: pd.DataFrame, prov: pd.DataFrame | None = None, names: Sequence[str] = ("A", "B"),
                      fmt: str = "md", speeds: Sequence[str] | None = None) -> str:
    """The comparison as a markdown table (and the provenance fields that differ), or csv / json."""
    if fmt == "csv":
        return df.to_csv(index=False)
    if fmt == "json":
        return json.dumps({"claims": df.to_dict("records"),
                           "provenance": [] if prov is None else prov.to_dict("records")}, indent=2, default=str)
    a, b = names
    lines = [f"A = {a}", f"B = {b}", "",
             "| claim | study | A label | A effect [CI] | B label | B effect [CI] | B/A | flip |",
             "|---|---|---|---|---|---|---:|---|"]
    for _, r in df.iterrows():
        ratio = f"{r['b_over_a']:.3f}" if r["b_over_a"] is not None and not pd.isna(r["b_over_a"]) else ""
        note = row_note(r)
        lines.append(f"| {r['claim']} | {r['study']} | {r['label_a']} | {_ci(r, 'a')} | {r['label_b']} | "
                     f"{_ci(r, 'b')} | {ratio} | {note} |".replace("\n", " "))
    lines += [""] + summary_lines(df)
    if prov is not None:
        diff = prov[prov["differs"]]
        lines += ["", "provenance: " + ("the same build, machine and model" if diff.empty else "differs in")]
        lines += [f"- {r.field}: A {r.run_a} | B {r.run_b}" for r in diff.itertuples()]
    if speeds is not None:
        lines += ["", f"machine speed (speed probe): A {speeds[0]}; B {speeds[1]}"]
    return "\n".join(lines)


def compare_html(df: pd.DataFrame, prov: pd.DataFrame | None = None, names: Sequence[str] = ("A", "B"),
                 label_class=lambda label: label.split(":")[0].split(" (")[0].replace(" ", "-"),
                 speeds: Sequence[str] | None = None) -> str:
    """The comparison as an HTML section (for the report, or `kit compare --html`)."""
    e = html.escape
    a, b = names
    out = [f"<p>A = {e(str(a))}<br>B = {e(str(b))}</p>",
           "<table><tr><th>claim</th><th>study</th><th>A label</th><th>A effect [CI]</th><th>B label</th>"
           "<th>B effect [CI]</th><th>B/A</th><th>flip</th></tr>"]
    for _, r in df.iterrows():
        ratio = f"{r['b_over_a']:.3f}" if r["b_over_a"] is not None and not pd.isna(r["b_over_a"]) else ""
        note = row_note(r)
        out.append(f"<tr class='{'flip' if r['flip'] else ''}'><td>{e(r['claim'])}</td><td>{e(r['study'])}</td>"
                   f"<td class='{label_class(r['verdict_a'])}'>{e(r['label_a'])}</td><td>{e(_ci(r, 'a'))}</td>"
                   f"<td class='{label_class(r['verdict_b'])}'>{e(r['label_b'])}</td><td>{e(_ci(r, 'b'))}</td>"
                   f"<td>{ratio}</td><td>{e(note)}</td></tr>")
    out.append("</table>")
    out.append("<ul>" + "".join(f"<li>{e(s)}</li>" for s in summary_lines(df)) + "</ul>")
    if prov is not None:
        diff = prov[prov["differs"]]
        if diff.empty:
            out.append("<p>Provenance: the same build, machine and model in both runs.</p>")
        else:
            out.append("<p>Provenance differs:</p><table><tr><th>field</th><th>A</th><th>B</th></tr>"
                       + "".join(f"<tr><td>{e(r.field)}</td><td>{e(r.run_a)}</td><td>{e(r.run_b)}</td></tr>"
                                 for r in diff.itertuples()) + "</table>")
    if speeds is not None:
        out.append(f"<p>Machine speed (speed probe): A {e(speeds[0])}; B {e(speeds[1])}</p>")
    return "\n".join(out)
