"""The findings report: every claim's verdict from the studies' verdicts.json, the guide's checklist ticked with
evidence, and every executed notebook rendered to HTML (inputs hidden, figures embedded) behind one index page.

Reads files only; never re-measures. `python -m kit report [--out outputs]` renders <out>/report/index.html.
Relative output roots are taken from the repository root (kit.paths.resolve). The runner (kit.runner) imports this
module for the report and the run's status file; this module never imports the runner.
"""
from __future__ import annotations

import argparse
import html
import json
import os
import time
from pathlib import Path
from typing import Sequence

import pandas as pd

from kit.drift import DRIFT_FILE, PROBE_DIR, drift_text, within_drift
from kit.paths import OUTPUTS, resolve
from kit.verdicts import CLAIM_IDS, VERDICTS_FILE

NOT_RUN = "not run"
REPORT_DIR = "report"
STATUS_FILE = "run_status.json"  # what `kit run` did with each notebook (written by kit.runner)

CLAIM_TITLES = {
    "G1": "Raise n_gpu_layers as far as VRAM allows", "G2": "Flash attention speeds things up",
    "G3": "n_batch 1024 / n_ubatch 512 for GPU", "M1": "Lower n_ctx for speed", "M2": "KV-cache settings",
    "C1": "n_threads = all CPU threads", "C2": "numactl on servers", "Q1": "Quantization speed order",
    "Q2": "Q4_K_M for production", "R1": "RAG_SEARCH_K 8 -> 5 speeds up search", "R2": "Smaller RAG context",
    "R3": "Embedding cache", "R4": "2 concurrent RAG queries", "S1": "Sampling settings speed up generation",
    "S2": "default_max_tokens 512", "O1": "nice -10 / systemd priority", "O2": "Huge pages, swappiness 10",
    "O3": "Model on NVMe SSD", "P1": "Track tokens/s, TTFT, GPU, memory, queue time", "P2": "cProfile, top 20",
    "X1": "The .env speed / balanced / quality profiles", "X2": "+50-75 % t/s, -50 % TTFT, -50 % RAG search",
    "X3": "Auto-tune: benchmark_settings, find_optimal_gpu_layers", "X4": "Memory limit and quality floor",
}

# The guide's "Контрольный список", in English, with the claims whose verdicts are its evidence.
CHECKLIST = (
    ("Raise n_gpu_layers to the maximum", ("G1", "X3")),
    ("Tune n_batch for your GPU", ("G3",)),
    ("Set the optimal n_ctx", ("M1",)),
    ("Lower rag_search_k where possible", ("R1", "R2")),
    ("Tune the generation parameters", ("S1", "S2")),
    ("Add performance monitoring", ("P1", "P2")),
    ("Test different quantizations", ("Q1", "Q2")),
    ("Optimize the system settings", ("C1", "C2", "O1", "O2", "O3")),
)
MEASURED = ("supported", "refuted", "no measurable effect")


# ---- reading --------------------------------------------------------------------------------------------------
def status_path(out_root: str | os.PathLike = OUTPUTS) -> Path:
    return resolve(out_root) / STATUS_FILE


def read_status(out_root: str | os.PathLike = OUTPUTS) -> dict[str, dict]:
    """The last `kit run`'s record per notebook (status, duration, failing cell); {} before any run."""
    p = status_path(out_root)
    if not p.exists():
        return {}
    try:
        return json.loads(p.read_text()).get("notebooks", {})
    except (json.JSONDecodeError, AttributeError):
        return {}


def study_dirs(out_root: str | os.PathLike = OUTPUTS) -> list[Path]:
    root = resolve(out_root)
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir() if d.is_dir() and (d / VERDICTS_FILE).exists())


def collect_verdicts(out_root: str | os.PathLike = OUTPUTS) -> list[dict]:
    """One entry per claim in CLAIM_IDS order: its verdict(s) from any study, or verdict "not run"."""
    found: dict[str, list[dict]] = {c: [] for c in CLAIM_IDS}
    problems = []
    for d in study_dirs(out_root):
        try:
            data = json.loads((d / VERDICTS_FILE).read_text())
            vs = data["verdicts"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            problems.append(f"{d.name}: unreadable verdicts.json ({type(exc).__name__})")
            continue
        for v in vs:
            if isinstance(v, dict) and v.get("claim") in found:
                found[v["claim"]].append({**v, "study": d.name})
    out = []
    for c in CLAIM_IDS:
        vs = found[c]
        if not vs:
            out.append({"claim": c, "title": CLAIM_TITLES.get(c, ""), "verdict": NOT_RUN, "study": "",
                        "summary": "no study has written a verdict for this claim yet", "effect": None,
                        "ci_low": None, "ci_high": None, "evidence": [], "metric": "", "unstable": False})
            continue
        for v in vs:
            out.append({"title": CLAIM_TITLES.get(c, ""), **v})
    if problems:
        out.append({"claim": "-", "title": "problems", "verdict": NOT_RUN, "summary": "; ".join(problems),
                    "study": "", "evidence": []})
    return out


def findings_table(out_root: str | os.PathLike = OUTPUTS, verdicts: list[dict] | None = None):
    """A DataFrame: claim, title, verdict, effect, 95 % CI, study, summary, evidence (from `verdicts` when given,
    else read under out_root)."""
    rows = []
    for v in verdicts if verdicts is not None else collect_verdicts(out_root):
        ci = (f"[{v['ci_low']:.3g}, {v['ci_high']:.3g}]" if v.get("ci_low") is not None
              and v.get("ci_high") is not None else "")
        rows.append({"claim": v["claim"], "title": v.get("title", ""), "verdict": v["verdict"],
                     "effect": v.get("effect"), "95% CI": ci, "study": v.get("study", ""),
                     "summary": v.get("summary") or v.get("reason") or "",
                     "unstable": bool(v.get("unstable")), "evidence": ", ".join(v.get("evidence") or [])})
    return pd.DataFrame(rows)


def checklist(out_root: str | os.PathLike = OUTPUTS, verdicts: list[dict] | None = None) -> list[dict]:
    """The guide's 8 checklist items: ticked where a claim behind it has a measured verdict on this machine."""
    verdicts = verdicts if verdicts is not None else collect_verdicts(out_root)
    by: dict[str, list[dict]] = {}
    for v in verdicts:
        by.setdefault(v["claim"], []).append(v)
    out = []
    for item, claims in CHECKLIST:
        vs = [v for c in claims for v in by.get(c, [])]
        measured = [v for v in vs if v["verdict"] in MEASURED]
        untestable = [v for v in vs if v["verdict"] == "not testable here"]
        state = "done" if measured else ("not testable here" if untestable else NOT_RUN)
        out.append({"item": item, "claims": list(claims), "ticked": bool(measured), "state": state,
                    "evidence": "; ".join(f"{v['claim']} {v['verdict']}" + (f" ({v['study']})" if v.get("study") else "")
                                          for v in vs if v["verdict"] != NOT_RUN) or "no verdict yet",
                    "links": [e for v in vs for e in (v.get("evidence") or [])]})
    return out


def checklist_table(out_root: str | os.PathLike = OUTPUTS, verdicts: list[dict] | None = None):
    return pd.DataFrame([{"": "[x]" if c["ticked"] else "[ ]", "item": c["item"], "state": c["state"],
                          "claims": ", ".join(c["claims"]), "evidence": c["evidence"]}
                         for c in checklist(out_root, verdicts)])


def write_findings(out_root: str | os.PathLike = OUTPUTS, out_dir: str | os.PathLike | None = None,
                   verdicts: list[dict] | None = None) -> dict[str, Path]:
    """findings.json and findings.md (one page, plain text) under out_dir (default <out_root>/90_findings)."""
    out = resolve(out_dir) if out_dir else resolve(out_root) / "90_findings"
    out.mkdir(parents=True, exist_ok=True)
    vs = verdicts if verdicts is not None else collect_verdicts(out_root)
    cl = checklist(out_root, vs)
    (out / "findings.json").write_text(json.dumps({"verdicts": vs, "checklist": cl}, indent=2, default=str))
    lines = ["# Findings", "", "| claim | verdict | effect [95 % CI] | study | summary |", "|---|---|---|---|---|"]
    for v in vs:
        summ = _summary(v).replace("|", "/").replace("\n", " ")
        lines.append(f"| {v['claim']} | {v['verdict']} | {_effect(v)} | {v.get('study', '')} | {summ} |")
    lines += ["", "## The guide's checklist", ""]
    lines += [f"- [{'x' if c['ticked'] else ' '}] {c['item']} - {c['state']}: {c['evidence']}" for c in cl]
    (out / "findings.md").write_text("\n".join(lines) + "\n")
    return {"json": out / "findings.json", "md": out / "findings.md"}


# ---- rendering -------------------------------------------------------------------------------------------------
def render_notebook(nb_path: str | os.PathLike, html_path: str | os.PathLike) -> Path:
    """One executed notebook -> a self-contained HTML page (inputs hidden, images embedded)."""
    # nbconvert and nbformat take seconds to import; kit.runner imports this module before it validates a run,
    # which must answer within seconds, so only rendering pays for them
    import nbformat
    from nbconvert import HTMLExporter  # (the same reason)

    nb = nbformat.read(str(nb_path), as_version=4)
    exporter = HTMLExporter(exclude_input=True, embed_images=True, exclude_input_prompt=True,
                            exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"path": str(Path(nb_path).parent)}})
    p = Path(html_path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(body, encoding="utf-8")
    return p


def _executed_notebooks(out_root: Path) -> dict[str, Path]:
    out = {}
    if not out_root.is_dir():
        return out
    for d in sorted(out_root.iterdir()):
        nb = d / f"{d.name}.ipynb"
        if d.is_dir() and nb.exists():
            out[d.name] = nb
    return out


def _link(path: str, out_root: Path, report_dir: Path) -> str | None:
    """Evidence paths are written relative to the repo root ("outputs/..."), to outputs/, or absolute."""
    p = Path(path)
    cands = [p] if p.is_absolute() else [out_root / p, resolve(p)]
    if not p.is_absolute() and p.parts and p.parts[0] == "outputs":
        cands.insert(0, out_root.joinpath(*p.parts[1:]))
    for c in cands:
        if c.exists():
            return os.path.relpath(c.resolve(), report_dir.resolve())
    return None


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;width:100%;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;
font-size:14px}th{background:#f0f0f0}.supported{background:#e3f6e3}.refuted{background:#fde2e2}
.no-measurable-effect{background:#f4f4f4}.not-testable-here{background:#fff6d6}.not-run{color:#888}
.failed{background:#fde2e2;font-weight:bold}.ok{color:#2a7a2a}.unstable{background:#fff6d6}"""


def _cls(verdict: str) -> str:
    return verdict.replace(" ", "-")


def _effect(v: dict) -> str:
    """'1.12 [1.05, 1.2]': the effect and its 95 % interval, as far as the verdict has them."""
    eff = f"{v['effect']:.3g}" if isinstance(v.get("effect"), (int, float)) else ""
    if v.get("ci_low") is not None and v.get("ci_high") is not None:
        eff += f" [{v['ci_low']:.3g}, {v['ci_high']:.3g}]"
    return eff


def _summary(v: dict) -> str:
    return str(v.get("summary") or v.get("reason") or "")


def claims_html(verdicts: list[dict], out_root: str | os.PathLike, page_dir: str | os.PathLike,
                pages: dict[str, str] | None = None, drift: dict | None = None) -> str:
    """The claims table as HTML; evidence and study links are relative to page_dir (where the page lives).

    drift: the run's speed probe summary (`kit.drift.summarize_drift`); a supported or refuted speed effect no
    larger than the machine's drift over the run is flagged (`kit.drift.within_drift`)."""
    e = html.escape
    root, rep, pages = resolve(out_root), resolve(page_dir), pages or {}
    out = ["<table><tr><th>claim</th><th>the guide says</th><th>verdict</th>"
           "<th>effect [95 % CI]</th><th>study</th><th>summary</th><th>evidence</th></tr>"]
    for v in verdicts:
        links = []
        for ev in v.get("evidence") or []:
            href = _link(str(ev), root, rep)
            links.append(f"<a href='{e(href)}'>{e(Path(ev).name)}</a>" if href else e(str(ev)))
        study = v.get("study", "")
        study = f"<a href='{e(pages[study])}'>{e(study)}</a>" if study in pages else e(study)
        flag = " (unstable)" if v.get("unstable") else ""
        moved = within_drift(v, drift)
        if moved:
            flag += f" (within the run's machine drift, x{moved:.2f})"
        out.append(f"<tr class='{_cls(v['verdict'])}'><td>{e(v['claim'])}</td><td>{e(v.get('title', ''))}</td>"
                   f"<td>{e(v['verdict'])}{flag}</td><td>{e(_effect(v))}</td><td>{study}</td>"
                   f"<td>{e(_summary(v))}</td><td>{' '.join(links)}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


def checklist_html(items: list[dict]) -> str:
    e = html.escape
    out = ["<table><tr><th></th><th>item</th><th>state</th><th>claims</th><th>evidence</th></tr>"]
    for c in items:
        out.append(f"<tr class='{_cls(c['state'])}'><td>{'&#9745;' if c['ticked'] else '&#9744;'}</td>"
                   f"<td>{e(c['item'])}</td><td>{e(c['state'])}</td><td>{e(', '.join(c['claims']))}</td>"
                   f"<td>{e(c['evidence'])}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


def render_report(out_root: str | os.PathLike = OUTPUTS, status: dict | None = None) -> Path:
    """Render every executed notebook under out_root and write out_root/report/index.html."""
    root = resolve(out_root)
    rep = root / REPORT_DIR
    rep.mkdir(parents=True, exist_ok=True)
    status = status if status is not None else read_status(root)
    executed = _executed_notebooks(root)
    pages, errors = _render_pages(executed, rep)
    vs = collect_verdicts(root)
    drift = _read_drift(root)
    e = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>llama.cpp tuning: findings</title>"
           f"<style>{_CSS}</style></head><body><h1>llama.cpp tuning guide: findings on this machine</h1>",
           f"<p>Rendered {e(time.strftime('%Y-%m-%d %H:%M'))} from {e(str(root))}. Every number comes from the "
           f"studies' result files; nothing here was re-measured.</p>"]
    if (root / "90_findings" / "findings.md").exists():
        out.append("<p>Plain-text summary: <a href='../90_findings/findings.md'>findings.md</a></p>")
    out.append(_studies_html(executed, status, pages, errors))
    out.append(f"<h2>Machine speed during the run</h2><p class='{'unstable' if drift and drift.get('drifted') else ''}'>"
               f"{e(drift_text(drift))}</p>")
    out.append("<h2>Claims</h2>")
    if any(within_drift(v, drift) for v in vs):
        out.append("<p class='unstable'>Flagged below: speed effects no larger than the machine's own speed moved "
                   "during the run (the probe's tg for generation, pp for prompts). Where the compared trials ran "
                   "minutes apart, drift alone could explain them; rerun those studies on a quiet machine before "
                   "acting on them.</p>")
    out.append(claims_html(vs, root, rep, {k: v.name for k, v in pages.items()}, drift=drift))
    out.append("<h2>The guide's checklist</h2>")
    out.append(checklist_html(checklist(root, vs)))
    out.append(_profiles_html(root, rep))
    out.append("</body></html>")
    index = rep / "index.html"
    index.write_text("\n".join(out), encoding="utf-8")
    return index


def _render_pages(executed: dict[str, Path], rep: Path) -> tuple[dict[str, Path], dict[str, str]]:
    pages, errors = {}, {}
    for stem, nb in executed.items():
        try:
            pages[stem] = render_notebook(nb, rep / f"{stem}.html")
        except Exception as exc:  # noqa: BLE001 - one broken notebook must not hide the others
            errors[stem] = f"{type(exc).__name__}: {exc}"
    return pages, errors


def _read_drift(root: Path) -> dict | None:
    p = root / PROBE_DIR / DRIFT_FILE
    try:
        return json.loads(p.read_text()) if p.exists() else None
    except json.JSONDecodeError:
        return None


def _studies_html(executed: dict[str, Path], status: dict, pages: dict[str, Path], errors: dict[str, str]) -> str:
    """The table of notebooks: status of the last run, its time, the rendered page, where a failure happened."""
    e = html.escape
    out = ["<h2>Studies</h2><table><tr><th>notebook</th><th>status</th><th>time</th><th>page</th><th>detail</th></tr>"]
    stems = sorted(set(executed) | set(status))
    for stem in stems:
        st = status.get(stem, {})
        state = st.get("status", "ok" if stem in executed else NOT_RUN)
        detail = ""
        if state == "failed":
            where = (f"cell {st.get('cell_index')} (execution count {st.get('exec_count')})"
                     if st.get("cell_index") is not None else "outside a cell")
            detail = f"{where}: {st.get('ename')}: {st.get('evalue')}"
        if stem in errors:
            detail += f" (render failed: {errors[stem]})"
        page = f"<a href='{e(pages[stem].name)}'>{e(stem)}.html</a>" if stem in pages else ""
        dur = f"{st['duration_s']:.0f} s" if isinstance(st.get("duration_s"), (int, float)) else ""
        out.append(f"<tr class='{_cls(state)}'><td>{e(stem)}</td><td>{e(state)}</td><td>{dur}</td>"
                   f"<td>{page}</td><td>{e(detail[:600])}</td></tr>")
    if not stems:
        out.append("<tr><td colspan=5 class='not-run'>no executed notebooks yet</td></tr>")
    out.append("</table>")
    return "\n".join(out)


def _profiles_html(root: Path, rep: Path) -> str:
    prof = root / "profiles"
    envs = sorted(prof.glob("*.env")) if prof.is_dir() else []
    if not envs:
        return ""
    e = html.escape
    items = [f"<li><a href='{e(os.path.relpath(p.resolve(), rep.resolve()))}'>{e(p.name)}</a></li>" for p in envs]
    return "<h2>Profiles</h2><ul>" + "".join(items) + "</ul>"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kit report", description="Render the findings report to HTML.")
    ap.add_argument("--out", default=OUTPUTS, help="output root the studies wrote to (default: outputs, from the "
                                                  "repository root)")
    args = ap.parse_args(list(argv) if argv is not None else None)
    index = render_report(args.out)
    print(index)
    return 0
