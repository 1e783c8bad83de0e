"""Machine speed drift over a study run: the same short engine bench before the first notebook and after the last.

Every interval the kit prints comes from the repetitions inside one trial, measured within seconds of each other.
Two configurations measured minutes apart also differ by whatever the machine did in between (another tenant on a
shared host, thermal limits, frequency scaling), and no per-trial interval shows that. `kit run` therefore times
the same tg and pp tests, in a child process like any trial, at the start ("start") and at the end ("end") of the
run, and the report prints the end/start ratio with its bootstrap interval. A ratio far from 1 means comparisons
between trials run at different times carry at least that much extra uncertainty.

Rows go to <out>/speed_probe/results.jsonl (one per phase and test, with the run's id), the summary to drift.json.
"""
from __future__ import annotations

import json
import os
import re

from kit.config import Settings
from kit.measure import Test, pp, tg
from kit.paths import DEFAULT_MODEL, resolve
from kit.results import read_rows
from kit.sweep import run_sweep
from kit.verdicts import bootstrap_ratio

PROBE_DIR = "speed_probe"
DRIFT_FILE = "drift.json"
DRIFT_WARN = 0.10  # |end/start - 1| above this is called out in the report
# verdict metrics that are a speed or a time of the machine (the drift moves them); not quality, ranks or shares
SPEED_METRIC = re.compile(r"t/s|tokens/s|latency|ttft|load ms|request time|e2e time|embedding time", re.I)


def probe_tests(quick: bool = False):
    return [tg(16), pp(32)] if quick else [tg(64), pp(128)]


def run_probe(model: str | None, out_root: str | os.PathLike, phase: str, run_id: str, quick: bool = False,
              repetitions: int = 5) -> list[dict]:
    """One trial (child process, `kit.sweep.run_sweep`) of the probe tests; returns this phase's rows.

    Rows land in <out>/speed_probe/results.jsonl with the usual provenance plus `phase` and `run_id`; the run id
    and phase are in the tests' params too, so each probe is a trial of its own and never a resumed one.
    """
    tests = [Test(t.kind, t.n_prompt, t.n_gen, t.n_depth, {"phase": phase, "run_id": run_id})
             for t in probe_tests(quick)]
    s = Settings(model=model or DEFAULT_MODEL, n_ctx=max(t.tokens_needed() for t in tests) + 64)
    df = run_sweep(PROBE_DIR, s, tests, repetitions, out_root=out_root, timeout_s=300, progress=False,
                   extra={"phase": phase, "run_id": run_id})
    mine = df[(df["run_id"] == run_id) & (df["phase"] == phase)]
    return mine.to_dict("records")


def summarize_drift(out_root: str | os.PathLike, run_id: str | None = None) -> dict | None:
    """end/start ratio of median t/s per test for one run (the latest run with both phases if run_id is None).

    Writes and returns {"run_id", "tests": [{test, start_ts, end_ts, ratio, ci_low, ci_high, drifted}], ...};
    None when no run has both phases measured.
    """
    out = resolve(out_root) / PROBE_DIR
    rows = [r for r in read_rows(out / "results.jsonl") if r.get("status") == "ok" and r.get("samples_ts")]
    # the last row per (run, test, phase): one pass over the file instead of a scan per test and phase
    last = {(r["run_id"], r["test"], r["phase"]): r for r in rows}
    if run_id is None:
        phases: dict[str, set] = {}
        for rid, _, phase in last:
            phases.setdefault(rid, set()).add(phase)
        complete = [rid for rid, ph in phases.items() if ph >= {"start", "end"}]
        if not complete:
            return None
        run_id = complete[-1]
    tests = []
    for name in dict.fromkeys(t for rid, t, _ in last if rid == run_id):
        start, end = last.get((run_id, name, "start")), last.get((run_id, name, "end"))
        if not start or not end:
            continue
        ratio, lo, hi = bootstrap_ratio(end["samples_ts"], start["samples_ts"])
        tests.append({"test": name, "start_ts": start.get("median_ts"), "end_ts": end.get("median_ts"),
                      "start_time": start["test_time"], "end_time": end["test_time"],
                      "ratio": round(ratio, 4), "ci_low": round(lo, 4), "ci_high": round(hi, 4),
                      "drifted": abs(ratio - 1) > DRIFT_WARN and not (lo <= 1 <= hi)})
    if not tests:
        return None
    summary = {"run_id": run_id, "warn_above": DRIFT_WARN, "tests": tests,
               "drifted": any(t["drifted"] for t in tests)}
    (out / DRIFT_FILE).write_text(json.dumps(summary, indent=2))
    return summary


def read_drift(out_root: str | os.PathLike) -> dict | None:
    """A run's drift.json as summarize_drift wrote it; None where the run was not probed or the file is broken."""
    p = resolve(out_root) / PROBE_DIR / DRIFT_FILE
    try:
        return json.loads(p.read_text()) if p.exists() else None
    except json.JSONDecodeError:
        return None


def drift_text(summary: dict | None) -> str:
    """One paragraph for the report."""
    if not summary:
        return ("The machine's speed was not probed at both ends of a run (`kit run` does it; `--no-probe` "
                "skips it), so how much it drifted during the studies is unknown.")
    parts = [f"{t['test']} {t['start_ts']:.1f} -> {t['end_ts']:.1f} t/s (end/start x{t['ratio']:.3f}, 95 % CI "
             f"{t['ci_low']:.3f}-{t['ci_high']:.3f})" for t in summary["tests"]]
    head = "The same engine bench at the start and at the end of this run: " + "; ".join(parts) + "."
    if summary["drifted"]:
        return (head + f" The machine's speed moved by more than {summary['warn_above']:.0%} during the run: "
                "comparisons between trials run minutes apart carry that much extra uncertainty, which the "
                "per-trial intervals do not show. Effects smaller than the drift deserve a rerun on a quiet machine.")
    return head + (f" The speed moved by less than {summary['warn_above']:.0%}, or not measurably: between-trial "
                   "comparisons carry little uncertainty beyond their own intervals, at least at these two points "
                   "in time.")


def metric_kind(metric: str) -> str | None:
    """'tg' for a generation speed, 'pp' for a prompt speed, None for a mix or anything else."""
    m = (metric or "").lower()
    gen = bool(re.search(r"\btg|decode|generat", m))
    prompt = bool(re.search(r"\bpp|prompt|ttft", m))
    return "tg" if gen and not prompt else "pp" if prompt and not gen else None


def drift_bound(summary: dict | None, kind: str | None = None) -> float | None:
    """The largest speed change the probe saw over the run, as a ratio >= 1 (x1.48 or x1/1.48 both give 1.48);
    of the probe's tg or pp test alone when kind says which, else of both."""
    tests = (summary or {}).get("tests", [])
    ratios = [t["ratio"] for t in tests if t.get("ratio") and (kind is None or str(t["test"]).startswith(kind))]
    if not ratios and kind is not None:
        return drift_bound(summary)
    return max(max(r, 1 / r) for r in ratios) if ratios else None


def within_drift(verdict: dict, summary: dict | None) -> float | None:
    """For a supported/refuted speed or time effect no larger than the machine's drift over the run (of the
    probe test of the same kind: tg for generation, pp for prompts, the larger of both otherwise), that drift as
    a ratio >= 1; else None. If the compared trials ran minutes apart, the drift alone could have produced it."""
    eff = verdict.get("effect")
    if not summary or verdict.get("verdict") not in ("supported", "refuted"):
        return None
    if not isinstance(eff, (int, float)) or eff <= 0 or not SPEED_METRIC.search(verdict.get("metric") or ""):
        return None
    bound = drift_bound(summary, metric_kind(verdict.get("metric") or ""))
    return bound if bound is not None and max(eff, 1 / eff) <= bound else None
