"""Rows on disk <-> a DataFrame. One JSON object per line, appended and fsynced as each trial ends."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Iterable, Sequence

from kit.paths import resolve as resolve_path
from kit.verdicts import median_ci
import pandas as pd

RESULTS_FILE = "results.jsonl"


def append_rows(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Append rows durably: a killed process loses at most what it had not yet handed to this function."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a+b") as fh:
        # a torn last line (a run killed mid-write) must not glue itself onto the next row
        if fh.tell() > 0:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                fh.write(b"\n")
        for row in rows:
            fh.write((json.dumps(row, default=_jsonable) + "\n").encode())
        fh.flush()
        os.fsync(fh.fileno())


def _jsonable(x):
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    return str(x)


def read_rows(path: str | os.PathLike) -> list[dict]:
    """All complete rows; a torn line (killed writer) is skipped with a warning, never an error."""
    p = Path(path)
    if not p.exists():
        return []
    rows, torn = [], 0
    with open(p, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                torn += 1
    if torn:
        warnings.warn(f"{p}: skipped {torn} torn line(s) left by an interrupted run", stacklevel=2)
    return rows


def latest_by_key(rows: list[dict]) -> list[dict]:
    """Keep the last row per trial_key (a retried failure replaces the failure), preserving first-seen order."""
    order, last = [], {}
    for r in rows:
        k = r.get("trial_key")
        if k not in last:
            order.append(k)
        last[k] = r
    return [last[k] for k in order]


def load_results(path: str | os.PathLike, status: str | None = None):
    """One call: a study folder or results.jsonl -> a pandas DataFrame, one row per trial and test."""

    p = resolve_path(path)
    if p.is_dir():
        p = p / RESULTS_FILE
    df = pd.DataFrame(latest_by_key(read_rows(p)))
    if status is not None and not df.empty:
        df = df[df["status"] == status].reset_index(drop=True)
    return df


def ok_rows(df, part: str):
    """The successful rows of one part of a study (rows carry a `part` column)."""
    if df.empty or "part" not in df:
        return df.iloc[0:0]
    return df[(df["part"] == part) & (df["status"] == "ok")]


def pooled_samples(rows, col: str = "samples_ts") -> list[float]:
    """Every raw sample of a list column, over all the given rows."""
    out: list[float] = []
    if col not in rows:
        return out
    for v in rows[col]:
        if isinstance(v, list):
            out.extend(float(x) for x in v)
    return out


def interleaved_pairs(candidate_rows, baseline_rows, col: str = "samples_ts") -> tuple[list, list] | None:
    """The two sides' raw samples paired by round, where the sweep interleaved them sample by sample: one row a
    side, the same interleave group, as many samples each, and in time order (`samples_at_s`) every round's two
    samples both taken before the next round's. A pair then shares whatever the machine was doing in those
    seconds, so a per-round ratio cancels slow drift that independent resampling counts as noise. None where
    the rows cannot be paired: compare them as independent samples."""
    if len(candidate_rows) != 1 or len(baseline_rows) != 1:
        return None
    c, b = candidate_rows.iloc[0], baseline_rows.iloc[0]
    g = c.get("interleave_group"), b.get("interleave_group")
    if g[0] is None or g[0] != g[0] or g[0] != g[1]:
        return None
    sides = []
    for r in (c, b):
        v, at = r.get(col), r.get("samples_at_s")
        if not isinstance(v, list) or not isinstance(at, list) or len(v) != len(at) or not v:
            return None
        sides.append(sorted(zip((float(t) for t in at), (float(x) for x in v))))
    (sc, sb) = sides
    if len(sc) != len(sb):
        return None
    for i in range(len(sc) - 1):
        if max(sc[i][0], sb[i][0]) > min(sc[i + 1][0], sb[i + 1][0]):
            return None
    return [x for _, x in sc], [x for _, x in sb]


def compared_samples(candidate_rows, baseline_rows, col: str = "samples_ts") -> tuple[list, list, bool]:
    """(candidate, baseline, paired) for `kit.verdicts.compare(..., paired=paired)`: paired by round where the
    sweep interleaved the two (`interleaved_pairs`), else every sample of each side pooled."""
    pairs = interleaved_pairs(candidate_rows, baseline_rows, col)
    if pairs is not None:
        return pairs[0], pairs[1], True
    return pooled_samples(candidate_rows, col), pooled_samples(baseline_rows, col), False


def as_float(v) -> float | None:
    """A row value as a plain float (verdict details are JSON); None for missing, non-numeric or NaN."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if f != f else f


def ci_label(lo, hi, digits: int = 1) -> str:
    """An interval as a table cell, "[lo, hi]"; empty where there is none (one sample)."""
    return f"[{lo:.{digits}f}, {hi:.{digits}f}]" if lo is not None else ""


def median_table(df, by: Sequence[str] | str, cols: Sequence[str] | str, samples: bool = True):
    """The one group-by -> median with 95 % bootstrap interval table.

    For each group of `by` and each column in `cols`: `<col>` (median), `<col>_lo`, `<col>_hi` and `n`.
    With samples=True a list column (samples_ts, samples_ttft_ms ...) is pooled over the group's rows;
    a scalar column takes one value per row."""

    by = [by] if isinstance(by, str) else list(by)
    cols = [cols] if isinstance(cols, str) else list(cols)
    out = []
    if df is None or df.empty:
        return pd.DataFrame(columns=by + [x for c in cols for x in (c, f"{c}_lo", f"{c}_hi")] + ["n"])
    for key, g in df.groupby(by, sort=True, dropna=False):
        row = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        n = 0
        for c in cols:
            values = pooled_samples(g, c) if samples and c in g and g[c].map(lambda v: isinstance(v, list)).any() \
                else [float(v) for v in g[c] if v is not None and v == v] if c in g else []
            m, lo, hi = median_ci(values)
            row[c], row[f"{c}_lo"], row[f"{c}_hi"] = m, lo, hi
            n = max(n, len(values))
        row["n"] = n
        out.append(row)
    return pd.DataFrame(out)


# ---- failed trials: what a study shows, and says, when rows are missing -------------------------------------------
TRIAL_COLUMNS = ("claim", "part", "label", "test")   # the columns that name a trial's test, where rows carry them
CAUSE_CHARS = 400


def trial_status(df, cols: Sequence[str] = TRIAL_COLUMNS + ("chat_format_effective", "chat_format_source")):
    """Every row: the naming columns the rows have (`TRIAL_COLUMNS`, the chat format), status and error. What a
    notebook shows after its run, whether the trials succeeded or not."""
    names = [c for c in cols if df is not None and c in df]
    if df is None or df.empty or "status" not in df:
        return pd.DataFrame(columns=names + ["status", "error"])
    out = df[names + ["status"]].copy()
    out["error"] = df["error"] if "error" in df else None
    return out.reset_index(drop=True)


def failures(df, cols: Sequence[str] = TRIAL_COLUMNS):
    """The rows that did not succeed: the naming columns the rows have (`TRIAL_COLUMNS`), status and error.
    Empty, with those columns, when every row is ok."""
    table = trial_status(df, cols)
    return table[table["status"] != "ok"].reset_index(drop=True)


def _short_error(status: str, error) -> str:
    text = " ".join(str(error or "no error recorded").split())
    text = text if len(text) <= CAUSE_CHARS else text[:CAUSE_CHARS - 3] + "..."
    return text if status == "error" else f"{status}: {text}"


def failure_cause(df, part: str | None = None) -> str | None:
    """Why tests failed, from the rows' status and error columns (of one `part` if given), most frequent first:
    "every test failed (6 of 6): SecurityError: ...". None when no row failed."""
    if df is None or df.empty or "status" not in df:
        return None
    rows = df[df["part"] == part] if part is not None and "part" in df else df
    bad = rows[rows["status"] != "ok"]
    if bad.empty:
        return None
    # a test never reached because an earlier one died says nothing of its own: name the earlier one's cause
    real = bad[bad["status"] != "skipped"]
    counts: dict[str, int] = {}
    for _, r in (real if not real.empty else bad).iterrows():
        key = _short_error(r["status"], r.get("error"))
        counts[key] = counts.get(key, 0) + 1
    ranked = sorted(counts, key=counts.get, reverse=True)
    head = (f"every test failed ({len(bad)} of {len(rows)})" if len(bad) == len(rows)
            else f"{len(bad)} of {len(rows)} tests failed")
    more = f"; {len(ranked) - 1} other error(s) in the table of failures" if len(ranked) > 1 else ""
    return f"{head}: {ranked[0]}{more}"


def no_rows_reason(df, what: str, part: str | None = None) -> str:
    """The reason of a "not testable here" verdict that lacks rows: "<what>: <the failures' cause>", or that no
    row of `part` succeeded when none failed either (the study was not asked to run it)."""
    cause = failure_cause(df, part)
    if cause:
        return f"{what}: {cause}"
    where = f" of part {part!r}" if part else ""
    return f"{what}: no successful rows{where} (nothing was measured for it)"
