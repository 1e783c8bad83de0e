"""The constrained tuner: the guide's `benchmark_settings()` implemented for real (claims X3, X4).

The search (``benchmark_settings``):
1. **Start** from the guide's "good settings" (n_gpu_layers 30 capped by the build, use_mmap, n_batch 512,
   Q4_K_M where such a file exists, else the model given) and measure a quality reference there.
2. **GPU layers** through `kit.search.find_optimal_gpu_layers` with a real probe (a child process per count,
   running the workload's request); on a build without GPU offload this is "not testable here" and n_gpu_layers
   stays 0. The largest count that fits is the origin, not a verdict: smaller counts (`n_gpu_layers`, default 0)
   are screened against it as the first axis, so a device slower than the CPU (Mesa's llvmpipe) is left.
3. **Screen** one axis at a time (n_gpu_layers where offload is testable, threads, n_batch, n_ubatch, flash_attn, KV cache type, rope_freq_base, n_ctx)
   with few repetitions (`kit.sweep.run_sweep`, resumable). A value that breaks a constraint is refused with the
   numbers (memory: peak RSS of the trial, and VRAM it added where there is a GPU, under the limit; quality: a
   candidate that changes the numbers - a quantized KV cache, another model file, a RoPE override - gets a
   perplexity test whose ratio to the reference must stay under ``max_ppl_ratio``; context: n_ctx must hold the
   workload).
4. **Decide** (the stability rule): the fastest value that passes, if the screening saw it faster by more than
   ``min_gain``, is measured again against the current settings, both with full repetitions in one interleaved
   sweep; it replaces them only when `kit.verdicts.compare` labels it "supported" under claim X3's band (its
   interval excludes no change and does not lie inside the band). Otherwise the current value stays, so two runs
   on one machine keep the same settings unless a difference beyond the band was measured. Where the current
   settings themselves break a limit, the fastest value within the limits replaces them.
5. **Confirm** the path's result (or, where it kept the start, the best screened contender), the start point
   and llama.cpp's defaults with full repetitions; the winner is the start unless a contender beats it by the same
   rule (or the start breaks a limit). Every confirmed configuration within noise of the winner is listed.

Score: the time of one RAG-shaped request, ``n_prompt / pp_t/s + n_gen / tg_t/s`` at depth n_prompt
(engine timing as llama-bench measures it: random tokens, no tokenizing or sampling), so both prompt
processing (n_batch, threads_batch) and decoding at depth (threads, flash_attn, KV type) count.

Quality: `kit.quality`'s perplexity test (llama-perplexity's method, per-chunk NLL kept, so ratios pair chunk by
chunk). The values searched, the limits and the workload come from `AutotuneStudy` (study.py), which holds
their defaults; the dataclasses here are the tuner's vocabulary and hold none of their own.

`x4_limits` derives a memory limit and a quality floor from a finished run's measurements (X4 is then tested with
limits that bind on this machine and model, not with constants), and `constrained_run` runs the tuner under them.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import pandas as pd

from kit.config import UNQUANTIZED_KV, Settings, SettingsError
from kit.gpu import build_supports_gpu_offload
from kit.measure import Test, pp, tg
from kit.models import model_card
from kit.paths import DEFAULT_MODEL, resolve
from kit.quality import ppl_test
from kit.results import as_float
from kit.search import find_optimal_gpu_layers, vram_added
from kit.sweep import run_sweep, trial_key
from kit.verdicts import INCONCLUSIVE, NO_EFFECT, SUPPORTED, Verdict, compare, looks_confidence

# the guide's "good settings" (section "Анализ текущих настроек") and its current n_ctx (section 2)
GUIDE_GOOD = {"n_gpu_layers": 30, "use_mmap": True, "n_batch": 512, "n_ctx": 8192}
GUIDE_QUANT = "Q4_K_M"
AXES_ORDER = ("n_gpu_layers", "threads", "n_batch", "n_ubatch", "flash_attn", "kv_type", "rope_freq_base", "n_ctx")
LIMIT_AXES = ("kv_type", "rope_freq_base", "n_ctx")   # the axes that move memory or quality (the X4 run's space)
QUALITY_FIELDS = ("model", "type_k", "type_v", "rope_freq_base")
QUALITY_KIND = "kit.quality:perplexity_test"
TUNE_FILE = "autotune.json"
RULE_CLAIM = "X3"   # the stability rule compares request times under this claim's band (kit.verdicts.BANDS)
WITHIN_NOISE = (NO_EFFECT, INCONCLUSIVE)


# ---- what the tuner searches, respects and scores --------------------------------------------------------------
@dataclass
class SearchSpace:
    """Values screened per axis; an empty list leaves that axis at the start point's value."""

    threads: list            # n_threads = n_threads_batch
    n_batch: list
    n_ubatch: list
    flash_attn: list
    kv_type: list            # K and V together
    n_ctx: list
    rope_freq_base: list = field(default_factory=list)   # RoPE base overrides (None: the model's own)
    n_gpu_layers: list = field(default_factory=list)     # counts screened against the one the search found
    gpu_layers: bool = True  # run find_optimal_gpu_layers first

    def only(self, axes: Sequence[str]) -> "SearchSpace":
        """The same values on `axes`, nothing on the others, no GPU-layer search."""
        return SearchSpace(**{a: (list(getattr(self, a)) if a in axes else []) for a in AXES_ORDER},
                           gpu_layers=False)


@dataclass
class Constraints:
    """What the tuner must respect (the guide's warnings, section "Предупреждения"); None = no limit."""

    ram_limit_mb: float | None      # peak resident memory of a trial (model + KV + compute buffers)
    vram_limit_mb: float | None     # VRAM a trial adds (GPU builds); None = free VRAM minus a margin
    max_ppl_ratio: float | None     # quality floor: perplexity at most this x the reference's
    min_n_ctx: int = 0              # the context the workload needs (prompt + answer)


@dataclass
class Workload:
    """The request the score stands for, and the quality test's size."""

    n_prompt: int            # prompt tokens (pp test; tg runs at this depth)
    n_gen: int               # generated tokens (tg test)
    ppl_chunks: int          # perplexity chunks for quality-changing candidates
    ppl_chunk_tokens: int    # tokens per perplexity chunk (second half scored, as llama-perplexity)

    def speed_tests(self, marker: dict | None = None) -> list[Test]:
        """pp and tg of the request; a marker (in the tests' params) makes a fresh measurement of the same
        settings, with its own trial keys, for a comparison that must be interleaved (the engine ignores it)."""
        tests = [pp(self.n_prompt), tg(self.n_gen, depth=self.n_prompt)]
        if marker:
            tests = [Test(t.kind, t.n_prompt, t.n_gen, t.n_depth, params=dict(marker)) for t in tests]
        return tests

    def quality_test(self) -> Test:
        return ppl_test(n_ctx=self.ppl_chunk_tokens, n_chunks=self.ppl_chunks)


# ---- the guide's settings ------------------------------------------------------------------------------------
def quantized_model_candidates(out_root: str | os.PathLike, quant: str = GUIDE_QUANT) -> list[Path]:
    """Q4_K_M files the quantization study left in <out_root>/cache/quantized/ (if it ran)."""
    d = Path(out_root) / "cache" / "quantized"
    if not d.is_dir():
        return []
    return sorted(p for p in d.glob("*.gguf") if quant.lower() in p.name.lower())


def guide_baseline(model: str, out_root: str | os.PathLike, use_quantized: bool = True) -> tuple[Settings, list[str]]:
    """The guide's "good settings" on this build and model, and notes on what had to differ."""
    notes = []
    chosen = model
    if use_quantized and model == DEFAULT_MODEL:
        found = quantized_model_candidates(out_root)
        if found:
            chosen = str(found[0].resolve())
            notes.append(f"{GUIDE_QUANT}: using {found[0].name} from the quantization study")
    card = model_card(chosen)
    if GUIDE_QUANT not in card.file_type.upper():
        notes.append(f"the guide's baseline is {GUIDE_QUANT}; this model file is {card.file_type} "
                     f"({card.file_name}): the baseline runs on it")
    n_gpu = GUIDE_GOOD["n_gpu_layers"]
    if not build_supports_gpu_offload():
        notes.append("n_gpu_layers 30 -> 0: this build has no GPU offload")
        n_gpu = 0
    elif n_gpu > card.n_layers:
        notes.append(f"n_gpu_layers 30 -> {card.n_layers}: the model has {card.n_layers} layers")
        n_gpu = card.n_layers
    n_ctx = GUIDE_GOOD["n_ctx"]
    if card.n_ctx_train and n_ctx > card.n_ctx_train:
        notes.append(f"n_ctx 8192 -> {card.n_ctx_train}: the model was trained on {card.n_ctx_train}")
        n_ctx = card.n_ctx_train
    s = Settings(model=chosen, n_gpu_layers=n_gpu, use_mmap=True, n_batch=GUIDE_GOOD["n_batch"],
                 n_ubatch=GUIDE_GOOD["n_batch"], n_ctx=n_ctx)
    return s, notes


def llama_defaults(model: str) -> Settings:
    """llama-cpp-python's own defaults (kit.config.Settings() is exactly Llama()'s defaults)."""
    return Settings(model=model)


# ---- rows -> numbers (shared with profiles.py) -----------------------------------------------------------------
def rows_for(df, settings: Settings, tests: Sequence[Test], repetitions: int) -> list[dict]:
    """The study's row of each test for these settings (by trial key); {"status": "missing"} where none."""
    sha = model_card(settings.model).sha256
    keys = [trial_key(sha, settings, t, repetitions) for t in tests]
    if df is None or df.empty:
        return [{} for _ in keys]
    by = {r["trial_key"]: r for r in df.to_dict("records")}
    return [by.get(k, {"trial_key": k, "status": "missing"}) for k in keys]


def samples_of(row: dict, col: str = "samples_ts") -> list[float]:
    """The raw samples of one row's list column (empty when the row has none)."""
    v = row.get(col)
    return [float(x) for x in v if x is not None] if isinstance(v, list) else []


def request_time_samples(pp_row: dict, tg_row: dict, n_prompt: int, n_gen: int) -> list[float]:
    """Per-repetition request time n_prompt/pp + n_gen/tg (samples paired by repetition index)."""
    a, b = samples_of(pp_row), samples_of(tg_row)
    return [n_prompt / x + n_gen / y for x, y in zip(a, b) if x > 0 and y > 0]


num = as_float  # the package's short name for kit.results.as_float (profiles and verdicts use it)


def describe(s: Settings) -> str:
    t = s.n_threads if s.n_threads == s.n_threads_batch else f"{s.n_threads}/{s.n_threads_batch}"
    kv = s.type_k if s.type_k == s.type_v else f"{s.type_k}/{s.type_v}"
    rope = f" rope={s.rope_freq_base:g}" if s.rope_freq_base else ""
    return (f"ngl={s.n_gpu_layers} t={t} b={s.n_batch} ub={s.n_ubatch} fa={int(s.flash_attn)} "
            f"kv={kv} ctx={s.n_ctx}{rope}")


def changes_quality(s: Settings, ref: Settings) -> bool:
    return any(getattr(s, f) != getattr(ref, f) for f in QUALITY_FIELDS)


def with_reference_quality(s: Settings, ref: Settings) -> Settings:
    """s with the quality-changing fields (model file, KV types, RoPE base) of the reference."""
    return s.replace(**{f: getattr(ref, f) for f in QUALITY_FIELDS})


def settings_key(s: Settings) -> str:
    return json.dumps(s.to_dict(), sort_keys=True, default=str)


def settings_diff(s: Settings, base: Settings) -> dict:
    """The fields of s that differ from base: {name: value in s}."""
    a, b = s.to_dict(), base.to_dict()
    return {k: a[k] for k in a if a[k] != b[k]}


def beats(candidate: Sequence[float], incumbent: Sequence[float], metric: str = "",
          confidence: float = 0.95) -> Verdict:
    """The stability rule: compare(RULE_CLAIM) of request times, candidate / incumbent, lower is better. The
    candidate may replace the incumbent only when the label is "supported": its interval excludes no change and
    does not lie inside the claim's band. Too few samples (fewer than 3 a side) give "not testable here".
    confidence: higher after the confirmation's adaptive looks (looks_confidence)."""
    return compare(RULE_CLAIM, list(candidate), list(incumbent), higher_is_better=False, claimed="better",
                   metric=metric or "request time ratio, candidate / current",
                   hint="the repetitions (request time)", confidence=confidence)


def verdict_brief(v: Verdict) -> dict:
    """The numbers of a comparison a table row or a profile header shows."""
    return {"effect": v.effect, "ci_low": v.ci_low, "ci_high": v.ci_high, "label": v.label(),
            "verdict": v.verdict, "n": min(v.n_candidate, v.n_baseline), "band": v.band}


def ratio_words(d: dict) -> str:
    """'x0.981 [0.952, 1.010] no meaningful effect' from verdict_brief's dict."""
    if d.get("effect") is None or d.get("ci_low") is None:
        return d.get("label") or d.get("verdict") or "n/a"
    return f"x{d['effect']:.3f} [{d['ci_low']:.3f}, {d['ci_high']:.3f}] {d['label']}"


# ---- candidates and the result ---------------------------------------------------------------------------------
@dataclass
class Candidate:
    """One screened or confirmed configuration with everything the tuner decided on."""

    settings: Settings
    stage: str
    axis: str
    change: dict
    status: str = "ok"
    error: str = ""
    score_s: float | None = None            # median request time (s), lower is better
    pp_ts: float | None = None
    tg_ts: float | None = None
    rss_peak_mb: float | None = None
    vram_added_mb: float | None = None      # device memory the trial took (kit.search.vram_added)
    vram_source: str | None = None          # 'nvml' or 'llama.cpp'
    ppl: float | None = None
    ppl_ratio: float | None = None
    samples_ppl: list = field(default_factory=list)
    samples_nll: list = field(default_factory=list)   # per-chunk mean NLL (paired across configurations)
    trial_keys: list = field(default_factory=list)
    samples_request_s: list = field(default_factory=list)
    looks: int = 1                          # confirmation blocks of repetitions this configuration ran

    def add_block(self, more: "Candidate", look: int) -> None:
        """Another confirmation block of the same settings (an adaptive look): its samples join these."""
        self.samples_request_s = list(self.samples_request_s) + list(more.samples_request_s)
        self.trial_keys = list(self.trial_keys) + list(more.trial_keys)
        if self.samples_request_s:
            self.score_s = statistics.median(self.samples_request_s)
        for k in ("rss_peak_mb", "vram_added_mb"):
            vals = [x for x in (getattr(self, k), getattr(more, k)) if x is not None]
            setattr(self, k, max(vals) if vals else None)
        if more.status != "ok" and self.status == "ok":
            self.status, self.error = more.status, more.error
        self.looks = look

    def label(self) -> str:
        return describe(self.settings)

    def to_row(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "settings"}
        d.update({f"cfg_{k}": v for k, v in self.settings.to_dict().items()})
        d["label"] = self.label()
        return d

    def take_quality(self, other: "Candidate | None") -> None:
        """Quality is deterministic: carry another measurement's perplexity of the same settings over."""
        if other is not None and other.ppl is not None and self.ppl is None:
            self.ppl, self.ppl_ratio = other.ppl, other.ppl_ratio
            self.samples_ppl, self.samples_nll = other.samples_ppl, other.samples_nll


@dataclass
class TuneResult:
    best: Settings
    start: Settings
    defaults: Settings
    start_notes: list
    gpu_layers: dict
    screened: list                      # Candidate (the reference first)
    confirmed: list                     # Candidate
    refusals: list                      # dicts: what, why, the numbers
    steps: list                         # dicts: axis, from, to, changed, why, decision
    reference_ppl: float | None
    constraints: Constraints
    workload: Workload
    repetitions: int
    screen_repetitions: int
    min_gain: float                     # the screening step a value had to beat the current one by to be decided
    study_dir: str
    decisions: list = field(default_factory=list)    # dicts: axis, change, the comparison, taken
    within_noise: list = field(default_factory=list)  # dicts: confirmed candidates not told apart from the winner
    kept_start: bool = False            # the winner is the start point: nothing beat it by the rule
    why_best: str = ""
    confirm_looks: int = 1              # the confirmation's schedule of looks (its comparisons at looks_confidence)
    confirm_extra_s: float = 0.0        # seconds the added confirmation blocks took

    @property
    def confidence(self) -> float:
        """The confidence of every confirmation comparison (X3's too): looks_confidence(confirm_looks)."""
        return looks_confidence(self.confirm_looks)

    def table(self, which: str = "confirmed"):
        return pd.DataFrame([c.to_row() for c in getattr(self, which)])

    def refusal_table(self):
        return pd.DataFrame(self.refusals)

    def decision_table(self):
        cols = ["axis", "change", "effect", "ci_low", "ci_high", "label", "taken"]
        return pd.DataFrame(self.decisions, columns=cols)

    def confirmed_for(self, settings: Settings) -> Candidate | None:
        for c in self.confirmed:
            if c.settings == settings:
                return c
        return None

    def candidate_for(self, settings: Settings) -> Candidate | None:
        """The confirmed measurement of these settings, else the screened one."""
        return self.confirmed_for(settings) or next((c for c in self.screened if c.settings == settings), None)

    def to_dict(self) -> dict:
        return {
            "best": self.best.to_dict(), "start": self.start.to_dict(), "defaults": self.defaults.to_dict(),
            "start_notes": self.start_notes, "gpu_layers": self.gpu_layers,
            "screened": [c.to_row() for c in self.screened], "confirmed": [c.to_row() for c in self.confirmed],
            "refusals": self.refusals, "steps": self.steps, "decisions": self.decisions,
            "within_noise": self.within_noise, "kept_start": self.kept_start, "why_best": self.why_best,
            "reference_ppl": self.reference_ppl, "constraints": asdict(self.constraints),
            "workload": asdict(self.workload), "repetitions": self.repetitions,
            "screen_repetitions": self.screen_repetitions, "min_gain": self.min_gain,
            "confirm_looks": self.confirm_looks, "confirm_extra_s": self.confirm_extra_s,
            "confidence": self.confidence,
        }

    @property
    def path(self) -> Path:
        return Path(self.study_dir) / TUNE_FILE

    def save(self, path: str | os.PathLike | None = None) -> Path:
        p = Path(path) if path else self.path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_dict(), indent=2, default=str))
        return p


# ---- one tuner run: measuring, judging, refusing ---------------------------------------------------------------
class _Tuner:
    def __init__(self, study: str, out_root: str, constraints: Constraints, workload: Workload,
                 screen_reps: int, reps: int, min_gain: float, progress: bool, decide: bool = True,
                 confirm_looks: int = 1, confirm_max_s: float = 0.0):
        self.study, self.out_root = study, out_root
        self.confirm_looks, self.confirm_max_s, self.confirm_extra_s = confirm_looks, confirm_max_s, 0.0
        self.decide_changes = decide
        self.c, self.w = constraints, workload
        self.screen_reps, self.reps = screen_reps, reps
        self.min_gain = min_gain
        self.progress = progress
        self.reference: Candidate | None = None
        self.screened: list[Candidate] = []
        self.refusals: list[dict] = []
        self.steps: list[dict] = []
        self.decisions: list[dict] = []

    def measure(self, configs: list[Settings], stage: str, axis: str, changes: list[dict], reps: int,
                extra_tests: Sequence[Test] = (), quality_ref: Settings | None = None,
                marker: dict | None = None) -> list[Candidate]:
        speed = self.w.speed_tests(marker)
        plain = [s for s in configs if quality_ref is None or not changes_quality(s, quality_ref)]
        qual = [s for s in configs if s not in plain]
        tests_plain = speed + list(extra_tests)
        tests_qual = tests_plain + [self.w.quality_test()]
        df = None
        for group, tests in ((plain, tests_plain), (qual, tests_qual)):
            if group:
                df = run_sweep(self.study, group, tests, repetitions=reps, out_root=self.out_root,
                               progress=self.progress, extra={"autotune_stage": stage, "autotune_axis": axis})
        out = []
        for s, ch in zip(configs, changes):
            tests = tests_qual if s in qual else tests_plain
            out.append(self._candidate(s, stage, axis, ch, rows_for(df, s, tests, reps)))
        return out

    def _candidate(self, s: Settings, stage: str, axis: str, change: dict, rows: list[dict]) -> Candidate:
        c = Candidate(settings=s, stage=stage, axis=axis, change=change,
                      trial_keys=[r.get("trial_key") for r in rows])
        mem_rows = [r for r in rows if r.get("test_kind") != QUALITY_KIND]
        rss = [x for x in (num(r.get("rss_peak_mb")) for r in mem_rows) if x is not None]
        c.rss_peak_mb = max(rss) if rss else None
        vram = vram_added(mem_rows)
        c.vram_added_mb, c.vram_source = vram["vram_mb"], vram["vram_source"]
        bad = [r for r in rows if r.get("status") != "ok"]
        if bad:
            c.status = bad[0].get("status", "error")
            c.error = str(bad[0].get("error") or "")[:300]
        pp_row, tg_row = rows[0], rows[1]
        if pp_row.get("status") == "ok" and tg_row.get("status") == "ok":
            c.samples_request_s = request_time_samples(pp_row, tg_row, self.w.n_prompt, self.w.n_gen)
            if c.samples_request_s:
                c.score_s = statistics.median(c.samples_request_s)
            c.pp_ts, c.tg_ts = num(pp_row.get("median_ts")), num(tg_row.get("median_ts"))
        q = [r for r in rows if r.get("test_kind") == QUALITY_KIND and r.get("status") == "ok"]
        if q:
            c.ppl = num(q[0].get("ppl"))
            c.samples_nll = samples_of(q[0], "chunk_nll")
            c.samples_ppl = [round(math.exp(x), 5) for x in c.samples_nll]
        return c

    def violation(self, c: Candidate, quality: bool = True) -> tuple[str, str] | None:
        """(kind, words) when a candidate breaks a constraint, else None."""
        if c.status != "ok" or c.score_s is None:
            return "failed", f"trial {c.status}: {c.error}"
        if self.c.min_n_ctx and c.settings.n_ctx and c.settings.n_ctx < self.c.min_n_ctx:
            return "context", f"n_ctx={c.settings.n_ctx} < the {self.c.min_n_ctx} tokens the workload needs"
        if self.c.ram_limit_mb is not None and c.rss_peak_mb is not None and c.rss_peak_mb > self.c.ram_limit_mb:
            return "memory", f"peak RSS {c.rss_peak_mb:.0f} MB > RAM limit {self.c.ram_limit_mb:.0f} MB"
        if self.c.vram_limit_mb is not None and c.vram_added_mb is not None and c.vram_added_mb > self.c.vram_limit_mb:
            return "memory", (f"VRAM {c.vram_added_mb:.0f} MiB ({c.vram_source}) > limit "
                              f"{self.c.vram_limit_mb:.0f} MiB")
        if quality and self.reference is not None and changes_quality(c.settings, self.reference.settings):
            return self._quality_violation(c)
        return None

    def _quality_violation(self, c: Candidate) -> tuple[str, str] | None:
        if c.ppl is None:
            return "quality", "quality changes with this setting and its perplexity was not measured"
        ref = self.reference
        if ref.ppl:
            c.ppl_ratio = round(c.ppl / ref.ppl, 5)
        floor = self.c.max_ppl_ratio
        if floor is not None and c.ppl_ratio is not None and c.ppl_ratio > floor:
            return "quality", (f"perplexity {c.ppl:.4g} is {100 * (c.ppl_ratio - 1):.2f} % above the reference "
                               f"{ref.ppl:.4g} (floor: at most {100 * (floor - 1):.2f} %)")
        return None

    def refuse(self, c: Candidate, current: Candidate, kind: str, words: str) -> None:
        faster = (c.score_s is not None and current.score_s is not None and c.score_s < current.score_s)
        self.refusals.append({
            "stage": c.stage, "axis": c.axis, "change": c.change, "reason": kind, "detail": words,
            "faster": faster,
            "speedup": round(current.score_s / c.score_s, 4) if (c.score_s and current.score_s) else None,
            "score_s": c.score_s, "current_score_s": current.score_s,
            "rss_peak_mb": c.rss_peak_mb, "ram_limit_mb": self.c.ram_limit_mb,
            "vram_added_mb": c.vram_added_mb, "vram_limit_mb": self.c.vram_limit_mb,
            "ppl": c.ppl, "ppl_ratio": c.ppl_ratio, "max_ppl_ratio": self.c.max_ppl_ratio,
            "settings": c.label(), "trial_keys": c.trial_keys,
        })

    def decide(self, current: Candidate, nominee: Candidate, axis: str) -> tuple[Candidate, Candidate, Verdict]:
        """The current settings and the nominee measured again, full repetitions, in one interleaved sweep (fresh
        trial keys), and the stability rule on their request times."""
        inc, nom = self.measure([current.settings, nominee.settings], "decide", axis, [{}, nominee.change],
                                self.reps, marker={"autotune_decision": axis})
        inc.take_quality(current)
        nom.take_quality(nominee)
        v = beats(nom.samples_request_s, inc.samples_request_s,
                  metric=f"request time ratio, {axis} {nominee.change} / current")
        return inc, nom, v

    def step(self, current: Candidate, axis: str, configs: list[Settings], changes: list[dict]) -> Candidate:
        todo = [(s, ch) for s, ch in zip(configs, changes) if s != current.settings]
        if not todo:
            return current
        cands = self.measure([s for s, _ in todo], "screen", axis, [ch for _, ch in todo], self.screen_reps,
                             quality_ref=self.reference.settings)
        self.screened.extend(cands)
        ok = []
        for c in cands:
            v = self.violation(c)
            if v:
                self.refuse(c, current, *v)
            else:
                ok.append(c)
        step = {"axis": axis, "from": current.label(), "tried": [c.change for c in cands], "decision": None}
        chosen, why = current, ""
        if not ok:
            why = "every value tried broke a constraint" if cands else "nothing to try"
        elif self.violation(current) is not None:
            chosen = min(ok, key=lambda c: c.score_s)
            why = f"the current settings break a limit ({self.violation(current)[1]}): the fastest value within"
        else:
            nominee = min(ok, key=lambda c: c.score_s)
            if nominee.score_s >= current.score_s * (1 - self.min_gain):
                why = f"no value faster by more than {100 * self.min_gain:.0f} % at screening"
            elif not self.decide_changes:
                why = "within the limits already: this run moves only to stay within them"
            else:
                inc, nom, v = self.decide(current, nominee, axis)
                bad = self.violation(nom)
                taken = v.verdict == SUPPORTED and bad is None
                d = {"axis": axis, "change": nominee.change, "candidate": nom.label(), "current": inc.label(),
                     **verdict_brief(v), "taken": taken, "trial_keys": inc.trial_keys + nom.trial_keys}
                self.decisions.append(d)
                step["decision"] = d
                if bad:
                    self.refuse(nom, inc, *bad)
                if taken:
                    chosen, why = nom, f"faster beyond the band: {ratio_words(d)}"
                else:
                    why = f"not taken: {ratio_words(d)}" + (f"; {bad[1]}" if bad else "")
        step.update({"to": chosen.label(), "changed": chosen is not current, "score_s": chosen.score_s, "why": why})
        self.steps.append(step)
        return chosen


def _axis_configs(axis: str, cur: Settings, values: list) -> tuple[list[Settings], list[dict]]:
    configs, changes = [], []
    for v in values:
        if axis == "threads":
            ch = {"n_threads": v, "n_threads_batch": v}
        elif axis == "kv_type":
            ch = {"type_k": v, "type_v": v}
            if v not in UNQUANTIZED_KV:
                ch["flash_attn"] = True      # a quantized V cache needs flash attention
        else:
            ch = {axis: v}
        if axis == "n_batch" and cur.n_ubatch > v:
            ch["n_ubatch"] = v
        try:
            s = cur.replace(**ch)
        except SettingsError:
            continue
        configs.append(s)
        changes.append(ch)
    return configs, changes


# ---- benchmark_settings and its steps --------------------------------------------------------------------------
def _check_args(start: Settings, cons: Constraints, w: Workload, screen_repetitions: int, repetitions: int,
                confirm_top: int, min_gain: float) -> Constraints:
    """The arguments' rules; returns the constraints with min_n_ctx raised to what the workload needs."""
    if screen_repetitions < 1 or repetitions < 1 or confirm_top < 0:
        raise SettingsError("screen_repetitions and repetitions must be >= 1, confirm_top >= 0")
    if min_gain < 0:
        raise SettingsError("min_gain must be >= 0")
    need = w.n_prompt + w.n_gen
    if start.n_ctx and start.n_ctx < max(need, w.ppl_chunk_tokens):
        raise SettingsError(f"start n_ctx={start.n_ctx} cannot hold the workload ({need} tokens)")
    return Constraints(**{**asdict(cons), "min_n_ctx": max(cons.min_n_ctx, need)})


def _search_origin(start: Settings, space: SearchSpace, vram_limit_mb: float | None,
                   workload: Workload) -> tuple[dict, Settings, Settings, SearchSpace]:
    """find_optimal_gpu_layers from the start point: (its result, the baseline, the search's origin, the space).

    The probes run the workload's own request (pp n_prompt, tg at that depth), so a count that fits has loaded
    and run what the tuner scores. The search starts from the guide's settings with the GPU layers found; the
    guide's own settings stay the baseline every comparison is made against (with n_gpu_layers 0 where offload
    is not testable). The largest count that fits is not always the fastest (a software device, a slow PCIe
    link): the space's `n_gpu_layers` below the found count are screened against it like any axis; counts above
    it are dropped (they do not fit), and so is the whole axis where no search found a count."""
    if space.gpu_layers:
        gpu = find_optimal_gpu_layers(start.model, vram_limit_mb=vram_limit_mb, base=start.replace(n_gpu_layers=0),
                                      tests=workload.speed_tests())
    else:
        gpu = {"best_n_gpu_layers": start.n_gpu_layers, "reason": "not searched", "testable": False, "probes": []}
    origin = start
    found = gpu.get("best_n_gpu_layers") if gpu.get("testable") else None
    if found is not None:
        origin = start.replace(n_gpu_layers=found)
    elif gpu.get("reason", "").startswith("not testable"):
        start = origin = start.replace(n_gpu_layers=0)
    counts = [int(v) for v in space.n_gpu_layers if found is not None and 0 <= int(v) < found]
    space = replace(space, n_gpu_layers=counts)
    return gpu, start, origin, space


def _screen(t: _Tuner, origin: Settings, space: SearchSpace) -> tuple[Candidate, Candidate]:
    """The quality reference measured at the origin (quality test forced on), then one axis at a time:
    (reference, the path's result)."""
    ref = t.measure([origin], "reference", "start", [{}], t.screen_reps, extra_tests=[t.w.quality_test()])[0]
    if ref.status != "ok" or ref.score_s is None:
        raise RuntimeError(f"the start configuration failed: {ref.status} {ref.error}")
    t.reference = ref
    bad = t.violation(ref)
    if bad:  # the start itself breaks a limit: say so; the steps then move to the fastest value within
        t.refuse(ref, ref, *bad)
    cur = ref
    for axis in AXES_ORDER:
        values = getattr(space, axis)
        if values:
            cur = t.step(cur, axis, *_axis_configs(axis, cur.settings, values))
    return ref, cur


def _contenders(t: _Tuner, cur: Candidate, start: Settings, defaults: Settings, confirm_top: int) -> list[Settings]:
    """What the confirmation pits against the start: the path's result where it moved, then the fastest feasible
    screened configurations, `confirm_top` in all (at least one, so a kept start is still compared)."""
    out = [cur.settings] if cur.settings != start else []
    feasible = sorted((c for c in t.screened if c.score_s is not None and t.violation(c) is None),
                      key=lambda c: c.score_s)
    for c in feasible:
        if len(out) >= max(confirm_top, 1):
            break
        if c.settings not in out and c.settings not in (start, defaults):
            out.append(c.settings)
    return out


def _more_looks(t: _Tuner, contenders: list, base: Candidate, start: Settings, level: float) -> None:
    """Adaptive confirmation: while a feasible contender's comparison with the start is inconclusive at `level`,
    both run another block of `t.reps` repetitions, interleaved (fresh trial keys: a marker per look), and the
    samples join; up to `t.confirm_looks` blocks in all (a fixed schedule of looks, every look at
    looks_confidence(confirm_looks)) and `t.confirm_max_s` seconds of added blocks."""
    for look in range(2, t.confirm_looks + 1):
        undecided = [c for c in contenders if c.samples_request_s and base.samples_request_s and
                     beats(c.samples_request_s, base.samples_request_s, confidence=level).verdict == INCONCLUSIVE]
        if not undecided or t.confirm_extra_s >= t.confirm_max_s:
            return
        t0 = time.perf_counter()
        configs = [c.settings for c in undecided] + [start]
        more = t.measure(configs, "confirm", "confirm", [{} for _ in configs], t.reps,
                         marker={"confirm_look": look})
        for c, m in zip(undecided + [base], more):
            c.add_block(m, look)
        t.confirm_extra_s += time.perf_counter() - t0


def _confirm(t: _Tuner, cur: Candidate, start: Settings, defaults: Settings, confirm_top: int,
             confirm_tests: Sequence[Test]) -> tuple[Settings, list[Candidate], list[dict], str]:
    """The contenders, the start point and llama.cpp's defaults with full repetitions, interleaved. The winner is
    the start unless a feasible contender beats it by the stability rule (the path's result first), or the start
    breaks a limit (then the path's result, or the fastest feasible contender). Returns (winner, the confirmed
    candidates, those within noise of the winner, why)."""
    contenders = _contenders(t, cur, start, defaults, confirm_top)
    pool = []
    for s in contenders + [start, defaults]:
        if s not in pool:
            pool.append(s)
    conf = t.measure(pool, "confirm", "confirm", [{} for _ in pool], t.reps, extra_tests=confirm_tests)
    earlier = {settings_key(c.settings): c for c in t.screened}
    for c in conf:
        c.take_quality(earlier.get(settings_key(c.settings)))
    base = conf[pool.index(start)]
    level = looks_confidence(t.confirm_looks)
    feasible = []
    for c in conf[:len(contenders)]:
        v = t.violation(c)
        if v:
            t.refuse(c, base, *v)
        else:
            feasible.append(c)
    _more_looks(t, [c for c in feasible if c is not base], base, start, level)
    ok = [(c, beats(c.samples_request_s, base.samples_request_s, metric="request time ratio, contender / start",
                    confidence=level)) for c in feasible]
    won = [c for c, v in ok if v.verdict == SUPPORTED]
    start_bad = t.violation(base, quality=False)
    # where the start breaks a limit, llama.cpp's defaults (confirmed beside it) are a fallback within the limits too
    dflt = conf[pool.index(defaults)]
    within_limits = feasible + ([dflt] if dflt is not base and not any(dflt is c for c in feasible)
                                and t.violation(dflt) is None else [])
    if won:
        best = next((c for c in won if c.settings == cur.settings), None) or min(won, key=lambda c: c.score_s)
        why = "beats the start beyond the band: " + ratio_words(verdict_brief(next(v for c, v in ok if c is best)))
    elif start_bad and within_limits:
        # (violation() refuses a candidate without a score, so every one here has one)
        best = next((c for c in within_limits if c.settings == cur.settings), None) or min(
            within_limits, key=lambda c: c.score_s)
        why = (f"the start breaks a limit ({start_bad[1]}): the fastest confirmed configuration within"
               + (" (llama.cpp's defaults)" if best is dflt else ""))
    else:
        best = base
        why = ("the start breaks a limit and no confirmed configuration is within it" if start_bad else
               "no contender beat the start beyond the band: " +
               ("; ".join(f"{c.label()} {ratio_words(verdict_brief(v))}" for c, v in ok) or
                "no feasible contender was screened"))
    within = []
    for c in conf:
        if c is best or c.score_s is None:
            continue
        v = beats(c.samples_request_s, best.samples_request_s, metric="request time ratio, candidate / winner",
                  confidence=level)
        if v.verdict in WITHIN_NOISE:
            within.append({"settings": c.label(), "differs": settings_diff(c.settings, best.settings),
                           **verdict_brief(v), "feasible": t.violation(c) is None})
    return best.settings, conf, within, why


def benchmark_settings(model: str, *, study: str, out_root: str | os.PathLike, space: SearchSpace,
                       constraints: Constraints, workload: Workload, screen_repetitions: int, repetitions: int,
                       confirm_top: int, min_gain: float, start: Settings | None = None,
                       confirm_tests: Sequence[Test] = (), progress: bool = True, decide: bool = True,
                       confirm_looks: int = 1, confirm_max_s: float = 0.0) -> TuneResult:
    """Search for the fastest settings under a memory limit and a quality floor (see the module docstring).

    AutotuneStudy.tuner_kwargs() gives every argument but `start` (default: the guide's good settings);
    a relative out_root is taken from the repository root. decide=False never measures a nominated value again:
    the run moves only where the current settings break a limit (constrained_run)."""
    out_root = resolve(out_root)
    notes: list[str] = []
    if start is None:
        start, notes = guide_baseline(model, out_root)
    cons = _check_args(start, constraints, workload, screen_repetitions, repetitions, confirm_top, min_gain)
    if confirm_looks < 1 or confirm_max_s < 0:
        raise SettingsError(f"confirm_looks={confirm_looks} must be >= 1 and confirm_max_s={confirm_max_s} >= 0")
    t = _Tuner(study, str(out_root), cons, workload, screen_repetitions, repetitions, min_gain, progress, decide,
               confirm_looks, confirm_max_s)
    gpu, start, origin, space = _search_origin(start, space, constraints.vram_limit_mb, workload)
    ref, cur = _screen(t, origin, space)
    defaults = llama_defaults(start.model)
    if defaults.n_ctx < workload.n_prompt + workload.n_gen:
        defaults = defaults.replace(n_ctx=start.n_ctx)
    best, conf, within, why = _confirm(t, cur, start, defaults, confirm_top, confirm_tests)
    return TuneResult(best=best, start=start, defaults=defaults, start_notes=notes, gpu_layers=gpu,
                      screened=[ref] + t.screened, confirmed=conf, refusals=t.refusals, steps=t.steps,
                      reference_ppl=ref.ppl, constraints=cons, workload=workload, repetitions=repetitions,
                      screen_repetitions=screen_repetitions, min_gain=min_gain,
                      study_dir=str(Path(out_root) / study), decisions=t.decisions, within_noise=within,
                      kept_start=best == start, why_best=why, confirm_looks=confirm_looks,
                      confirm_extra_s=round(t.confirm_extra_s, 1))


# ---- X4: limits that bind, derived from a finished run ---------------------------------------------------------
def x4_limits(result: TuneResult, max_ppl_ratio: float | None) -> dict:
    """A memory limit and a quality floor that bind on what `result` measured (claim X4's test).

    Memory: halfway across the widest gap between the distinct peak RSS values of the screened and confirmed
    configurations (rounded to 1 MB), so at least one measured configuration is above it and one below, and none
    sits near it: a limit drawn through a configuration's own footprint (a few tenths of a MB apart from trial to
    trial) refuses it in one trial and admits it in the next. Quality: the study's floor where a
    screened candidate's perplexity ratio exceeds it, else halfway between 1 and the largest ratio measured.
    A limit is None (with why) where the measurements leave no room for one to bind."""
    measured = [c for c in result.screened + result.confirmed if c.status == "ok"]
    rss = [c.rss_peak_mb for c in measured if c.rss_peak_mb is not None]
    out: dict = {"ram_limit_mb": None, "max_ppl_ratio": None}
    levels = sorted({round(x) for x in rss})
    if len(levels) >= 2:
        below, above = max(zip(levels, levels[1:]), key=lambda g: g[1] - g[0])
        out.update(ram_limit_mb=round(below + (above - below) / 2, 1), rss_min_mb=min(rss), rss_max_mb=max(rss),
                   ram_why=f"halfway across the widest gap between measured peak RSS values, {below} MB to {above} MB "
                           f"(measured {min(rss):.0f} to {max(rss):.0f} MB)")
    else:
        out["ram_why"] = "no limit can bind: the configurations measured share one peak RSS" if rss else \
            "no peak RSS was measured"
    ratios = [c.ppl_ratio for c in measured if c.ppl_ratio is not None]
    worst = max(ratios, default=None)
    if worst is not None and max_ppl_ratio is not None and worst > max_ppl_ratio:
        out.update(max_ppl_ratio=max_ppl_ratio, ppl_ratio_max=worst,
                   ppl_why=f"the study's floor {max_ppl_ratio:g}: a screened candidate's perplexity ratio "
                           f"({worst:.4g}) exceeds it")
    elif worst is not None and worst > 1:
        floor = round(1 + (worst - 1) / 2, 5)
        out.update(max_ppl_ratio=floor, ppl_ratio_max=worst,
                   ppl_why=f"halfway between 1 and the largest perplexity ratio measured ({worst:.4g}): the "
                           f"study's floor {max_ppl_ratio} binds on nothing here")
    else:
        out["ppl_why"] = ("no limit can bind: no quality-changing candidate was screened" if worst is None else
                          f"no limit can bind: no candidate's perplexity rose (largest ratio {worst:.4g})")
    return out


def constrained_run(result: TuneResult, limits: dict, *, model: str, study: str, out_root: str | os.PathLike,
                    space: SearchSpace, screen_repetitions: int, repetitions: int, min_gain: float,
                    progress: bool = True) -> TuneResult:
    """The tuner again from `x4_start` (the largest measured configuration), over the axes that move memory and
    quality (LIMIT_AXES), under `x4_limits`' limits. It moves only where the current settings break a limit (no speed decisions: the first
    run made those); rows of configurations already measured are reused (resumable sweeps)."""
    cons = Constraints(ram_limit_mb=limits.get("ram_limit_mb"), vram_limit_mb=result.constraints.vram_limit_mb,
                       max_ppl_ratio=limits.get("max_ppl_ratio"))
    return benchmark_settings(model, study=study, out_root=out_root, space=space.only(LIMIT_AXES),
                              constraints=cons, workload=result.workload, screen_repetitions=screen_repetitions,
                              repetitions=repetitions, confirm_top=1, min_gain=min_gain,
                              start=x4_start(result, limits), progress=progress, decide=False)


def x4_start(result: TuneResult, limits: dict) -> Settings:
    """Where the X4 run starts: the measured configuration with the largest peak RSS where a memory limit was
    derived (x4_limits puts the limit below it, so the run must move to stay within it, on any machine), else the
    first run's winner. Starting from the winner instead left the limit unbound wherever the winner and its one-axis
    neighbours were all small (a winner at a small context with a compact KV cache)."""
    if limits.get("ram_limit_mb") is None:
        return result.best
    measured = [c for c in result.screened + result.confirmed if c.status == "ok" and c.rss_peak_mb is not None]
    return max(measured, key=lambda c: c.rss_peak_mb).settings if measured else result.best
