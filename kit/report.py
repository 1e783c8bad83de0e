"""The findings report. Its first screen answers "what should I change on this machine?": the settings whose
measured effect is decided and beyond the claim's band, ranked, with gain, cost and the profile to deploy; what
stays undecided is listed as such, never as advice. Then each claim as one line with its label, details and
figures one click away; the effects figure; the guide's checklist ticked only where its claims were tested; a
comparison with a second run when one is given; the notebooks rendered to HTML without stderr, warnings or
progress bars.

Reads files only; never re-measures. `python -m kit report [--out outputs] [--compare OTHER_RUN]` renders
<out>/report/index.html. Relative output roots are taken from the repository root (kit.paths.resolve). The runner
(kit.runner) imports this module for the report and the run's status file; this module never imports the runner.
"""
from __future__ import annotations

import argparse
import html
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Sequence

import pandas as pd

from kit import compare as compare_mod
from kit.config import SettingsError, read_dotenv
from kit.drift import drift_text, read_drift, within_drift
from kit.environment import ENVIRONMENT_FILE
from kit.paths import (
    OUTPUTS, SERVED_LEVELS_FILE, SERVED_SIDE_BY_SIDE_FILE, SERVED_STUDY, SERVED_SUMMARY_FILE, resolve,
)
from kit.results import RESULTS_FILE
from kit.verdicts import (
    CLAIM_IDS, DECIDED, INCONCLUSIVE, MIXED, NO_EFFECT, NOT_TESTABLE, REFUTED, SUPPORTED, VERDICTS, VERDICTS_FILE,
    label_of,
)

NOT_RUN = "not run"
REPORT_DIR = "report"
STATUS_FILE = "run_status.json"  # what `kit run` did with each notebook (written by kit.runner)
EFFECTS_FIGURE = Path("90_findings") / "figures" / "effects.png"   # notebook 90's figure, under the out root

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

# What a reader would change to act on a claim: the guide's setting and value. Claims about monitoring, profiling
# or the tuner itself change no setting. A study may name a more precise one in its verdict's details["setting"].
CLAIM_SETTINGS = {
    "G1": "LLAMACPP_N_GPU_LAYERS=40 (as many layers as VRAM holds)", "G2": "LLAMACPP_FLASH_ATTN=true",
    "G3": "LLAMACPP_N_BATCH=1024 LLAMACPP_N_UBATCH=512", "M1": "LLAMACPP_N_CTX=4096 (from 8192)",
    "M2": "LLAMACPP_ROPE_FREQ_BASE=10000", "C1": "LLAMACPP_N_THREADS=os.cpu_count()",
    "C2": "numactl --cpunodebind (LLAMACPP_NUMA)", "Q2": "LLAMACPP_MODEL_PATH: a Q4_K_M file",
    "R1": "LLAMACPP_RAG_SEARCH_K=5 (from 8)", "R2": "LLAMACPP_MAX_CONTEXT_LENGTH=4000",
    "R3": "LLAMACPP_ENABLE_EMBEDDING_CACHE=true", "R4": "LLAMACPP_CONCURRENT_RAG_QUERIES=2",
    "S1": "LLAMACPP_TEMPERATURE=0.1 LLAMACPP_TOP_P=0.9 LLAMACPP_TOP_K=40 LLAMACPP_REPEAT_PENALTY=1.1",
    "S2": "LLAMACPP_DEFAULT_MAX_TOKENS=512", "O1": "nice -10 (systemd Nice=-10)",
    "O2": "huge pages, vm.swappiness=10 (LLAMACPP_USE_MLOCK)", "O3": "the model file on an NVMe SSD",
    "X1": "the guide's .env.speed profile (against .env.quality)", "X2": "the tuned profile (against the baseline)",
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
TESTED = (*DECIDED, MIXED)   # a label that says the claim was put to the test and the interval decided something

# one colour per label: the report's CSS and the effects figure
LABEL_COLORS = {SUPPORTED: "#1a7f37", REFUTED: "#c62828", NO_EFFECT: "#6e7781", INCONCLUSIVE: "#d08700",
                MIXED: "#6a3d9a", NOT_TESTABLE: "#8d6e63", NOT_RUN: "#b0b0b0"}

# Which way is better for a verdict's metric, from its text where the verdict does not say (details
# "higher_is_better"). Effects that are not a ratio against no change (a rank correlation, a share, a
# profiler's attribution, queueing) have no "better" side.
_NOT_A_RATIO = re.compile(r"rho|spearman|share of|correlat|cprofile|queue time", re.I)
_HIGHER = re.compile(r"t/s|tokens/s|tokens_per_s|throughput\b(?!\))|recall|accuracy|mrr", re.I)
_LOWER = re.compile(r"1/throughput|\bms\b|time|latency|ttft|perplexity|kld|e2e|rag_search", re.I)
# cost keys a study may put in a verdict's details (or explicitly: details["cost"] = {"memory": ..., ...})
_COST_KEYS = {"memory": re.compile(r"rss|memory|vram|kv_mib|_mb$|_mib|ram_", re.I),
              "quality": re.compile(r"ppl|perplexity|kld|quality|accuracy|truncat", re.I),
              "recall": re.compile(r"recall|mrr", re.I)}


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


def label(v: dict) -> str:
    """The label a reader sees (kit.verdicts.label_of: borderline, samples to decide), or "not run"."""
    if v.get("verdict") not in VERDICTS:
        return str(v.get("verdict", NOT_RUN))
    try:
        return label_of(v)
    except (TypeError, ValueError):
        return v["verdict"]


def findings_table(out_root: str | os.PathLike = OUTPUTS, verdicts: list[dict] | None = None):
    """A DataFrame: claim, title, verdict (one of the six, or "not run"), label (as a reader sees it), effect,
    CI, band, study, summary, evidence (from `verdicts` when given, else read under out_root)."""
    rows = []
    for v in verdicts if verdicts is not None else collect_verdicts(out_root):
        rows.append({"claim": v["claim"], "title": v.get("title", ""), "verdict": v["verdict"], "label": label(v),
                     "effect": v.get("effect"), "CI": _ci_text(v), "band": _band_text(v),
                     "study": v.get("study", ""), "summary": _summary(v), "unstable": bool(v.get("unstable")),
                     "evidence": ", ".join(v.get("evidence") or [])})
    return pd.DataFrame(rows)


# ---- what a verdict means for a reader -----------------------------------------------------------------------
def to_float(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def direction(v: dict) -> str | None:
    """"higher" or "lower" (which way the verdict's metric is better), None where it has no better side or is
    not a ratio. From details["higher_is_better"] (or a top-level key) where the verdict has it, else its metric."""
    hib = v.get("higher_is_better", (v.get("details") or {}).get("higher_is_better"))
    if isinstance(hib, bool):
        return "higher" if hib else "lower"
    m = v.get("metric") or ""
    if not m or _NOT_A_RATIO.search(m):
        return None
    if "1/throughput" in m.lower():
        return "lower"
    if _HIGHER.search(m):
        return "higher"
    return "lower" if _LOWER.search(m) else None


def better_ratio(v: dict) -> tuple[float, float, float] | None:
    """The effect and its interval as "times better" (> 1 better): a ratio where lower is better is inverted.
    None for an effect that is not a positive ratio with a direction (a rank correlation, a share ...)."""
    eff, lo, hi = to_float(v.get("effect")), to_float(v.get("ci_low")), to_float(v.get("ci_high"))
    d = direction(v)
    if d is None or eff is None or eff <= 0:
        return None
    lo, hi = (lo, hi) if lo is not None and hi is not None and lo > 0 and hi > 0 else (eff, eff)
    return (eff, lo, hi) if d == "higher" else (1 / eff, 1 / hi, 1 / lo)


def beyond_band(v: dict) -> bool:
    """The point effect lies outside the claim's equivalence band around no change (1)."""
    eff, band = to_float(v.get("effect")), to_float(v.get("band")) or 0.0
    return eff is not None and (eff > 1 + band or eff < 1 - band)


def setting_of(v: dict) -> str:
    return str((v.get("details") or {}).get("setting") or CLAIM_SETTINGS.get(v["claim"], ""))


def _fmt_value(x) -> str:
    """A details value as text: a number, a sub-verdict's ratio with its interval, or a difference with its
    interval (e.g. the recall a smaller k costs)."""
    if isinstance(x, dict) and to_float(x.get("effect")) is not None:
        return f"x{x['effect']:.3g}" + (f" [{x['ci_low']:.3g}, {x['ci_high']:.3g}]"
                                         if to_float(x.get("ci_low")) is not None else "")
    if isinstance(x, dict) and to_float(x.get("difference")) is not None:
        pair = []
        for k in x:
            if k.endswith(("_small", "_large")) and not k.startswith("k_") and to_float(x[k]) is not None:
                name, side = k.rsplit("_", 1)
                pair.append(f"{name}@{x['k_' + side]}" if x.get("k_" + side) is not None else k)
                pair[-1] += f" {x[k]:.3g}"
        ci = (f" [{x['ci_low']:+.3g}, {x['ci_high']:+.3g}]" if to_float(x.get("ci_low")) is not None
              and to_float(x.get("ci_high")) is not None else "")
        return (", ".join(pair) + ": " if pair else "") + f"difference {x['difference']:+.3g}{ci}"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _named(key: str, text: str) -> str:
    name = key.replace("_", " ")
    return text if text.startswith(key) or text.startswith(name) else f"{name} {text}"


def costs(v: dict) -> dict[str, str]:
    """Memory, quality and recall costs from the verdict's details: details["cost"] where the study wrote it,
    else the details' keys that name one; "not measured" where neither."""
    details = v.get("details") or {}
    explicit = details.get("cost") if isinstance(details.get("cost"), dict) else {}
    out = {}
    for kind, pattern in _COST_KEYS.items():
        if explicit.get(kind) not in (None, ""):
            out[kind] = _fmt_value(explicit[kind])
            continue
        found = [_named(k, _fmt_value(x)) for k, x in details.items()
                 if pattern.search(k) and (isinstance(x, (int, float, str)) and not isinstance(x, bool)
                                           or isinstance(x, dict) and (to_float(x.get("effect")) is not None
                                                                       or to_float(x.get("difference")) is not None))]
        out[kind] = "; ".join(found[:3]) if found else "not measured"
    return out


def cost_text(cost: dict[str, str]) -> str:
    """'memory: rss peak mb 412; quality, recall: not measured', or 'not measured' where nothing was."""
    measured = [f"{k}: {x}" for k, x in cost.items() if x != "not measured"]
    missing = [k for k, x in cost.items() if x == "not measured"]
    if not measured:
        return "not measured"
    return "; ".join(measured + ([f"{', '.join(missing)}: not measured"] if missing else []))


def _pct(x: float) -> str:
    """A gain on the better scale: '+13 %', '-9 %'; from x10 on, the factor ('x10,000'), not '+999900 %'."""
    return f"x{x:,.0f}" if x >= 10 else f"{(x - 1) * 100:+.0f} %"


def gain_text(v: dict) -> str:
    """'+13 % [+8 %, +19 %] better' on the better scale, with the measured ratio beside it."""
    br = better_ratio(v)
    if br is None:
        return _effect(v)
    p, lo, hi = br
    return f"{_pct(p)} [{_pct(lo)}, {_pct(hi)}] {'better' if p >= 1 else 'worse'} (measured x{_effect(v)})"


def recommendations(verdicts: list[dict]) -> list[dict]:
    """The settings to act on, ranked by the size of the measured effect: supported or refuted verdicts of a
    claim with a setting, whose effect is a ratio beyond the claim's band. `action` is "change" where the
    guide's setting makes things better here, "do not change" where it makes them worse."""
    out = []
    for v in verdicts:
        if v.get("verdict") not in (SUPPORTED, REFUTED) or not setting_of(v) or not beyond_band(v):
            continue
        br = better_ratio(v)
        if br is None:
            continue
        helps = br[0] > 1
        if helps:
            action = "change" if v["verdict"] == SUPPORTED else "change (the guide expected otherwise)"
        else:
            action = ("do not change, the guide is wrong here" if v["verdict"] == REFUTED
                      else "do not change (as the guide warns)")
        out.append({"claim": v["claim"], "study": v.get("study", ""), "setting": setting_of(v), "action": action,
                    "helps": helps, "gain": gain_text(v), "size": abs(math.log(br[0])), "cost": costs(v),
                    "guide": CLAIM_TITLES.get(v["claim"], ""), "label": label(v), "metric": v.get("metric", ""),
                    "verdict": v})
    return sorted(out, key=lambda r: (not r["helps"], -r["size"]))


def undecided(verdicts: list[dict]) -> list[dict]:
    """Inconclusive and mixed verdicts: listed as such, never as advice."""
    return [v for v in verdicts if v.get("verdict") in (INCONCLUSIVE, MIXED)]


def not_worth_changing(verdicts: list[dict]) -> list[dict]:
    """Decided verdicts whose effect stays inside the claim's band (no meaningful effect, or a decided label
    with a point effect too small to act on)."""
    return [v for v in verdicts if v.get("verdict") == NO_EFFECT or (
        v.get("verdict") in (SUPPORTED, REFUTED) and setting_of(v) and better_ratio(v) is not None
        and not beyond_band(v))]


def checklist(out_root: str | os.PathLike = OUTPUTS, verdicts: list[dict] | None = None) -> list[dict]:
    """The guide's 8 checklist items: ticked only where every claim behind the item was tested here (a decided
    or mixed label); otherwise the state says why not (not testable here, undecided, not run)."""
    verdicts = verdicts if verdicts is not None else collect_verdicts(out_root)
    by: dict[str, list[dict]] = {}
    for v in verdicts:
        by.setdefault(v["claim"], []).append(v)
    out = []
    for item, claims in CHECKLIST:
        vs = [v for c in claims for v in by.get(c, [])]
        untested = [v for v in vs if v["verdict"] not in TESTED]
        ticked = bool(vs) and not untested
        if ticked:
            state = "tested"
        else:
            why = []
            for kind, words in ((NOT_TESTABLE, "not testable here"), (INCONCLUSIVE, "undecided"),
                                (NOT_RUN, NOT_RUN)):
                hit = [v for v in untested if v["verdict"] == kind]
                if hit:
                    why.append(f"{words}: " + "; ".join(
                        f"{v['claim']}" + (f" ({_summary(v)[:120]})" if kind == NOT_TESTABLE else
                                           f" ({label(v)})" if kind == INCONCLUSIVE else "") for v in hit))
            state = ("partly tested; " if any(v["verdict"] in TESTED for v in vs) else "") + "; ".join(why)
        out.append({"item": item, "claims": list(claims), "ticked": ticked, "state": state,
                    "evidence": "; ".join(f"{v['claim']} {label(v)}" + (f" ({v['study']})" if v.get("study") else "")
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
    recs = recommendations(vs)
    (out / "findings.json").write_text(json.dumps({"verdicts": vs, "checklist": cl, "recommendations": [
        {k: r[k] for k in ("claim", "setting", "action", "gain", "cost", "label")} for r in recs]},
        indent=2, default=str))
    lines = ["# Findings", "", "## On this machine", ""]
    lines += [f"{i}. {r['action']}: {r['setting']}: {r['gain']}; cost: {cost_text(r['cost'])} "
              f"({r['claim']}, {r['label']})"
              for i, r in enumerate(recs, 1)] or ["Nothing measured here is worth changing beyond its band."]
    und = undecided(vs)
    if und:
        lines += ["", "Undecided (not advice): " + "; ".join(f"{v['claim']} {label(v)}" for v in und)]
    lines += ["", "## Claims", "", "| claim | label | effect [CI] | band | study | summary |", "|---|---|---|---|---|---|"]
    for v in vs:
        summ = _summary(v).replace("|", "/").replace("\n", " ")
        lines.append(f"| {v['claim']} | {label(v)} | {headline_effect(v)} | {_band_text(v)} | {v.get('study', '')} | "
                     f"{summ} |")
    lines += ["", "## The guide's checklist", ""]
    lines += [f"- [{'x' if c['ticked'] else ' '}] {c['item']} - {c['state']}: {c['evidence']}" for c in cl]
    (out / "findings.md").write_text("\n".join(lines) + "\n")
    return {"json": out / "findings.json", "md": out / "findings.md"}


# ---- rendering -------------------------------------------------------------------------------------------------
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def clean_outputs(nb) -> int:
    """Drop what a reader of a rendered page should never see: stderr streams (progress-bar text, warnings,
    library chatter) and widget views (a progress bar saved without its widget state shows as text). Returns
    how many outputs were dropped."""
    dropped = 0
    for cell in nb.cells:
        if cell.get("cell_type") != "code":
            continue
        keep = [o for o in cell.get("outputs", [])
                if not (o.get("output_type") == "stream" and o.get("name") == "stderr")
                and WIDGET_MIME not in (o.get("data") or {})]
        dropped += len(cell.get("outputs", [])) - len(keep)
        cell["outputs"] = keep
    nb.metadata.pop("widgets", None)
    return dropped


def render_notebook(nb_path: str | os.PathLike, html_path: str | os.PathLike) -> Path:
    """One executed notebook -> a self-contained HTML page (inputs hidden, images embedded, no stderr, warnings
    or progress bars: `clean_outputs`)."""
    # nbconvert and nbformat take seconds to import; kit.runner imports this module before it validates a run,
    # which must answer within seconds, so only rendering pays for them
    import nbformat
    from nbconvert import HTMLExporter  # (the same reason)

    nb = nbformat.read(str(nb_path), as_version=4)
    clean_outputs(nb)
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


def _cls(verdict: str) -> str:
    return str(verdict).replace(" ", "-")


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:1.2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.2em;margin-top:1.4em}.meta{color:#555;font-size:13px;margin:.2em 0 .8em}
table{border-collapse:collapse;width:100%;margin:.6em 0}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;
font-size:14px;text-align:left}th{background:#f0f0f0}.small{font-size:12px;color:#555}
.lbl{display:inline-block;padding:1px 7px;border-radius:10px;color:#fff;font-size:12px;white-space:nowrap}
.act-change{color:#1a7f37;font-weight:bold}.act-keep{color:#c62828;font-weight:bold}
details.claim{border-bottom:1px solid #e4e4e4;padding:3px 0}details.claim>summary{cursor:pointer;font-size:14px}
details.claim>summary .eff{color:#444;font-family:ui-monospace,monospace;font-size:13px}
details.claim .body{padding:4px 0 8px 22px;font-size:14px}details.claim img{max-width:100%;margin:6px 0;border:1px solid #eee}
.not-run{color:#888}.failed{background:#fde2e2;font-weight:bold}.ok{color:#2a7a2a}.unstable{background:#fff6d6}
tr.flip td{background:#fff3e0}ul.tight{margin:.3em 0}ul.tight li{margin:.15em 0}
""" + "".join(f".{_cls(k)}.lbl{{background:{c}}}td.{_cls(k)}{{border-left:4px solid {c}}}"
              for k, c in LABEL_COLORS.items())


def _badge(v: dict) -> str:
    """The label as a coloured pill (coloured inline too, so it shows inside a notebook without the page's CSS)."""
    verdict = v.get("verdict", NOT_RUN)
    return (f"<span class='lbl {_cls(verdict)}' style='background:{LABEL_COLORS.get(verdict, '#888')};color:#fff;"
            f"padding:1px 7px;border-radius:10px'>{html.escape(label(v))}</span>")


def _ci_text(v: dict) -> str:
    lo, hi = to_float(v.get("ci_low")), to_float(v.get("ci_high"))
    return f"[{lo:.3g}, {hi:.3g}]" if lo is not None and hi is not None else ""


def _band_text(v: dict) -> str:
    band = to_float(v.get("band"))
    return f"+-{band:.0%}" if band else ""


def _effect(v: dict) -> str:
    """'1.12 [1.05, 1.2]': the effect and its interval, as far as the verdict has them."""
    eff = to_float(v.get("effect"))
    return (f"{eff:.3g} {_ci_text(v)}" if eff is not None else "").strip()


def headline_effect(v: dict) -> str:
    """The effect a one-line headline shows: 'x1.11 [1.08, 1.13]', or for a mixed verdict the range of its
    conditions' effects ('x0.92 to x1.11 over 2 conditions'), since no single condition speaks for the claim."""
    if v.get("verdict") == MIXED and v.get("conditions"):
        effs = [x for x in (to_float(c.get("effect")) for c in v["conditions"]) if x is not None]
        if effs:
            return f"x{min(effs):.3g} to x{max(effs):.3g} over {len(v['conditions'])} conditions"
    eff = _effect(v)
    return f"x{eff}" if eff else ""


def conditions_text(v: dict) -> str:
    """'tg at depth 0: supported x1.11; tg at depth 1024: refuted x0.92'."""
    return "; ".join(f"{c.get('condition', '')}: {c.get('verdict', '')}" + (f" x{to_float(c.get('effect')):.3g}"
                                                               if to_float(c.get("effect")) is not None else "")
                     for c in v.get("conditions") or [])


def _summary(v: dict) -> str:
    return str(v.get("summary") or v.get("reason") or "")


def _evidence(v: dict, root: Path, rep: Path) -> tuple[list[str], list[str]]:
    """(links to every evidence file, <img> tags of the PNGs among them), relative to the report folder."""
    e = html.escape
    links, imgs = [], []
    for ev in v.get("evidence") or []:
        href = _link(str(ev), root, rep)
        links.append(f"<a href='{e(href)}'>{e(Path(str(ev)).name)}</a>" if href else e(str(ev)))
        if href and str(ev).lower().endswith((".png", ".svg", ".jpg")):
            imgs.append(f"<img loading='lazy' src='{e(href)}' alt='{e(Path(str(ev)).name)}'>")
    return links, imgs


def _conditions_html(v: dict) -> str:
    conds = v.get("conditions") or []
    if not conds:
        return ""
    e = html.escape
    rows = "".join(f"<tr><td>{e(str(c.get('condition', '')))}</td><td>{_badge(c)}</td><td>{e(_effect(c))}</td>"
                   f"<td>{e(_summary(c))}</td></tr>" for c in conds)
    said = "depends on" in _summary(v).lower()
    head = f"Depends on {e(v['depends_on'])}. " if v.get("depends_on") and not said else ""
    return (f"<p>{head}One sub-verdict per condition:</p><table><tr><th>condition</th><th>label</th>"
            f"<th>effect [CI]</th><th>summary</th></tr>{rows}</table>")


def claims_html(verdicts: list[dict], out_root: str | os.PathLike, page_dir: str | os.PathLike,
                pages: dict[str, str] | None = None, drift: dict | None = None) -> str:
    """Each claim as one line (label, the guide's claim, effect with interval and band), its summary,
    sub-verdicts, evidence and figures one click away. Links are relative to page_dir (where the page lives).

    drift: the run's speed probe summary (`kit.drift.summarize_drift`); a supported or refuted speed effect no
    larger than the machine's drift over the run is flagged (`kit.drift.within_drift`)."""
    e = html.escape
    root, rep, pages = resolve(out_root), resolve(page_dir), pages or {}
    out = []
    for v in verdicts:
        links, imgs = _evidence(v, root, rep)
        study = v.get("study", "")
        study_html = f"<a href='{e(pages[study])}'>{e(study)}</a>" if study in pages else e(study)
        flags = []
        if v.get("unstable"):
            flags.append("unstable samples")
        moved = within_drift(v, drift)
        if moved:
            flags.append(f"within the run's machine drift, x{moved:.2f}")
        eff = headline_effect(v)
        band = _band_text(v)
        line = (f"<b>{e(v['claim'])}</b> {_badge(v)} {e(v.get('title', ''))}"
                + (f" <span class='eff'>{e(eff)}</span>" if eff else "")
                + (f" <span class='small'>band {e(band)}</span>" if band else "")
                + (f" <span class='small'>({html.escape('; '.join(flags), quote=False)})</span>" if flags else ""))
        body = [f"<p>{e(_summary(v))}</p>"]
        if v.get("metric") and v.get("verdict") != MIXED:   # a mixed claim's effects are its conditions'
            body.append(f"<p class='small'>effect: {e(v['metric'])}"
                        + (f"; {v.get('confidence', 0.95):.0%} interval" if v.get("confidence") else "") + "</p>")
        if v.get("reason") and v.get("reason") != _summary(v):
            body.append(f"<p class='small'>{e(v['reason'])}</p>")
        if band and v.get("band_why"):
            body.append(f"<p class='small'>band {e(band)}: {e(v['band_why'])}</p>")
        body.append(_conditions_html(v))
        if study or links:
            body.append(f"<p class='small'>study: {study_html}" + (f"; evidence: {' '.join(links)}" if links else "")
                        + "</p>")
        body += imgs
        out.append(f"<details class='claim {_cls(v['verdict'])}'><summary>{line}</summary>"
                   f"<div class='body'>{''.join(body)}</div></details>")
    return "\n".join(out)


def checklist_html(items: list[dict]) -> str:
    e = html.escape
    out = ["<table><tr><th></th><th>item</th><th>state</th><th>claims</th><th>evidence</th></tr>"]
    for c in items:
        out.append(f"<tr class='{'tested' if c['ticked'] else 'untested'}'>"
                   f"<td>{'&#9745;' if c['ticked'] else '&#9744;'}</td>"
                   f"<td>{e(c['item'])}</td><td>{e(c['state'])}</td><td>{e(', '.join(c['claims']))}</td>"
                   f"<td>{e(c['evidence'])}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


# ---- the profiles to deploy ----------------------------------------------------------------------------------
def find_profiles(out_root: str | os.PathLike = OUTPUTS) -> list[Path]:
    """The kit's own .env profiles of a run: <out>/profiles/*.env (the autotune study's profiles_dir) and any
    .env under <out>/85_autotune/."""
    root = resolve(out_root)
    found = sorted((root / "profiles").glob("*.env")) if (root / "profiles").is_dir() else []
    auto = root / "85_autotune"
    if auto.is_dir():
        found += sorted(p for p in auto.rglob("*.env") if p not in found)
    return found


def _profile_header(path: Path, lines: int = 2) -> list[str]:
    head = []
    for line in path.read_text(errors="replace").splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text:
            head.append(text)
    noise = [h for h in head if "noise" in h.lower() or "within" in h.lower()]
    return head[:lines] + [h for h in noise if h not in head[:lines]]


def _profile_values(paths: list[Path]) -> dict[str, dict[str, str]]:
    out = {}
    for p in paths:
        try:
            out[p.stem] = read_dotenv(p)
        except (OSError, SettingsError):
            continue
    return out


def _in_profiles(setting: str, values: dict[str, dict[str, str]]) -> str:
    """What the kit's profiles set for the LLAMACPP_* variables a recommendation names."""
    names = re.findall(r"LLAMACPP_[A-Z_]+", setting)
    parts = []
    for name in names:
        got = {p: vals[name] for p, vals in values.items() if name in vals}
        if got:
            same = len(set(got.values())) == 1
            parts.append(f"{name}={next(iter(got.values()))} ({', '.join(got)})" if same else
                         f"{name}: " + ", ".join(f"{p} {x}" for p, x in got.items()))
    return "; ".join(parts)


# ---- the first screen ----------------------------------------------------------------------------------------
def actions_html(verdicts: list[dict], out_root: str | os.PathLike, page_dir: str | os.PathLike) -> str:
    """"On this machine": the ranked settings to change or leave, with gain, cost, the guide's claim and the
    profile to deploy; then what is not worth changing, and what stays undecided (never as advice)."""
    e = html.escape
    root, rep = resolve(out_root), resolve(page_dir)
    profiles = find_profiles(root)
    values = _profile_values(profiles)
    recs = recommendations(verdicts)
    out = ["<h2 id='on-this-machine'>On this machine</h2>"]
    if recs:
        out.append("<table><tr><th>#</th><th>setting</th><th>do</th><th>measured gain [95 % CI]</th>"
                   "<th>cost</th><th>the guide says</th><th>claim</th><th>in the kit's profiles</th></tr>")
        for i, r in enumerate(recs, 1):
            cost = e(cost_text(r["cost"]))
            out.append(f"<tr><td>{i}</td><td><b>{e(r['setting'])}</b><div class='small'>{e(r['metric'])}</div></td>"
                       f"<td class='{'act-change' if r['helps'] else 'act-keep'}'>{e(r['action'])}</td>"
                       f"<td>{e(r['gain'])}</td><td class='small'>{cost}</td><td>{e(r['guide'])}</td>"
                       f"<td>{e(r['claim'])} {_badge(r['verdict'])}</td>"
                       f"<td class='small'>{e(_in_profiles(r['setting'], values)) or '-'}</td></tr>")
        out.append("</table>")
    else:
        out.append("<p>No setting of the guide was measured here with an effect beyond its band: nothing to "
                   "change on this evidence.</p>")
    if profiles:
        items = []
        for p in profiles:
            href = os.path.relpath(p.resolve(), rep.resolve())
            head = _profile_header(p)
            items.append(f"<li><a href='{e(href)}'>{e(p.name)}</a>"
                         + (f" <span class='small'>{e(' | '.join(head))}</span>" if head else "") + "</li>")
        out.append("<p><b>Deploy:</b> the kit's profiles, chosen from these measurements (copy one to your "
                   "server's .env):</p><ul class='tight'>" + "".join(items) + "</ul>")
    else:
        out.append("<p class='small'>No profile written yet: notebook 85 (autotune) writes the kit's "
                   "speed / balanced / quality .env files.</p>")
    flat = not_worth_changing(verdicts)
    if flat:
        out.append("<p><b>Not worth changing here</b> (effect inside the claim's band): "
                   + "; ".join(f"{e(v['claim'])} {e(CLAIM_TITLES.get(v['claim'], ''))} "
                               f"<span class='small'>x{e(_effect(v))} band {e(_band_text(v))}</span>" for v in flat)
                   + "</p>")
    und = undecided(verdicts)
    if und:
        out.append("<p><b>Undecided</b> (not advice: the interval does not decide it, or conditions disagree):</p>"
                   "<ul class='tight'>" + "".join(
                       f"<li>{e(v['claim'])} {e(CLAIM_TITLES.get(v['claim'], ''))}: {_badge(v)}"
                       + (f" <span class='small'>depends on {e(v.get('depends_on') or 'the condition')}: "
                          f"{e(conditions_text(v))}</span>" if v.get("verdict") == MIXED else
                          f" <span class='small'>x{e(_effect(v))}</span>" if _effect(v) else "") + "</li>"
                       for v in und)
                   + "</ul>")
    return "\n".join(out)


def _run_line(root: Path) -> str:
    """Model, CPU and build of the run, from the first environment.json and result row found."""
    env, row = {}, {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        if not env and (d / ENVIRONMENT_FILE).is_file():
            try:
                env = json.loads((d / ENVIRONMENT_FILE).read_text())
            except json.JSONDecodeError:
                env = {}
        if not row and (d / RESULTS_FILE).is_file():
            with open(d / RESULTS_FILE, encoding="utf-8", errors="replace") as fh:
                try:
                    row = json.loads(fh.readline() or "{}")
                except json.JSONDecodeError:
                    row = {}
        if env and row:
            break
    parts = []
    if row.get("model_filename"):
        parts.append(f"model {row['model_filename']}")
    if env.get("cpu_info") or row.get("cpu_info"):
        parts.append(str(env.get("cpu_info") or row.get("cpu_info")))
    if env.get("gpu_info") or row.get("gpu_info"):
        parts.append(str(env.get("gpu_info") or row.get("gpu_info")))
    if env.get("llama_cpp_python") or row.get("llama_cpp_python_version"):
        parts.append(f"llama-cpp-python {env.get('llama_cpp_python') or row.get('llama_cpp_python_version')}")
    return ", ".join(parts)


def _counts(verdicts: list[dict]) -> str:
    first = {}
    for v in verdicts:
        if v["claim"] in CLAIM_IDS:
            first.setdefault(v["claim"], v["verdict"])
    counts = pd.Series(list(first.values())).value_counts() if first else pd.Series(dtype=int)
    return ", ".join(f"{n} {k}" for k, n in counts.items())


def render_report(out_root: str | os.PathLike = OUTPUTS, status: dict | None = None,
                  compare_to: str | os.PathLike | None = None) -> Path:
    """Render every executed notebook under out_root and write out_root/report/index.html; with `compare_to`
    (another run's output root) the page ends with both runs side by side (kit.compare)."""
    root = resolve(out_root)
    rep = root / REPORT_DIR
    rep.mkdir(parents=True, exist_ok=True)
    status = status if status is not None else read_status(root)
    executed = _executed_notebooks(root)
    pages, errors = _render_pages(executed, rep)
    vs = collect_verdicts(root)
    drift = read_drift(root)
    e = html.escape
    machine = _run_line(root)
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>llama.cpp tuning: what to change</title>"
           f"<style>{_CSS}</style></head><body><h1>llama.cpp tuning: what to change on this machine</h1>",
           f"<p class='meta'>{e(machine) + '. ' if machine else ''}Rendered {e(time.strftime('%Y-%m-%d %H:%M'))} "
           f"from {e(str(root))}; every number comes from the studies' result files. Claims: {e(_counts(vs))}."
           f"{' The machine speed moved during the run: see below.' if drift and drift.get('drifted') else ''}</p>"]
    out.append(actions_html(vs, root, rep))
    out.append("<h2>Claims</h2><p class='small'>One line per claim of the guide: its label, the effect (ratio, "
               "candidate / baseline) with its interval and the band inside which an effect is too small to act "
               "on. Click a line for the summary, sub-verdicts, evidence and figures.</p>")
    if any(within_drift(v, drift) for v in vs):
        out.append("<p class='unstable'>Flagged below: speed effects no larger than the machine's own speed moved "
                   "during the run (the probe's tg for generation, pp for prompts). Where the compared trials ran "
                   "minutes apart, drift alone could explain them; rerun those studies on a quiet machine before "
                   "acting on them.</p>")
    out.append(claims_html(vs, root, rep, {k: v.name for k, v in pages.items()}, drift=drift))
    out.append(served_section(root))
    fig = root / EFFECTS_FIGURE
    if fig.exists():
        out.append("<h2>Every effect on one scale</h2><p class='small'>Ratios turned so that right is better "
                   "(a time ratio is inverted), coloured by label; effects that are not ratios in their own panel."
                   f"</p><img loading='lazy' style='max-width:100%' src='{e(os.path.relpath(fig, rep))}' "
                   "alt='effects'>")
    out.append("<h2>The guide's checklist</h2><p class='small'>Ticked only where every claim behind the item was "
               "tested here.</p>")
    out.append(checklist_html(checklist(root, vs)))
    if compare_to is not None:
        out.append(compare_section(root, compare_to))
    out.append(_studies_html(executed, status, pages, errors))
    out.append(f"<h2>Machine speed during the run</h2><p class='{'unstable' if drift and drift.get('drifted') else ''}'>"
               f"{e(drift_text(drift))}</p>")
    out.append("</body></html>")
    index = rep / "index.html"
    index.write_text("\n".join(out), encoding="utf-8")
    return index


def served_section(root: Path) -> str:
    """The served study's numbers next to the in-process ones (notebook 86's side-by-side table), its knee and what
    interrupt_requests did to answers; empty where the study has not run."""
    d = root / SERVED_STUDY
    if not (d / SERVED_SIDE_BY_SIDE_FILE).is_file():
        return ""
    e = html.escape
    try:
        sbs = pd.read_csv(d / SERVED_SIDE_BY_SIDE_FILE)
        levels = pd.read_csv(d / SERVED_LEVELS_FILE) if (d / SERVED_LEVELS_FILE).is_file() else pd.DataFrame()
        summ = json.loads((d / SERVED_SUMMARY_FILE).read_text()) if (d / SERVED_SUMMARY_FILE).is_file() else {}
    except (ValueError, OSError) as exc:
        return f"<h2>Served over HTTP</h2><p>unreadable served tables ({e(type(exc).__name__)})</p>"

    def cell(x, digits: int = 0) -> str:
        if x is None or (isinstance(x, float) and math.isnan(x)):
            return ""
        return f"{x:.{digits}f}" if isinstance(x, float) else e(str(x))

    def ratio(r: dict, metric: str) -> str:
        return f"{cell(r.get(f'{metric}_ratio'), 2)} ({cell(r.get(f'{metric}_ratio_ci'))})"

    rows = "".join(
        f"<tr><td>{e(str(r['profile']))}</td><td>{cell(r.get('in_process_ttft_ms'))}</td>"
        f"<td>{cell(r.get('served_ttft_ms'))}</td><td>{ratio(r, 'ttft')}</td>"
        f"<td>{cell(r.get('in_process_decode_ts'), 1)}</td><td>{cell(r.get('served_decode_ts'), 1)}</td>"
        f"<td>{ratio(r, 'decode_ts')}</td></tr>" for r in sbs.to_dict("records"))
    parts = ["<h2>Served over HTTP, next to in-process</h2><p class='small'>Notebook 86: each profile started as "
             "llama-cpp-python's OpenAI server and sent the same RAG-shaped requests as in-process, one after the "
             "other. Medians; served / in-process with its 95 % interval.</p>",
             "<table><tr><th>profile</th><th>TTFT in-process (ms)</th><th>TTFT served (ms)</th><th>served / "
             "in-process</th><th>decode t/s in-process</th><th>decode t/s served</th><th>served / in-process</th>"
             f"</tr>{rows}</table>"]
    knee = summ.get("knee") or {}
    words = []
    if knee.get("knee_rps"):
        words.append(f"the server kept up with Poisson arrivals up to {knee['knee_rps']} requests/s")
    if knee.get("saturated_from_rps"):
        words.append(f"and saturated at {knee['saturated_from_rps']} requests/s offered")
    if len(levels) and "part" in levels:
        for r in levels[levels["part"] == "concurrency"].to_dict("records"):
            if pd.notna(r.get("truncation_rate")):
                words.append(f"{r['load']} with interrupt_requests {'on' if r['interrupt_requests'] else 'off'}: "
                             f"{r['truncation_rate']:.0%} of answers truncated")
    if words:
        parts.append("<p>" + e("; ".join(words)) + ".</p>")
    return "\n".join(parts)


def compare_section(run_a: str | os.PathLike, run_b: str | os.PathLike) -> str:
    """This run against another, side by side (kit.compare), as a report section."""
    try:
        df, prov, speeds = compare_mod.load_comparison(run_a, run_b)
    except FileNotFoundError as exc:
        return f"<h2>Compared with another run</h2><p>{html.escape(str(exc))}</p>"
    return ("<h2 id='compare'>Compared with another run</h2>"
            + compare_mod.compare_html(df, prov, (str(resolve(run_a)), str(resolve(run_b))), label_class=_cls,
                                       speeds=speeds))


def compare_page(run_a: str | os.PathLike, run_b: str | os.PathLike, path: str | os.PathLike) -> Path:
    """`kit compare --html`: the comparison section as a page of its own."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>two runs compared</title>"
                 f"<style>{_CSS}</style></head><body>{compare_section(run_a, run_b)}</body></html>", encoding="utf-8")
    return p


def _render_pages(executed: dict[str, Path], rep: Path) -> tuple[dict[str, Path], dict[str, str]]:
    pages, errors = {}, {}
    for stem, nb in executed.items():
        try:
            pages[stem] = render_notebook(nb, rep / f"{stem}.html")
        except Exception as exc:  # noqa: BLE001 - one broken notebook must not hide the others
            errors[stem] = f"{type(exc).__name__}: {exc}"
    return pages, errors


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


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kit report", description="Render the findings report to HTML.")
    ap.add_argument("--out", default=OUTPUTS, help="output root the studies wrote to (default: outputs, from the "
                                                  "repository root)")
    ap.add_argument("--compare", default=None, metavar="OTHER_RUN",
                    help="another run's output root: add both runs side by side (kit compare) to the report")
    args = ap.parse_args(list(argv) if argv is not None else None)
    index = render_report(args.out, compare_to=args.compare)
    print(index)
    return 0
