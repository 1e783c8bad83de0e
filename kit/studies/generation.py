"""Generation settings (claims S1, S2): what sampling settings and a max_tokens cap do to speed, length and text.

Sampling settings are request-time arguments, so one loaded model serves the whole sweep: each sampling
configuration is one test of the kind ``kit.studies.generation:sampling_test`` inside a trial (a child process,
`kit.sweep.run_sweep`), and its row lands in ``results.jsonl`` as usual. The study runs two trials: the
sampling sweep (S1) and the max_tokens sweep (S2); a rerun skips the tests already in the file.

Timed region of every request: a streamed chat completion from a fresh prompt cache
(`kit.measure.stream_chat`): template, tokenize, prompt processing, then per token decode + sample +
detokenize. The per-token cost is the mean inter-token latency (ITL) between streamed chunks, i.e.
(time of last chunk - time of first chunk) / (chunks - 1): decode and sampling only, the prompt excluded.
llama.cpp's own decode time (``llama_perf_context``) is kept beside it, so the difference is what sampling
and the Python around it cost per token.

The trial's Settings columns (temperature, top_p, top_k, repeat_penalty, max_tokens) keep the configuration the
model was loaded under; where a test's requests used other values, `kit.sweep` stores them as ``test_<name>``.
`request_sampling_view(df)` gives the values the requests used, and every analysis here reads through it.
"""
from __future__ import annotations

import hashlib
import math
import re
import statistics
import textwrap
import time
from dataclasses import dataclass
from typing import Sequence

import pandas as pd

from kit.config import SAMPLING_KEYS, ChatStudyConfig, Settings, SettingsError, check_rule, param
from kit.data import load_prompts
from kit.measure import Test, requests_row, stream_chat
from kit.results import load_results, median_table, no_rows_reason
from kit.sweep import run_sweep, split_out_dir
from kit.verdicts import (INCONCLUSIVE, MIN_SAMPLES, bootstrap_ratio, compare, from_interval, not_testable,
                          paired_log_ratio, rows_confidence, too_few)

# The guide's "speeding up generation" settings (section 6).
GUIDE_SAMPLING = {"temperature": 0.1, "top_p": 0.9, "top_k": 40, "repeat_penalty": 1.1}
GUIDE_MAX_TOKENS = 512
SAMPLING_KIND = "kit.studies.generation:sampling_test"
TIMED_REGION = ("streamed create_chat_completion from a fresh prompt cache, per request; per-token cost = mean "
                "inter-token latency between streamed chunks (decode + sampling + detokenize; prompt excluded); "
                "engine_decode_ms_per_token = llama.cpp's own decode time / decoded tokens")


def default_sampling() -> dict:
    """llama-cpp-python's own sampling defaults as the kit's Settings holds them (Llama/create_completion)."""
    s = Settings()
    return {k: getattr(s, k) for k in ("temperature", "top_p", "top_k", "repeat_penalty")}


# ---- what the text looks like -----------------------------------------------------------------------------------
_WORD = re.compile(r"\w+", re.UNICODE)


def text_stats(text: str) -> dict:
    """Words, distinct-1/2 (unique n-grams / n-grams) and the share of 4-grams that repeat an earlier one."""
    words = _WORD.findall(text.lower())

    def distinct(n: int) -> float | None:
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        return round(len(set(grams)) / len(grams), 4) if grams else None

    grams4 = [tuple(words[i:i + 4]) for i in range(len(words) - 3)]
    rep4 = round(1 - len(set(grams4)) / len(grams4), 4) if grams4 else None
    return {"n_words": len(words), "distinct_1": distinct(1), "distinct_2": distinct(2), "rep_4gram": rep4}


# ---- the sweep test kind ---------------------------------------------------------------------------------------
def sampling_test(lm, test: Test, repetitions: int) -> dict:
    """One sampling configuration over a prompt set: `repetitions` seeds per prompt, one request each.

    test.params: any of SAMPLING_KEYS (the request's sampling; the rest from the trial's Settings),
    "prompts" (list of {"id", "prompt"}), "label" (a name for tables). Seeds are settings.seed + 0..R-1.
    Requests run seed-major (all prompts with seed 0, then seed 1, ...), so slow drift of a shared machine
    spreads over prompts instead of landing on one.
    """
    params = dict(test.params)
    prompts = params.pop("prompts", None) or load_prompts(n=3)
    label = params.pop("label", None)
    unknown = set(params) - set(SAMPLING_KEYS)
    if unknown:
        raise SettingsError(f"sampling_test: unknown params {sorted(unknown)}; use {SAMPLING_KEYS}, prompts, label")
    s = lm.settings.replace(**params)  # validates values the same way Settings does
    sampling = {k: getattr(s, k) for k in SAMPLING_KEYS}
    stream_chat(lm, prompts[0]["prompt"], max_tokens=4, seed=s.seed)  # warm-up, untimed
    outs, recs = [], []
    for r in range(repetitions):
        seed = s.seed + r
        for p in prompts:
            out = stream_chat(lm, p["prompt"], seed=seed, **sampling)
            outs.append(out)
            recs.append(_request_record(p["id"], seed, out))
    return _sampling_row(label, sampling, s.seed, outs, recs, repetitions)


_PER_REQUEST = ("ttft_ms", "e2e_ms", "decode_ms_per_token", "itl_p50_ms", "itl_p95_ms", "engine_decode_ms_per_token")


def _request_record(prompt_id: str, seed: int, out: dict) -> dict:
    """One request: its timings (kit.measure.requests_row of this request alone), counts and text."""
    one = requests_row([out], speed="decode")
    rec = {"prompt_id": prompt_id, "seed": seed, "n_prompt_tokens": out["n_prompt_tokens"],
           "n_gen_tokens": out["n_gen_tokens"], "n_chunks": out["n_chunks"], "finish_reason": out["finish_reason"],
           **{k: one[k] for k in _PER_REQUEST},
           "text_sha": hashlib.sha256(out["text"].encode()).hexdigest()[:16], **text_stats(out["text"]),
           "text": out["text"]}
    if rec["decode_ms_per_token"] is not None and rec["engine_decode_ms_per_token"] is not None:
        rec["overhead_ms_per_token"] = round(rec["decode_ms_per_token"] - rec["engine_decode_ms_per_token"], 4)
    return rec


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(statistics.fmean(xs), 4) if xs else None


def _median(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 4) if xs else None


def _sampling_row(label: str | None, sampling: dict, seed: int, outs: list[dict], recs: list[dict],
                  repetitions: int) -> dict:
    """The row of one configuration: kit.measure.requests_row's columns (tokens/s = 1000 / mean ITL per request),
    then truncation, text diversity and whether seeds give the same text."""
    by_prompt: dict[str, set] = {}
    for r in recs:
        by_prompt.setdefault(r["prompt_id"], set()).add(r["text_sha"])
    deterministic = (round(sum(len(v) == 1 for v in by_prompt.values()) / len(by_prompt), 4)
                     if repetitions > 1 and by_prompt else None)
    truncated = [r["finish_reason"] == "length" for r in recs]
    return {
        "label": label or _label(sampling),
        **sampling,
        "max_tokens_label": "unlimited" if sampling["max_tokens"] is None else str(sampling["max_tokens"]),
        "seed": seed,
        **requests_row(outs, speed="decode"),
        "n_gen": sampling["max_tokens"] or 0,
        "n_depth": 0,
        "repetitions": repetitions,
        "prompt_ids": sorted(by_prompt),
        "overhead_ms_per_token": _median(r.get("overhead_ms_per_token") for r in recs),
        "truncation_rate": round(sum(truncated) / len(truncated), 4) if truncated else None,
        "n_truncated": sum(truncated),
        "deterministic_share": deterministic,
        "distinct_1": _mean(r["distinct_1"] for r in recs),
        "distinct_2": _mean(r["distinct_2"] for r in recs),
        "rep_4gram": _mean(r["rep_4gram"] for r in recs),
        "requests": recs,
        "timed_region": TIMED_REGION,
    }


def _label(sampling: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sampling.items())


# ---- the study --------------------------------------------------------------------------------------------------
@dataclass
class GenerationStudy(ChatStudyConfig):
    """Parameters of notebooks/70_generation, validated before anything runs.

    Sampling sweep (S1): the guide's settings, llama-cpp-python's defaults, and one axis at a time varied from
    the defaults (temperature, top_p, top_k, repeat_penalty), on the first `n_prompts` prompts with
    `sweep_max_tokens`. Cap sweep (S2): the guide's sampling with each max_tokens in `caps`, on the first
    `n_cap_prompts` prompts, and unlimited (until EOS or n_ctx) on the first `n_unlimited_prompts`.
    """

    n_ctx: int = param(1024, "context size; unlimited answers stop here at the latest", ge=1)
    n_prompts: int = param(2, "prompts of the prompt set (the first n) in the sampling sweep", ge=1)
    sweep_max_tokens: int = param(48, "max_tokens of every request in the sampling sweep", ge=2)
    temperatures: list[float] = param([0.0], "temperature axis, the other settings at llama-cpp-python's defaults",
                                      ge=0)
    top_ps: list[float] = param([], "top_p axis (default 0.95)", gt=0, le=1)
    top_ks: list[int] = param([], "top_k axis (0: the whole vocabulary; default 40)", ge=0)
    repeat_penalties: list[float] = param([1.1], "repeat_penalty axis (default 1.0: off)", gt=0)
    caps: list[int] = param([64, 512], "max_tokens caps of the cap sweep, with the guide's sampling", ge=1)
    n_cap_prompts: int = param(2, "prompts (the first n) in the cap sweep", ge=0)
    n_unlimited_prompts: int = param(2, "of those, how many also run without a cap", ge=0)
    repetitions: int = param(5, "seeds per prompt in the sampling sweep (one request each)", ge=1)
    cap_repetitions: int = param(5, "seeds per prompt in the cap sweep (S2 pairs each with and without the cap)",
                                 ge=1)
    s2_cap: int = param(GUIDE_MAX_TOKENS, "the cap S2 compares with unlimited (the guide's 512); one of caps", ge=1)
    looks: int = param(3, "S1: blocks of `repetitions` seeds at most (guide and defaults only after the first) while "
                          "S1 is inconclusive; every look and the verdict at confidence 1 - 0.05/looks", ge=1, le=10)
    looks_max_s: float = param(120.0, "seconds of added S1 blocks at most", ge=0)
    equivalence: float = param(0.05, "a speed ratio whose whole 95 % CI lies within 1 +- this is 'no effect' (S1's "
                                     "stated speed band)",
                               ge=0, le=0.5)
    chat_format: str | None = param(None, "llama-cpp-python chat format (None: the GGUF's template, or one chosen "
                                          "from the vocabulary when it has none)")
    timeout_s: float = param(1800.0, "wall-clock limit of one trial (child process), seconds", gt=0)
    out_dir: str = param("outputs/70_generation", "rows, figures and verdicts.json go here")

    def check(self) -> None:
        n_file = len(load_prompts(self.prompts_file))
        for name in ("n_prompts", "n_cap_prompts", "n_unlimited_prompts"):
            check_rule(getattr(self, name) <= n_file,
                       f"{name}={getattr(self, name)}: the prompt file has {n_file} prompts")
        check_rule(self.n_unlimited_prompts <= self.n_cap_prompts,
                   "n_unlimited_prompts must not exceed n_cap_prompts (S2 compares the same prompts)")
        check_rule(all(cap < self.n_ctx for cap in self.caps),
                   f"caps={self.caps}: every cap must leave room for a prompt in n_ctx={self.n_ctx}")
        check_rule(not self.n_unlimited_prompts or self.s2_cap in self.caps,
                   f"s2_cap={self.s2_cap} must be one of caps {self.caps}: S2 compares it with unlimited")
        check_rule(self.sweep_max_tokens < self.n_ctx, f"sweep_max_tokens={self.sweep_max_tokens} must be < n_ctx")
        base = self.settings()
        for variant in self.sampling_variants().values():  # every value checked by Settings' own rules
            base.replace(**variant)

    def settings(self) -> Settings:
        return Settings(model=self.model, n_ctx=self.n_ctx, n_threads=self.n_threads, chat_format=self.chat_format)

    def sampling_variants(self) -> dict[str, dict]:
        """label -> sampling overrides; the two S1 arms first, then one axis at a time from the defaults."""
        d = default_sampling()
        out = {"guide": dict(GUIDE_SAMPLING), "default": dict(d)}
        for key, values in (("temperature", self.temperatures), ("top_p", self.top_ps),
                            ("top_k", self.top_ks), ("repeat_penalty", self.repeat_penalties)):
            for v in values:
                variant = {**d, key: v}
                if variant not in out.values():
                    out[f"{key}={v}"] = variant
        return out

    def sampling_tests(self) -> list[Test]:
        prompts = load_prompts(self.prompts_file, self.n_prompts)
        return [Test(SAMPLING_KIND, n_gen=self.sweep_max_tokens,
                     params={**v, "max_tokens": self.sweep_max_tokens, "label": label, "prompts": prompts})
                for label, v in self.sampling_variants().items()]

    def cap_tests(self) -> list[Test]:
        tests = []
        if self.n_cap_prompts:
            prompts = load_prompts(self.prompts_file, self.n_cap_prompts)
            tests += [Test(SAMPLING_KIND, n_gen=cap, params={**GUIDE_SAMPLING, "max_tokens": cap,
                                                             "label": f"max_tokens={cap}", "prompts": prompts})
                      for cap in self.caps]
        if self.n_unlimited_prompts:
            prompts = load_prompts(self.prompts_file, self.n_unlimited_prompts)
            tests.append(Test(SAMPLING_KIND, params={**GUIDE_SAMPLING, "max_tokens": None,
                                                     "label": "max_tokens=unlimited", "prompts": prompts}))
        return tests


def _seed_blocks(study: GenerationStudy, base: Settings, tests: Sequence[Test], seeds: Sequence[int],
                 progress: bool, extra: dict) -> None:
    """One trial per seed, each configuration once in it (every prompt, that seed), the configurations' order
    reversed every other seed. A comparison pairs the same prompt and seed under two configurations: these ran
    seconds apart and, over the seeds, in both orders, so a drift of the machine does not land on one side (run as
    one block per configuration, the arm that always ran second took it all)."""
    name, root = split_out_dir(study.out_path)
    for i, seed in enumerate(seeds):
        order = list(tests) if i % 2 == 0 else list(reversed(tests))
        run_sweep(name, base.replace(seed=seed), order, repetitions=1, out_root=root, timeout_s=study.timeout_s,
                  progress=progress, extra={**extra, "seed_block": i, "order": i % 2})


def run_generation_study(study: GenerationStudy, progress: bool = True):
    """The sampling sweep (S1) and the max_tokens sweep (S2), each as one short trial per seed with its
    configurations alternating (`_seed_blocks`). While S1 is inconclusive, another block of `repetitions` seeds for
    the guide's sampling and the defaults runs (the seeds moved on by 1000, so new requests), up to `looks` blocks
    and `looks_max_s` seconds of added blocks: a fixed schedule of looks, every look at looks_confidence(looks).
    Rows say their block (`look`), the schedule (`looks_planned`) and their seed's place (`seed_block`).
    Returns all rows."""
    base = study.settings()
    tag = {"claim": "S1", "part": "sampling", "looks_planned": study.looks}
    seeds = [base.seed + r for r in range(study.repetitions)]
    _seed_blocks(study, base, study.sampling_tests(), seeds, progress, {**tag, "look": 1})
    spent = 0.0
    for look in range(2, study.looks + 1):
        df = load_results(study.out_path)
        if s1_verdict(df, study.equivalence).verdict != INCONCLUSIVE or spent >= study.looks_max_s:
            break
        t0 = time.perf_counter()
        tests = [t for t in study.sampling_tests() if t.params.get("label") in ("guide", "default")]
        _seed_blocks(study, base, tests, [s + 1000 * (look - 1) for s in seeds], progress, {**tag, "look": look})
        spent += time.perf_counter() - t0
    caps = study.cap_tests()
    if caps:
        _seed_blocks(study, base, caps, [base.seed + r for r in range(study.cap_repetitions)], progress,
                     {"claim": "S2", "part": "max_tokens"})
    return load_results(study.out_path)


# ---- analysis -------------------------------------------------------------------------------------------------------
def request_sampling_view(df):
    """A copy of the rows whose sampling columns hold what the requests used (``test_<name>`` where the sweep kept
    the trial's configuration under the plain name)."""
    out = df.copy()
    for k in SAMPLING_KEYS + ("seed",):
        t = f"test_{k}"
        if t in out.columns:
            out[k] = out[t].where(out[t].notna(), out[k]) if k in out.columns else out[t]
    return out


REQUEST_COLUMNS = ("label", "part", *SAMPLING_KEYS, "max_tokens_label", "prompt_id", "seed", "n_prompt_tokens",
                   "n_gen_tokens", "finish_reason", *_PER_REQUEST, "text")


def _ok(df):
    """The successful rows (none when the frame has no status column: nothing ran)."""
    if df is None or df.empty or "status" not in df:
        return pd.DataFrame(columns=["status", "label", "part"])
    ok = df[df["status"] == "ok"]
    return ok if "label" in ok else ok.assign(label=None)


def requests_frame(df):
    """One row per request (the `requests` column exploded), with the row's label, part and sampling; empty, with
    the same columns, when no row succeeded."""
    recs = []
    ok = request_sampling_view(_ok(df))
    for _, row in ok.iterrows():
        for r in row.get("requests") or []:
            recs.append({"label": row["label"], "part": row.get("part"),
                         **{k: row.get(k) for k in SAMPLING_KEYS}, "max_tokens_label": row.get("max_tokens_label"),
                         **r})
    return pd.DataFrame(recs) if recs else pd.DataFrame(columns=list(REQUEST_COLUMNS))


def _req_stat(req, col: str, how: str = "mean", ndigits: int = 4):
    """mean or median of one per-request column (None where no request has it)."""
    if col not in req:
        return None
    x = pd.to_numeric(req[col], errors="coerce").dropna()
    return round(float(x.median() if how == "median" else x.mean()), ndigits) if len(x) else None


def _same_text_share(req) -> float | None:
    """Share of the prompts asked with two seeds or more whose answers were one text (None: no such prompt)."""
    if req.empty or "text_sha" not in req:
        return None
    per = req.groupby("prompt_id").agg(seeds=("seed", "nunique"), texts=("text_sha", "nunique"))
    per = per[per["seeds"] > 1]
    return round(float((per["texts"] == 1).mean()), 4) if len(per) else None


def sampling_table(df, part: str | None = "sampling"):
    """Per configuration, over every request it made (every seed, every block): per-token cost (median [95 % CI]),
    length, truncation, text diversity, and whether seeds gave one text."""
    ok = request_sampling_view(_ok(df))
    if part and not ok.empty:
        ok = ok[ok["part"] == part]
    if ok.empty:
        return pd.DataFrame(columns=["label", "ms/token (ITL)", "ms/token 95% CI", "tokens/s", "requests"])
    cost = median_table(ok, by="label", cols="samples_decode_ms_per_token").set_index("label")
    req = requests_frame(ok)
    rows = []
    for _, r in ok.drop_duplicates("label", keep="first").iterrows():
        med, lo, hi = cost.loc[r["label"], ["samples_decode_ms_per_token", "samples_decode_ms_per_token_lo",
                                            "samples_decode_ms_per_token_hi"]]
        has_ci = lo is not None and lo == lo
        mine = req[req["label"] == r["label"]] if not req.empty else req
        n_req = len(mine) if len(mine) else int(ok.loc[ok["label"] == r["label"], "n_requests"].sum())
        rows.append({
            "label": r["label"], "temperature": r["temperature"], "top_p": r["top_p"], "top_k": _int_or_none(r["top_k"]),
            "repeat_penalty": r["repeat_penalty"], "max_tokens": r["max_tokens_label"],
            "ms/token (ITL)": round(med, 3) if med is not None and med == med else None,
            "ms/token 95% CI": f"[{lo:.3f}, {hi:.3f}]" if has_ci else "",
            "engine ms/token": _req_stat(mine, "engine_decode_ms_per_token", "median"),
            "tokens/s": round(1e3 / med, 2) if med else None,
            "output tokens (mean)": _req_stat(mine, "n_gen_tokens", ndigits=1),
            "e2e ms (median)": _req_stat(mine, "e2e_ms", "median", 1),
            "truncated": (round(float((mine["finish_reason"] == "length").mean()), 4)
                          if "finish_reason" in mine and len(mine) else None),
            "distinct-2": _req_stat(mine, "distinct_2"), "repeated 4-grams": _req_stat(mine, "rep_4gram"),
            "same text across seeds": _same_text_share(mine), "requests": n_req,
        })
    return pd.DataFrame(rows)


def _int_or_none(x):
    return None if x is None or x != x else int(x)


def _pooled(df, label: str):
    """The sampling sweep's rows of one label, every S1 block pooled into one row: requests and samples joined
    (the last row's other columns), its `looks` the blocks pooled. None without a row."""
    ok = request_sampling_view(_ok(df))
    if "part" in ok:
        ok = ok[ok["part"].isna() | (ok["part"] == "sampling")]
    m = ok[ok["label"] == label]
    if m.empty:
        return None
    row = m.iloc[-1].copy()
    if len(m) > 1:
        for col in ("requests", "samples_ts", "samples_n_gen_tokens", "samples_e2e_ms"):
            if col in m:
                row[col] = [x for v in m[col] if isinstance(v, list) for x in v]
        for col in ("decode_ms_per_token", "overhead_ms_per_token"):   # over every pooled request, not the last row's
            vals = [r.get(col) for r in row.get("requests") or [] if r.get(col) is not None]
            if vals:
                row[col] = round(statistics.median(vals), 4)
    row["looks"] = int(m["look"].nunique()) if "look" in m and m["look"].notna().any() else len(m)
    return row


def _paired_by_request(a, b, col: str) -> list[tuple[float, float]]:
    """(a, b) values of `col` for the requests both sides made with the same prompt and seed (request records,
    first of each key; values that are missing or not positive are left out), in key order."""
    def by_key(recs) -> dict:
        out = {}
        for r in recs:
            x = r.get(col)
            if x is not None and x == x and x > 0:
                out.setdefault((r.get("prompt_id"), r.get("seed")), float(x))
        return out
    x, y = by_key(a), by_key(b)
    return [(x[k], y[k]) for k in sorted(x, key=str) if k in y]


def s1_pairs(g, d) -> list[tuple[float, float]]:
    """(guide, default) decode tokens/s of the requests both rows made with the same prompt and seed: the same
    prompt and seed under both samplings, so the pairing removes what the prompt does to speed (its length, the
    context the answer decodes at)."""
    pairs = _paired_by_request(g.get("requests") or [], d.get("requests") or [], "decode_ms_per_token")
    return [(1e3 / a, 1e3 / b) for a, b in pairs]


def s1_verdict(df, equivalence: float | None = 0.05, evidence: Sequence[str] = (), confidence: float | None = None):
    """S1: per-token decode speed, guide sampling vs llama-cpp-python defaults, paired by prompt and seed (the
    geometric mean of the per-pair ratios, a bootstrap over pairs); rows without per-request records fall back to
    the unpaired ratio of medians. Output length reported apart. equivalence None: S1's stated band. Every block of
    seeds the study ran is pooled; confidence None: the rows' (`rows_confidence`, higher under a schedule of looks)."""
    g, d = _pooled(df, "guide"), _pooled(df, "default")
    if g is None or d is None:
        return not_testable("S1", no_rows_reason(df, "the sampling sweep has no successful 'guide' and 'default' "
                                                     "rows to compare", part="sampling"), evidence=evidence)
    metric = "decode tokens/s per request (1000 / mean ITL), guide sampling / llama-cpp-python defaults"
    pairs = s1_pairs(g, d)
    if pairs:
        short = too_few("S1", len(pairs), len(pairs), "n_prompts or repetitions", evidence, MIN_SAMPLES)
        if short:
            return short
        ok = _ok(df)
        conf = confidence or rows_confidence(ok[ok["label"].isin(["guide", "default"])])
        point, lo, hi = paired_log_ratio([math.log(x) for x, _ in pairs], [math.log(y) for _, y in pairs],
                                         confidence=conf)
        v = from_interval("S1", point, lo, hi, claimed="better", higher_is_better=True, equivalence=equivalence,
                          metric=metric + ", paired by prompt and seed", n_candidate=len(pairs),
                          n_baseline=len(pairs), evidence=evidence, confidence=conf)
    else:
        short = too_few("S1", len(g["samples_ts"]), len(d["samples_ts"]), "n_prompts or repetitions", evidence)
        if short:
            return short
        v = compare("S1", g["samples_ts"], d["samples_ts"], higher_is_better=True, claimed="better",
                    metric=metric, equivalence=equivalence, evidence=evidence)
    ln, ln_lo, ln_hi = bootstrap_ratio(g["samples_n_gen_tokens"], d["samples_n_gen_tokens"])
    e2e, e_lo, e_hi = bootstrap_ratio(g["samples_e2e_ms"], d["samples_e2e_ms"])
    v.details = {"output_tokens_ratio": round(ln, 4), "output_tokens_ci": [round(ln_lo, 4), round(ln_hi, 4)],
                 "e2e_ratio": round(e2e, 4), "e2e_ci": [round(e_lo, 4), round(e_hi, 4)],
                 "guide_ms_per_token": g["decode_ms_per_token"], "default_ms_per_token": d["decode_ms_per_token"],
                 "guide_overhead_ms_per_token": g["overhead_ms_per_token"],
                 "default_overhead_ms_per_token": d["overhead_ms_per_token"],
                 "equivalence": v.band, "paired_requests": len(pairs)}
    if not v.band_why:
        v.band_why = (f"the study's equivalence parameter (+-{v.band:.0%}): a per-token cost change smaller "
                      f"than that is below what sampling settings are chosen for")
    how = f"{len(pairs)} request pairs, same prompt and seed" if pairs else "unpaired medians"
    looks, planned = int(g.get("looks", 1) or 1), _int_or_none(g.get("looks_planned")) or 1
    v.details.update(looks=looks, looks_planned=planned)
    if planned > 1:
        how += f", {looks} of {planned} planned blocks of seeds"
        if v.verdict == INCONCLUSIVE and looks >= planned:
            how += " (the last planned block stopped it undecided: raise looks or repetitions)"
    v.summary = (f"Per-token speed with the guide's sampling is {v.effect:.3f}x the defaults' "
                 f"({v.confidence:.1%} CI {v.ci_low:.3f}-{v.ci_high:.3f}, {how}; equivalence band "
                 f"+-{v.band:.0%}): {v.label()}. "
                 f"Tokens per answer, guide / defaults: {ln:.2f}x (95 % CI {ln_lo:.2f}-{ln_hi:.2f}, capped at "
                 f"max_tokens={_int_or_none(g['max_tokens'])}); end-to-end latency {e2e:.2f}x ({e_lo:.2f}-{e_hi:.2f}).")
    return v


def s2_pairs(capped, unlimited) -> list[tuple[float, float]]:
    """(capped, unlimited) end-to-end ms of the requests both made with the same prompt and seed."""
    return _paired_by_request(capped.to_dict("records"), unlimited.to_dict("records"), "e2e_ms")


def s2_verdict(df, cap: int = GUIDE_MAX_TOKENS, evidence: Sequence[str] = ()):
    """S2: e2e latency with max_tokens=cap against unlimited, on the prompts both ran; truncation rates beside it."""
    req = requests_frame(df)
    req = req[req["part"] == "max_tokens"]
    if req.empty:
        return not_testable("S2", no_rows_reason(df, "the max_tokens sweep has no successful rows",
                                                 part="max_tokens"), evidence=evidence)
    capped = req[(req["part"] == "max_tokens") & (req["max_tokens_label"] == str(cap))]
    unl = req[(req["part"] == "max_tokens") & (req["max_tokens_label"] == "unlimited")]
    if capped.empty or unl.empty:
        return not_testable("S2", f"the max_tokens sweep needs both max_tokens={cap} and unlimited rows "
                                  "(set caps to include it and n_unlimited_prompts >= 1)", evidence=evidence)
    same = capped[capped["prompt_id"].isin(set(unl["prompt_id"]))]
    pairs = s2_pairs(same, unl)
    short = too_few("S2", len(pairs), len(pairs), "n_unlimited_prompts or cap_repetitions", evidence)
    if short:
        return short
    # paired by prompt and seed: the same request with and without the cap (the same answer up to the cap), so
    # what the prompt does to latency cancels and only the cap (and the machine's noise) is left
    point, lo, hi = paired_log_ratio([math.log(a) for a, _ in pairs], [math.log(b) for _, b in pairs])
    v = from_interval("S2", point, lo, hi, claimed="better", higher_is_better=False,
                      metric=f"end-to-end latency, max_tokens={cap} / unlimited, paired by prompt and seed",
                      n_candidate=len(pairs), n_baseline=len(pairs), evidence=evidence)
    trunc_cap_all = float((capped["finish_reason"] == "length").mean())
    trunc_cap_same = float((same["finish_reason"] == "length").mean())
    trunc_unl = float((unl["finish_reason"] == "length").mean())
    ln, lo, hi = bootstrap_ratio(same["n_gen_tokens"].tolist(), unl["n_gen_tokens"].tolist())
    v.details = {"paired_requests": len(pairs),
                 "truncation_rate_cap_all_prompts": round(trunc_cap_all, 4),
                 "truncation_rate_cap_same_prompts": round(trunc_cap_same, 4),
                 "truncation_rate_unlimited_hit_n_ctx": round(trunc_unl, 4),
                 "output_tokens_ratio": round(ln, 4), "output_tokens_ci": [round(lo, 4), round(hi, 4)],
                 "unlimited_max_tokens_seen": int(unl["n_gen_tokens"].max()),
                 "n_prompts_unlimited": int(unl["prompt_id"].nunique())}
    v.summary = (f"max_tokens={cap} makes end-to-end latency {v.effect:.2f}x unlimited (95 % CI "
                 f"{v.ci_low:.2f}-{v.ci_high:.2f}, {len(pairs)} request pairs, same prompt and seed, on "
                 f"{v.details['n_prompts_unlimited']} prompt(s)): {v.label()}. "
                 f"The cap cut off {trunc_cap_all:.0%} of answers over all {capped['prompt_id'].nunique()} prompts "
                 f"(finish_reason 'length'); unlimited answers reached n_ctx in {trunc_unl:.0%} of requests "
                 f"(longest {v.details['unlimited_max_tokens_seen']} tokens). A cap saves time only on answers "
                 f"longer than the cap, and it saves it by cutting those answers off.")
    return v


def text_examples(df, prompt_id: str | None = None, chars: int = 160, part: str = "sampling"):
    """The first characters of one prompt's answer (first seed) under every configuration: what changes in the text."""
    req = requests_frame(df)
    req = req[req["part"] == part]
    if req.empty:
        return req[["label", "seed", "n_gen_tokens", "finish_reason", "text"]]
    pid = prompt_id or req["prompt_id"].iloc[0]
    first = req[req["prompt_id"] == pid].sort_values("seed").groupby("label", sort=False).head(1)
    out = first[["label", "seed", "n_gen_tokens", "finish_reason", "text"]].copy()
    out["text"] = out["text"].str.slice(0, chars).str.replace("\n", " ", regex=False)
    return out.reset_index(drop=True)


# ---- figures --------------------------------------------------------------------------------------------------------
def _no_rows(ax, df, part: str) -> None:
    """An empty panel that says why (the figure is still saved: the notebook's evidence paths stay valid)."""
    ax.text(0.5, 0.5, textwrap.fill(no_rows_reason(df, "no successful rows", part=part), 60), ha="center",
            va="center", transform=ax.transAxes, fontsize=9)
    ax.set_axis_off()


def plot_sampling(df):
    """Per-token cost and output length per sampling configuration (median, 95 % CI of per-request samples)."""
    # not at the top: a trial child imports this module for sampling_test and must not load matplotlib
    from kit.plots import median_plot, panel_figure  # (start-up time and RSS are measured there)

    req = requests_frame(df)
    req = req[req["part"] == "sampling"]
    order = list(dict.fromkeys(req["label"]))

    def cost(ax):
        if req.empty:
            return _no_rows(ax, df, "sampling")
        median_plot(req, x="decode_ms_per_token", y="label", ax=ax, order=order, linestyles="none")
        median_plot(req, x="engine_decode_ms_per_token", y="label", ax=ax, order=order, linestyles="none",
                    color="grey", marker="x")
        ax.set_xlabel("ms per token (dot: mean ITL end to end; x: llama.cpp decode)")
        ax.set_ylabel("")

    def length(ax):
        if req.empty:
            return _no_rows(ax, df, "sampling")
        median_plot(req, x="n_gen_tokens", y="label", ax=ax, order=order, linestyles="none", color="C1")
        ax.set_xlabel("generated tokens per answer (median, 95 % CI)")
        ax.set_ylabel("")
        ax.tick_params(labelleft=False)

    fig = panel_figure([("per-token cost", cost), ("output length", length)], ncols=2,
                       figsize=(12, max(3.5, 0.35 * len(order) + 1.5)))
    fig.suptitle("Sampling settings: cost per token vs tokens per answer")
    fig.tight_layout()
    return fig


def plot_caps(df):
    """End-to-end latency and truncation rate against max_tokens (unlimited at the right)."""
    import seaborn as sns  # not at the top, like kit.plots: trial children import this module

    from kit.plots import median_plot, panel_figure  # not at the top: trial children import this module

    req = requests_frame(df)
    req = req[req["part"] == "max_tokens"].copy()
    caps = sorted({int(x) for x in req["max_tokens_label"] if x != "unlimited"})
    order = [str(c) for c in caps] + (["unlimited"] if (req["max_tokens_label"] == "unlimited").any() else [])
    req["truncated"] = (req["finish_reason"] == "length").astype(float)

    def latency(ax):
        if req.empty:
            return _no_rows(ax, df, "max_tokens")
        median_plot(req, x="max_tokens_label", y="e2e_ms", hue="prompt_id", ax=ax, order=order, linewidth=1)
        ax.set_yscale("log")
        ax.set_xlabel("max_tokens")
        ax.set_ylabel("end-to-end latency, ms (log)")

    def truncation(ax):
        if req.empty:
            return _no_rows(ax, df, "max_tokens")
        # a share of answers: the mean of 0/1 with its 95 % CI, not a median
        sns.barplot(data=req, x="max_tokens_label", y="truncated", order=order, errorbar=("ci", 95), ax=ax, color="C3")
        ax.set_xlabel("max_tokens")
        ax.set_ylabel("share of answers cut off (finish_reason 'length')")
        ax.set_ylim(0, 1.05)

    fig = panel_figure([("latency per prompt", latency), ("truncation", truncation)], ncols=2, figsize=(12, 4))
    fig.suptitle("max_tokens: latency saved = answer cut off")
    fig.tight_layout()
    return fig
