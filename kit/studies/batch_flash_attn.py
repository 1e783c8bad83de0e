"""Batch size, micro-batch and flash attention: the guide's GPU advice G3 (n_batch=1024, n_ubatch=512) and
G2 (LLAMACPP_FLASH_ATTN=true), measured on whatever this machine and build can run.

Two parts, one study config (`BatchFlashStudy`):
- the n_batch x n_ubatch grid at several prompt lengths: prompt tokens/s and TTFT (G3);
- flash attention off/on at several context depths, as llama-bench's `-d`: pp and tg (G2), one sub-verdict per
  test and depth (`kit.verdicts.combine`): "mixed" when flash attention helps short contexts and hurts deep ones.

TTFT here is the engine's prompt-processing time for n_prompt tokens (the `pp` test's timed region). A
server's TTFT adds the chat template, tokenization and one decode step for the first token; those do not
depend on n_batch or n_ubatch, which only change how the prompt is cut into llama_decode calls and graph
computations, so the pp time is the part these settings can move, measured without the fixed parts' noise.

Depth tests are the core engine tests at a depth (`kit.measure.pp(n, depth=d)`): the context is filled once per
test, untimed, and rolled back to the depth before every repetition, as llama-bench caches its depth state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from kit.config import Settings, StudyConfig, check_rule, param
from kit.gpu import build_supports_gpu_offload
from kit.measure import Test, pp, tg
from kit.plots import setup, speed_plot
from kit.results import compared_samples, median_table
from kit.sweep import Adaptive, grid, planned_rows, run_sweep
from kit.verdicts import (INCONCLUSIVE, MIXED, NOT_TESTABLE, Verdict, combine, compare, looks_note, not_testable,
                          ratio_of, ratio_text, rows_confidence)

CLAIM_BATCH = "G3"
CLAIM_FLASH = "G2"
NO_GPU_OFFLOAD = "this build has no GPU offload"
BATCH_COLUMNS = ["n_prompt", "n_batch", "n_ubatch", "n_batch_effective", "n_ubatch_effective", "decode_calls",
                 "ubatches", "status", "pp_ts", "pp_ts_lo", "pp_ts_hi", "ttft_ms", "ttft_ms_lo", "ttft_ms_hi", "cv",
                 "clamped", "duplicate_of", "same_work_as", "n_samples"]
FLASH_COLUMNS = ["test", "n_depth", "flash_attn", "status", "median_ts", "ts_lo", "ts_hi", "cv", "n_samples"]


# ---- tests ------------------------------------------------------------------------------------------------------
def depth_test(mode: str, n: int, depth: int) -> Test:
    """A pp or tg test at a context depth (the depth filled once per test, rolled back before each repetition)."""
    if mode not in ("pp", "tg"):
        raise ValueError("mode must be 'pp' or 'tg'")
    return pp(n, depth=depth) if mode == "pp" else tg(n, depth=depth)


def ubatch_plan(n_prompt: int, n_batch: int, n_ubatch: int) -> tuple[int, tuple[int, ...]]:
    """(llama_decode calls, micro-batch sizes in order) for a prompt: what the settings really change."""
    calls, sizes, done = 0, [], 0
    while done < n_prompt:
        n = min(n_batch, n_prompt - done)
        calls += 1
        left = n
        while left > 0:
            sizes.append(min(n_ubatch, left))
            left -= sizes[-1]
        done += n
    return calls, tuple(sizes)


def _plan_label(sizes: tuple[int, ...]) -> str:
    out, i = [], 0
    while i < len(sizes):
        j = i
        while j < len(sizes) and sizes[j] == sizes[i]:
            j += 1
        out.append(f"{j - i}x{sizes[i]}")
        i = j
    return "+".join(out)


# ---- the study config ------------------------------------------------------------------------------------------
@dataclass
class BatchFlashStudy(StudyConfig):
    """Configuration of notebook 20: the n_batch x n_ubatch grid (G3) and flash attention at depths (G2)."""

    out_dir: str = param("outputs/20_batch_flash_attn", "where rows, figures and verdicts go")
    # G3 grid
    n_batch: list[int] = param([512, 1024], "logical batch sizes in the grid", ge=1, nonempty=True)
    n_ubatch: list[int] = param([128, 512], "micro-batch sizes in the grid", ge=1, nonempty=True)
    prompt_lengths: list[int] = param([640], "prompt lengths (tokens) for pp t/s and TTFT", ge=1, nonempty=True)
    batch_n_ctx: int = param(0, "context size of the grid; 0 means the longest prompt (n_batch above it is "
                                "clamped by llama.cpp)", ge=0)
    baseline_batch: list[int] = param([512, 512], "[n_batch, n_ubatch] baseline: the guide's \"good settings\"",
                                      ge=1, length=2)
    guide_batch: list[int] = param([1024, 512], "[n_batch, n_ubatch] the guide's GPU advice (G3)", ge=1, length=2)
    # G2 flash attention
    depths: list[int] = param([0, 512, 1024], "context depths for flash attention on/off (a RAG prompt is "
                                              "350-750 tokens)", ge=0, nonempty=True)
    fa_n_prompt: int = param(64, "pp length at each depth", ge=1)
    fa_n_gen: int = param(16, "tg length at each depth", ge=1)
    fa_n_batch: int = param(512, "n_batch of the flash-attention part", ge=1)
    fa_n_ubatch: int = param(512, "n_ubatch of the flash-attention part", ge=1)
    # held fixed in both parts
    n_threads: int = param(0, "generation threads in both parts; 0 means llama-cpp-python's default", ge=0)
    n_threads_batch: int = param(0, "prompt-processing threads in both parts; 0 means llama-cpp-python's default",
                                 ge=0)
    timeout_s: float = param(600.0, "seconds before a trial's child process is killed", gt=0)
    looks: int = param(3, "blocks of `repetitions` rounds at most for a comparison still inconclusive (1: none "
                          "added); every look and verdict at the Bonferroni confidence 1 - 0.05/looks", ge=1, le=10)
    looks_max_s: float = param(120.0, "seconds of added rounds at most, per part", ge=0)

    def check(self) -> None:
        for name in ("n_batch", "n_ubatch", "prompt_lengths", "depths"):
            values = getattr(self, name)
            check_rule(len(set(values)) == len(values), f"{name} has duplicates: {values}")
        check_rule(not self.batch_n_ctx or self.batch_n_ctx >= max(self.prompt_lengths),
                   f"batch_n_ctx={self.batch_n_ctx} cannot hold the longest prompt ({max(self.prompt_lengths)} tokens)")
        for name in ("baseline_batch", "guide_batch"):
            nb, nub = getattr(self, name)
            check_rule(nb in self.n_batch and nub in self.n_ubatch,
                       f"{name}={[nb, nub]} must be in the grid (n_batch {self.n_batch}, n_ubatch {self.n_ubatch}) "
                       "or G3 cannot be compared")
            check_rule(nub <= nb, f"{name}={[nb, nub]}: n_ubatch > n_batch is not a valid configuration")
        # bad values in the fixed settings fail here, not in the first trial
        self.batch_base()
        self.flash_base()

    def _threads(self) -> dict:
        return {"n_threads": self.n_threads or None, "n_threads_batch": self.n_threads_batch or None}

    # ---- G3 ---------------------------------------------------------------------------------------------------
    @property
    def batch_ctx(self) -> int:
        return self.batch_n_ctx or max(self.prompt_lengths)

    def batch_base(self) -> Settings:
        return Settings(model=self.model, n_ctx=self.batch_ctx, **self._threads())

    def batch_configs(self) -> list[Settings]:
        """The grid; combinations our validation rejects (n_ubatch > n_batch) are in `.skipped`."""
        return grid(self.batch_base(), skip_invalid=True, n_batch=self.n_batch, n_ubatch=self.n_ubatch)

    def skipped_combos(self) -> pd.DataFrame:
        rows = [{"n_batch": c["n_batch"], "n_ubatch": c["n_ubatch"], "why": e.split(":")[0] + ": rejected "
                 "(llama.cpp would silently run n_ubatch = n_batch, a duplicate of another cell)"}
                for c, e in self.batch_configs().skipped]
        return pd.DataFrame(rows, columns=["n_batch", "n_ubatch", "why"])

    def batch_tests(self) -> list[Test]:
        return [pp(n) for n in self.prompt_lengths]

    def plan_statement(self) -> str:
        return (f"{len(self.batch_configs())} grid configurations x {len(self.prompt_lengths)} prompt lengths; "
                "skipped combinations:")

    # ---- G2 ---------------------------------------------------------------------------------------------------
    @property
    def flash_ctx(self) -> int:
        return max(self.depths) + max(self.fa_n_prompt, self.fa_n_gen)

    def flash_base(self) -> Settings:
        return Settings(model=self.model, n_ctx=self.flash_ctx, n_batch=self.fa_n_batch, n_ubatch=self.fa_n_ubatch,
                        **self._threads())

    def flash_configs(self) -> list[Settings]:
        base = self.flash_base()
        return [base.replace(flash_attn=False), base.replace(flash_attn=True)]

    def flash_tests(self) -> list[Test]:
        out = []
        for d in self.depths:
            out.append(depth_test("pp", self.fa_n_prompt, d))
            out.append(depth_test("tg", self.fa_n_gen, d))
        return out


# ---- running ---------------------------------------------------------------------------------------------------
def _run_part(study: BatchFlashStudy, configs, tests, claim: str, part: str, progress: bool, pair):
    out = study.out_path
    adaptive = Adaptive(claim, [pair], looks=study.looks, max_s=study.looks_max_s, paired=True)
    df = run_sweep(out.name, configs, tests, study.repetitions, out_root=out.parent, timeout_s=study.timeout_s,
                   progress=progress, extra={"claim": claim, "part": part}, adaptive=adaptive)
    return planned_rows(df, configs, tests, study.repetitions)


def run_batch_grid(study: BatchFlashStudy, progress: bool = True):
    """G3: every (n_batch, n_ubatch) of the grid x every prompt length; rows of this plan as a DataFrame. The
    guide's cell against the baseline gets more interleaved rounds while inconclusive (`looks`)."""
    (gb, gu), (bb, bu) = study.guide_batch, study.baseline_batch
    base = study.batch_base()
    pair = (base.replace(n_batch=gb, n_ubatch=gu), base.replace(n_batch=bb, n_ubatch=bu))
    return _run_part(study, study.batch_configs(), study.batch_tests(), CLAIM_BATCH, "batch_grid", progress, pair)


def run_flash_attn(study: BatchFlashStudy, progress: bool = True):
    """G2: flash attention off and on, pp and tg at every depth; rows of this plan as a DataFrame. A test whose
    on/off comparison is inconclusive gets more interleaved rounds (`looks`)."""
    off, on = study.flash_configs()
    return _run_part(study, [off, on], study.flash_tests(), CLAIM_FLASH, "flash_attn", progress, (on, off))


# ---- analysis: G3 ------------------------------------------------------------------------------------------------
def _effective(r: dict, col: str) -> int | None:
    v = r.get(col)
    return int(v) if r.get("status") == "ok" and v is not None and v == v else None


def _plan_record(r: dict) -> dict:
    """One grid row's settings, the values llama.cpp ran and how the prompt was cut."""
    nb_e, nub_e = _effective(r, "n_batch_effective"), _effective(r, "n_ubatch_effective")
    calls, sizes = ubatch_plan(int(r["n_prompt"]), nb_e, nub_e) if nb_e and nub_e else (None, ())
    return {"n_prompt": int(r["n_prompt"]), "n_batch": int(r["n_batch"]), "n_ubatch": int(r["n_ubatch"]),
            "n_batch_effective": nb_e, "n_ubatch_effective": nub_e, "decode_calls": calls,
            "ubatches": _plan_label(sizes) if sizes else None, "_sizes": sizes, "status": r.get("status"),
            "cv": r.get("cv") if r.get("status") == "ok" else None}


def _ttft_ms(samples_ns) -> list[float]:
    return [ns / 1e6 for ns in samples_ns] if isinstance(samples_ns, list) else []


def _medians(df, keys: list[str], cols: dict[str, str], like: pd.DataFrame) -> pd.DataFrame:
    """median_table over the successful rows, columns renamed {old: new} (and new_lo, new_hi, n_samples), keys
    typed as in `like` so that the table merges onto it."""
    t = median_table(df[df["status"] == "ok"], keys, list(cols))
    names = {f"{old}{end}": f"{new}{end}" for old, new in cols.items() for end in ("", "_lo", "_hi")}
    return t.rename(columns={**names, "n": "n_samples"}).astype({k: like[k].dtype for k in keys})


def _clamp_text(r) -> str | None:
    return "; ".join(f"{name} {a}->{int(b)}" for name, a, b in (("n_batch", r.n_batch, r.n_batch_effective),
                                                                ("n_ubatch", r.n_ubatch, r.n_ubatch_effective))
                     if b == b and b is not None and int(a) != int(b)) or None


def _mark_duplicates(t: pd.DataFrame) -> pd.DataFrame:
    """clamped / duplicate_of (same effective settings) / same_work_as (same decode calls and micro-batches)."""
    dup, same, first_eff, first_plan = [], [], {}, {}
    for _, r in t.iterrows():
        label = f"{r['n_batch']}/{r['n_ubatch']}"
        if r["n_batch_effective"] is None or pd.isna(r["n_batch_effective"]):
            dup.append(None)
            same.append(None)
            continue
        ek = (r["n_prompt"], r["n_batch_effective"], r["n_ubatch_effective"])
        pk = (r["n_prompt"], r["decode_calls"], r["_sizes"])
        dup.append(first_eff.get(ek))
        same.append(first_plan.get(pk))
        first_eff.setdefault(ek, label)
        first_plan.setdefault(pk, label)
    return t.assign(clamped=[_clamp_text(r) for r in t.itertuples()], duplicate_of=dup, same_work_as=same)


def batch_table(df) -> pd.DataFrame:
    """One row per prompt length x (n_batch, n_ubatch): effective values, the llama_decode/micro-batch plan,
    pp t/s and TTFT (= pp time for the prompt) as medians with 95 % bootstrap intervals, and duplicates:
    `clamped` says which value llama.cpp changed (n_batch is clamped to n_ctx), `duplicate_of` names the cell
    with the same effective settings, `same_work_as` the cell whose prompt is cut into the same decode calls and
    micro-batches (identical work at this prompt length, though the labels differ)."""
    if df is None or df.empty:
        return pd.DataFrame(columns=BATCH_COLUMNS)
    keys = ["n_prompt", "n_batch", "n_ubatch"]
    plans = pd.DataFrame([_plan_record(r) for r in df.to_dict("records")])
    rows = df.assign(ttft_ms=[_ttft_ms(s) for s in df.get("samples_ns", pd.Series([None] * len(df)))])
    medians = _medians(rows, keys, {"samples_ts": "pp_ts", "ttft_ms": "ttft_ms"}, plans)
    t = plans.merge(medians, on=keys, how="left").sort_values(keys).reset_index(drop=True)
    t["n_samples"] = t["n_samples"].fillna(0).astype(int)
    return _mark_duplicates(t)[BATCH_COLUMNS]


def _rows(df, **match):
    sel = df
    for k, v in match.items():
        sel = sel[sel[k] == v]
    return sel[sel["status"] == "ok"]


def _gpu_scope(gpu_offload: bool | None) -> str:
    if gpu_offload is None:
        gpu_offload = build_supports_gpu_offload()
    if gpu_offload:
        return ""
    return (f"Measured on the CPU ({NO_GPU_OFFLOAD}); the guide gives this as GPU advice, and the GPU part of the "
            f"claim is not testable here.")


def _batch_comparisons(df, study: BatchFlashStudy, evidence: Sequence[str],
                       confidence: float | None = None) -> list[tuple[int, Verdict, bool]]:
    """(prompt length, guide over baseline verdict, whether both cut the prompt the same way) per prompt length.
    confidence: None takes the rows' (`rows_confidence`: higher after adaptive looks)."""
    confidence = confidence or rows_confidence(df)
    (gb, gu), (bb, bu) = study.guide_batch, study.baseline_batch
    table = batch_table(df)
    out = []
    for n in sorted(study.prompt_lengths):
        cand, base, paired = compared_samples(_rows(df, n_prompt=n, n_batch=gb, n_ubatch=gu, test_kind="pp"),
                                              _rows(df, n_prompt=n, n_batch=bb, n_ubatch=bu, test_kind="pp"))
        if not cand or not base:
            continue
        v = compare(CLAIM_BATCH, cand, base, evidence=evidence, confidence=confidence, paired=paired,
                    metric=f"pp{n} t/s ratio, n_batch/n_ubatch {gb}/{gu} over {bb}/{bu}")
        plans = table[(table.n_prompt == n) & (((table.n_batch == gb) & (table.n_ubatch == gu)) |
                                               ((table.n_batch == bb) & (table.n_ubatch == bu)))]
        same_work = plans["ubatches"].nunique() == 1 and plans["decode_calls"].nunique() == 1
        v.details = {**(v.details or {}), "n_prompt": n, "same_work": bool(same_work)}
        out.append((n, v, bool(same_work)))
    return out


def _prompt_condition(n: int, same: bool) -> str:
    return f"{n}-token prompt" + (" (same decode calls and micro-batches)" if same else "")


def verdict_batch(df, study: BatchFlashStudy, evidence: Sequence[str] = (), gpu_offload: bool | None = None,
                  confidence: float | None = None) -> Verdict:
    """G3: pp t/s of the guide's 1024/512 against the 512/512 baseline, one sub-verdict per prompt length
    (`kit.verdicts.combine`: mixed when prompt lengths disagree); the effect shown is the longest prompt's, where
    the two settings cut the prompt differently. A prompt length where both do the same work stays a condition:
    "no meaningful effect" there is what the setting gives such prompts."""
    (gb, gu), (bb, bu) = study.guide_batch, study.baseline_batch
    comps = _batch_comparisons(df, study, evidence, confidence)
    if not comps:
        return not_testable(CLAIM_BATCH, f"no successful rows for {gb}/{gu} and {bb}/{bu}: see the results' "
                                         "error column", evidence=evidence)
    per_prompt = [{"n_prompt": n, "verdict": v.verdict, "label": v.label(), "effect": ratio_of(v),
                   "ci_low": v.ci_low, "ci_high": v.ci_high, "same_work": same, "unstable": v.unstable}
                  for n, v, same in comps]
    scope = _gpu_scope(gpu_offload)
    conditions = {_prompt_condition(n, same): v for n, v, same in comps}
    n_main, _, same_main = comps[-1]
    out = combine(CLAIM_BATCH, conditions, depends_on="prompt length",
                  headline=_prompt_condition(n_main, same_main), evidence=evidence,
                  details={"per_prompt": per_prompt, "scope": "cpu" if scope else "gpu",
                           "ttft_definition": "engine prompt-processing time for n_prompt tokens"})
    shaky = " Samples unstable (CV >= 10 %): repeat on a quiet machine before acting on it." if out.unstable else ""
    if out.verdict in (INCONCLUSIVE, MIXED):
        shaky += (" " + looks_note(df, CLAIM_BATCH)).rstrip()
    out.summary = (f"{gb}/{gu} against {bb}/{bu}, prompt t/s per prompt length: {out.summary}{shaky} "
                   f"{scope}").strip()
    out.reason = "; ".join(x for x in (out.reason, scope) if x)
    return out


# ---- analysis: G2 ------------------------------------------------------------------------------------------------
def _mode(row) -> str:
    return "pp" if int(row.get("n_prompt") or 0) > 0 and int(row.get("n_gen") or 0) == 0 else "tg"


def _flash_record(r: dict) -> dict:
    n = int(r.get("n_prompt") or 0) or int(r.get("n_gen") or 0)
    return {"test": f"{_mode(r)}{n}", "n_depth": int(r.get("n_depth") or 0), "flash_attn": bool(r["flash_attn"]),
            "status": r.get("status"), "cv": r.get("cv") if r.get("status") == "ok" else None}


def flash_table(df) -> pd.DataFrame:
    """Per depth x test (pp/tg) x flash_attn: median t/s with its 95 % interval."""
    if df is None or df.empty:
        return pd.DataFrame(columns=FLASH_COLUMNS)
    keys = ["test", "n_depth", "flash_attn"]
    records = pd.DataFrame([_flash_record(r) for r in df.to_dict("records")])
    rows = pd.concat([df.drop(columns=[k for k in keys if k in df]).reset_index(drop=True), records[keys]], axis=1)
    medians = _medians(rows, keys, {"samples_ts": "median_ts"}, records)
    medians = medians.rename(columns={"median_ts_lo": "ts_lo", "median_ts_hi": "ts_hi"})
    t = records.merge(medians, on=keys, how="left")
    t["n_samples"] = t["n_samples"].fillna(0).astype(int)
    return t.sort_values(keys).reset_index(drop=True)[FLASH_COLUMNS]


def flash_comparisons(df, evidence: Sequence[str] = (), confidence: float | None = None) -> list[Verdict]:
    """Flash on over off, one Verdict (claim G2) per depth and test, ordered by depth, then pp before tg.
    confidence: None takes the rows' (`rows_confidence`: higher after adaptive looks)."""
    out = []
    if df is None or df.empty:
        return out
    confidence = confidence or rows_confidence(df)
    d = df.assign(_mode=[_mode(r) for r in df.to_dict("records")])
    for depth in sorted(d["n_depth"].dropna().unique()):
        for mode in ("pp", "tg"):
            sel = d[(d._mode == mode) & (d.n_depth == depth)]
            on, off, paired = compared_samples(_rows(sel, flash_attn=True), _rows(sel, flash_attn=False))
            if not on or not off:
                continue
            v = compare(CLAIM_FLASH, on, off, evidence=evidence, confidence=confidence, paired=paired,
                        metric=f"{mode} t/s ratio, flash_attn on / off, depth {int(depth)}")
            v.details = {**(v.details or {}), "test": mode, "n_depth": int(depth)}
            out.append(v)
    return out


def flash_condition(v: Verdict) -> str:
    """A G2 sub-verdict's condition name: 'tg at depth 1024'."""
    return f"{v.details['test']} at depth {v.details['n_depth']}"


def comparisons_table(verdicts: Sequence[Verdict]) -> pd.DataFrame:
    """One row per sub-verdict: test, depth, ratio with its interval and the label a reader sees."""
    return pd.DataFrame([{"test": v.details.get("test"), "n_depth": v.details.get("n_depth"), "ratio": ratio_of(v),
                          "ci_low": v.ci_low, "ci_high": v.ci_high, "verdict": v.label(), "unstable": v.unstable}
                         for v in verdicts],
                        columns=["test", "n_depth", "ratio", "ci_low", "ci_high", "verdict", "unstable"])


def verdict_flash(df, evidence: Sequence[str] = (), gpu_offload: bool | None = None,
                  confidence: float | None = None) -> Verdict:
    """G2: one sub-verdict per test (pp, tg) and context depth, combined (`kit.verdicts.combine`): the label all
    conditions share, else mixed with each condition's label. The effect shown is decode (tg) at the deepest
    context, where attention costs most and a RAG server spends its time."""
    comps = flash_comparisons(df, evidence, confidence)
    if not comps:
        return not_testable(CLAIM_FLASH, "no successful flash-attention rows: see the results' error column",
                            evidence=evidence)
    tgs = [v for v in comps if v.details["test"] == "tg"] or comps
    head = max(tgs, key=lambda v: v.details["n_depth"])
    scope = _gpu_scope(gpu_offload)
    out = combine(CLAIM_FLASH, {flash_condition(v): v for v in comps}, depends_on="test and context depth",
                  headline=flash_condition(head), evidence=evidence,
                  details={"test": head.details["test"], "n_depth": head.details["n_depth"],
                           "headline": flash_condition(head), "scope": "cpu" if scope else "gpu"})
    per = "; ".join(f"{flash_condition(v)}: {ratio_text(v)}" for v in comps)
    shaky = (" Some samples unstable (CV >= 10 %): repeat on a quiet machine before acting on it."
             if out.unstable else "")
    if out.verdict in (INCONCLUSIVE, MIXED):
        shaky += (" " + looks_note(df, CLAIM_FLASH)).rstrip()
    lead = ("Depends on the test and the context depth. " if out.verdict == MIXED else
            f"Every test and depth: {out.label()}. " if out.verdict != NOT_TESTABLE else "")
    out.summary = f"{lead}Flash attention on / off per condition: {per}.{shaky} {scope}".strip()
    out.reason = "; ".join(x for x in (out.reason, scope) if x)
    return out


def batch_statement(table: pd.DataFrame) -> str:
    """How many grid cells repeat another cell's work, and how many llama.cpp clamped."""
    same = int(table.same_work_as.notna().sum())
    return (f"{same} cells repeat another cell's work at their prompt length (same llama_decode calls and "
            f"micro-batches); {int(table.clamped.notna().sum())} cells were clamped by llama.cpp.")


# ---- figures -----------------------------------------------------------------------------------------------------
def _empty_figure(text: str):
    fig, ax = plt.subplots(figsize=(5, 2))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center")
    return fig


def _heatmap(ax, t: pd.DataFrame, col: str, title: str, cmap: str) -> None:
    """One prompt length's n_ubatch x n_batch heatmap of `col`; '=' marks a cell doing another cell's work."""
    piv = t.pivot_table(index="n_ubatch", columns="n_batch", values=col, aggfunc="first")
    dup = {(r.n_ubatch, r.n_batch) for r in t.itertuples() if isinstance(r.same_work_as, str)}
    annot = np.full(piv.shape, "", dtype=object)
    for a, ub in enumerate(piv.index):
        for b, nb in enumerate(piv.columns):
            v = piv.loc[ub, nb]
            if v == v and v is not None:
                annot[a, b] = f"{v:.0f}{'=' if (ub, nb) in dup else ''}"
    sns.heatmap(piv.astype(float), annot=annot, fmt="", cmap=cmap, ax=ax, cbar=True, linewidths=0.5,
                linecolor="white")
    ran = t.dropna(subset=["n_batch_effective"]).groupby("n_batch")["n_batch_effective"].max()
    ax.set_xticklabels([f"{nb}" + (f"\n(ran {int(ran[nb])})" if nb in ran and int(ran[nb]) != nb else "")
                        for nb in piv.columns])
    ax.set_title(title)
    ax.invert_yaxis()


def plot_batch_heatmaps(table: pd.DataFrame):
    """Heatmaps of median prompt t/s and TTFT: n_ubatch (rows) x n_batch (columns), one column per prompt length.
    '=' marks a cell doing the same work as another (same decode calls and micro-batches); blank cells are
    combinations that were skipped (n_ubatch > n_batch) or failed."""
    setup()
    prompts = sorted(table.loc[table["pp_ts"].notna(), "n_prompt"].unique())
    if not prompts:
        return _empty_figure("no successful grid cells: see the table's status and the rows' error column")
    fig, axes = plt.subplots(2, len(prompts), figsize=(4.6 * len(prompts), 7.5), squeeze=False)
    for j, n in enumerate(prompts):
        t = table[table.n_prompt == n]
        _heatmap(axes[0][j], t, "pp_ts", f"pp{n}: prompt t/s (median)", "viridis")
        _heatmap(axes[1][j], t, "ttft_ms", f"pp{n}: TTFT ms (prompt time)", "viridis_r")
    fig.suptitle("n_batch x n_ubatch ('=' same work as another cell at this prompt length; blank = skipped)")
    fig.tight_layout()
    return fig


def plot_flash(df):
    """pp and tg t/s against context depth, flash attention off vs on (median, 95 % CI of the samples)."""
    setup()
    d = df[df.status == "ok"].copy()
    d["mode"] = [_mode(r) for r in d.to_dict("records")]
    d["flash_attn"] = d["flash_attn"].map({True: "on", False: "off"})
    modes = [m for m in ("pp", "tg") if (d["mode"] == m).any()]
    fig, axes = plt.subplots(1, max(len(modes), 1), figsize=(6 * max(len(modes), 1), 4), squeeze=False)
    for ax, m in zip(axes[0], modes):
        speed_plot(d[d["mode"] == m], x="n_depth", hue="flash_attn", ax=ax,
                   title=f"{m}: t/s against context depth", ylabel=f"{m} tokens/s")
        ax.set_xlabel("context depth (tokens already in the KV cache)")
    fig.tight_layout()
    return fig
