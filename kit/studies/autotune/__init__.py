"""Auto-tune (claims X3, X4) and `.env` profiles (X1, X2): the guide's `benchmark_settings()` and
`find_optimal_gpu_layers()`, implemented for real.

The search (``benchmark_settings``):
1. **Start** from the guide's "good settings" (n_gpu_layers 30 capped by the build, use_mmap, n_batch 512,
   Q4_K_M where such a file exists, else the model given) and measure a quality reference there.
2. **GPU layers** through `kit.gpu.find_optimal_gpu_layers` with a real probe (a child process per count);
   on a build without GPU offload this is "not testable here" and n_gpu_layers stays 0.
3. **Screen** one axis at a time (threads, n_batch, n_ubatch, flash_attn, KV cache type, n_ctx) with few
   repetitions (`kit.sweep.run_sweep`, resumable): a value replaces the current one only when it is
   faster by more than ``min_gain`` (the guide's "change gradually") *and* it passes every constraint.
   Memory: peak RSS of the trial (and VRAM the trial added, where there is a GPU) under the limit.
   Quality: a candidate that changes the numbers (a quantized KV cache, another model file, a RoPE
   override) gets a perplexity test; its per-chunk perplexity ratio to the reference must stay under
   ``max_ppl_ratio``. Context: n_ctx must hold the workload.
   Every faster setting refused for memory, quality or context goes to ``refusals`` with the numbers.
4. **Confirm** the best few screened configurations, the start point and llama.cpp's defaults with full
   repetitions; the winner is the best *confirmed* score.

Score: the time of one RAG-shaped request, ``n_prompt / pp_t/s + n_gen / tg_t/s`` at depth n_prompt
(engine timing as llama-bench measures it: random tokens, no tokenizing or sampling), so both prompt
processing (n_batch, threads_batch) and decoding at depth (threads, flash_attn, KV type) count.

Quality: `kit.quality`'s perplexity test (llama-perplexity's method, per-chunk NLL kept, so ratios pair chunk by chunk).

Request-level measurements (`rag_request_test`): a streamed chat completion of a RAG-shaped prompt built
from the profile's own ``rag_search_k`` and ``max_context_length`` (chunks of Python's reference text from
`pydoc_data.topics`, the corpus of data/rag_questions.jsonl), for TTFT and tokens/s as a client sees them.
Retrieval is not in it: the RAG study (outputs/60_rag) measures search time.
"""
from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from kit.config import KV_CACHE_TYPES, UNQUANTIZED_KV, Settings, SettingsError
from kit.measure import Test, pp, tg

REPO_ROOT = Path(__file__).resolve().parent.parent
GUIDE_PROFILES_DIR = REPO_ROOT / "data" / "guide_profiles"
GUIDE_PROFILE_NAMES = ("speed", "balanced", "quality")
RAG_QUESTIONS = REPO_ROOT / "data" / "rag_questions.jsonl"
# the guide's "good settings" (section "Анализ текущих настроек") and its current n_ctx (section 2)
GUIDE_GOOD = {"n_gpu_layers": 30, "use_mmap": True, "n_batch": 512, "n_ctx": 8192}
GUIDE_QUANT = "Q4_K_M"
# the guide's claimed gains after optimisation (section "Ожидаемые результаты"): ratio tuned / baseline
GUIDE_CLAIMED_RATIOS = {
    "tokens_per_s": {"low": 1.50, "high": 1.75, "higher_is_better": True, "text": "+50-75 %"},
    "ttft": {"low": 0.50, "high": 0.50, "higher_is_better": False, "text": "-50 %"},
    "rag_search": {"low": 0.50, "high": 0.50, "higher_is_better": False, "text": "-50 %"},
}
AXES_ORDER = ("threads", "n_batch", "n_ubatch", "flash_attn", "kv_type", "n_ctx")
QUALITY_FIELDS = ("model", "type_k", "type_v", "rope_freq_base")
QUALITY_KIND = "kit.quality:perplexity_test"


# ---- configuration -----------------------------------------------------------------------------------------
@dataclass
class SearchSpace:
    """Values screened per axis; an empty list leaves that axis at the start point's value."""

    threads: list = field(default_factory=list)          # n_threads = n_threads_batch; [] = [cpu/2, cpu]
    n_batch: list = field(default_factory=lambda: [256, 512, 1024])
    n_ubatch: list = field(default_factory=lambda: [128, 256, 512])
    flash_attn: list = field(default_factory=lambda: [False, True])
    kv_type: list = field(default_factory=lambda: ["f16", "q8_0", "q4_0"])  # K and V together
    n_ctx: list = field(default_factory=lambda: [2048, 4096, 8192])
    gpu_layers: bool = True                                # run find_optimal_gpu_layers first

    def __post_init__(self) -> None:
        if not self.threads:
            cpu = os.cpu_count() or 1
            self.threads = sorted({max(cpu // 2, 1), cpu})
        for name in AXES_ORDER:
            values = getattr(self, name)
            if not isinstance(values, list):
                raise SettingsError(f"search space {name!r} must be a list, got {values!r}")
        for v in self.kv_type:
            if v not in KV_CACHE_TYPES:
                raise SettingsError(f"kv_type {v!r} is not one of {', '.join(KV_CACHE_TYPES)}")
        for name in ("threads", "n_batch", "n_ubatch", "n_ctx"):
            for v in getattr(self, name):
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    raise SettingsError(f"search space {name}: {v!r} must be a positive int")
        for v in self.flash_attn:
            if not isinstance(v, bool):
                raise SettingsError(f"search space flash_attn: {v!r} must be true or false")


@dataclass
class Constraints:
    """What the tuner must respect (the guide's warnings, section "Предупреждения")."""

    ram_limit_mb: float | None = None     # peak resident memory of a trial (model + KV + compute buffers)
    vram_limit_mb: float | None = None    # VRAM a trial adds (GPU builds); None = free VRAM minus margin
    max_ppl_ratio: float | None = 1.02    # quality floor: perplexity at most this x the reference's
    min_n_ctx: int = 0                    # the context the workload needs (prompt + answer)

    def __post_init__(self) -> None:
        if self.max_ppl_ratio is not None and self.max_ppl_ratio < 1:
            raise SettingsError(f"max_ppl_ratio={self.max_ppl_ratio} must be >= 1 (1.02 = at most 2 % worse)")
        for name in ("ram_limit_mb", "vram_limit_mb"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise SettingsError(f"{name}={v} must be positive (or None for no limit)")
        if self.min_n_ctx < 0:
            raise SettingsError("min_n_ctx must be >= 0")


@dataclass
class Workload:
    """The request the score stands for, and the quality test's size."""

    n_prompt: int = 256            # prompt tokens (pp test; tg runs at this depth)
    n_gen: int = 32                # generated tokens (tg test)
    ppl_chunks: int = 4            # perplexity chunks for quality-changing candidates
    ppl_chunk_tokens: int = 256    # tokens per perplexity chunk (second half scored, as llama-perplexity)

    def __post_init__(self) -> None:
        for name in ("n_prompt", "n_gen", "ppl_chunks"):
            if getattr(self, name) < 1:
                raise SettingsError(f"workload {name} must be positive")
        if self.ppl_chunk_tokens < 16:
            raise SettingsError("ppl_chunk_tokens must be >= 16")

    def speed_tests(self) -> list[Test]:
        return [pp(self.n_prompt), tg(self.n_gen, depth=self.n_prompt)]

    def quality_test(self) -> Test:
        from kit.quality import ppl_test

        return ppl_test(n_ctx=self.ppl_chunk_tokens, n_chunks=self.ppl_chunks)


# ---- the guide's settings ------------------------------------------------------------------------------------
def quantized_model_candidates(out_root: str | os.PathLike = "outputs", quant: str = GUIDE_QUANT) -> list[Path]:
    """Q4_K_M files the quantization study left in outputs/cache/quantized/ (if it ran)."""
    d = Path(out_root) / "cache" / "quantized"
    if not d.is_dir():
        return []
    return sorted(p for p in d.glob("*.gguf") if quant.lower() in p.name.lower())


def guide_baseline(model: str = "smollm2-135m", out_root: str | os.PathLike = "outputs",
                   use_quantized: bool = True) -> tuple[Settings, list[str]]:
    """The guide's "good settings" on this build and model, and notes on what had to differ."""
    from kit.gpu import build_supports_gpu_offload
    from kit.models import model_card

    notes = []
    chosen = model
    if use_quantized and model == "smollm2-135m":
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


def llama_defaults(model: str = "smollm2-135m") -> Settings:
    """llama-cpp-python's own defaults (kit.config.Settings() is exactly Llama()'s defaults)."""
    return Settings(model=model)


def load_guide_profile(name: str, model: str = "smollm2-135m",
                       profiles_dir: str | os.PathLike = GUIDE_PROFILES_DIR) -> tuple[Settings, list[str]]:
    """One of the guide's `.env.speed|balanced|quality`, read as written, and what this build does with it."""
    from kit.gpu import build_supports_gpu_offload
    from kit.models import model_card

    if name not in GUIDE_PROFILE_NAMES:
        raise SettingsError(f"guide profile {name!r}: one of {', '.join(GUIDE_PROFILE_NAMES)}")
    from kit.config import read_dotenv

    env = read_dotenv(Path(profiles_dir) / f"{name}.env")
    notes = []
    base = Settings(model=model)
    n_batch = env.get("LLAMACPP_N_BATCH")
    if "LLAMACPP_N_UBATCH" not in env and n_batch and n_batch.strip().isdigit() and int(n_batch) < base.n_ubatch:
        # as written, llama.cpp clamps n_ubatch (default 512) to n_batch: do the same, and say so
        base = base.replace(n_ubatch=int(n_batch))
        notes.append(f"n_batch={n_batch} without n_ubatch: n_ubatch 512 -> {n_batch}, as llama.cpp clamps it")
    s = Settings.from_env(env, base=base)
    card = model_card(model)
    if s.n_gpu_layers and not build_supports_gpu_offload():
        notes.append(f"n_gpu_layers={s.n_gpu_layers} accepted and ignored: this build has no GPU offload")
    elif s.n_gpu_layers > card.n_layers:
        notes.append(f"n_gpu_layers={s.n_gpu_layers} > the model's {card.n_layers} layers: all layers offloaded")
    if card.n_ctx_train and s.n_ctx > card.n_ctx_train:
        notes.append(f"n_ctx={s.n_ctx} exceeds the model's n_ctx_train={card.n_ctx_train}")
    if "LLAMACPP_LOG_LEVEL" in env:
        notes.append("LLAMACPP_LOG_LEVEL is a server setting: accepted, no effect on llama.cpp")
    return s, notes


# ---- measurement functions (run inside a trial's child process) ----------------------------------------------
def _corpus_text() -> dict:
    from pydoc_data.topics import topics

    return topics


def _rag_questions(n: int) -> list[dict]:
    rows = [json.loads(line) for line in RAG_QUESTIONS.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("split") == "dev"][:n]


def rag_prompt(lm, question: dict, k: int, max_context_tokens: int, chunk_chars: int, n_ctx_room: int) -> tuple[str, dict]:
    """A RAG-shaped prompt: k chunks (gold topics first) cut to the context budget, then the question."""
    topics = _corpus_text()
    names = list(question.get("topics", [])) + [t for t in sorted(topics) if t not in question.get("topics", [])]
    chunks = []
    for name in names:
        body = topics[name]
        for i in range(0, len(body), chunk_chars):
            chunks.append(body[i:i + chunk_chars])
            if len(chunks) >= k:
                break
        if len(chunks) >= k:
            break
    context = "\n---\n".join(chunks)
    budget = min(max_context_tokens, n_ctx_room)
    toks = lm.llm.tokenize(context.encode("utf-8"), add_bos=False, special=False)
    cut = len(toks) > budget
    if cut:
        context = lm.llm.detokenize(toks[:max(budget, 0)]).decode("utf-8", "replace")
    prompt = (f"Answer the question using the context.\n\nContext:\n{context}\n\n"
              f"Question: {question['question']}\nAnswer briefly.")
    return prompt, {"context_tokens": min(len(toks), budget), "context_cut": cut,
                    "cut_by_n_ctx": cut and n_ctx_room < max_context_tokens}


def rag_request_test(lm, test: Test, repetitions: int) -> dict:
    """Streamed chat completions of RAG-shaped prompts sized by the configuration's rag_search_k and
    max_context_length: TTFT and generated tokens/s as a client sees them (retrieval not included)."""
    from kit.measure import stream_chat, summarize

    s = lm.settings
    p = test.params
    max_tokens = int(test.n_gen or 32)
    questions = _rag_questions(int(p.get("n_questions", 2)))
    room = lm.effective["n_ctx_effective"] - max_tokens - 96  # question, template and answer must fit
    prompts, info = [], []
    for q in questions:
        prompt, meta = rag_prompt(lm, q, s.rag_search_k, s.max_context_length, int(p.get("chunk_chars", 400)), room)
        prompts.append(prompt)
        info.append(meta)
    stream_chat(lm, prompts[0], max_tokens=2)  # warm-up
    reqs = [stream_chat(lm, pr, max_tokens=max_tokens) for _ in range(repetitions) for pr in prompts]
    ts = [r["n_gen_tokens"] / (r["e2e_ms"] / 1e3) for r in reqs if r["e2e_ms"] > 0]
    ttft = [r["ttft_ms"] for r in reqs if r["ttft_ms"] is not None]
    return {
        "n_prompt": round(statistics.fmean(r["n_prompt_tokens"] for r in reqs)),
        "n_gen": max_tokens, "n_depth": 0, "repetitions": repetitions, "n_requests": len(reqs),
        "samples_ts": [round(x, 4) for x in ts], **summarize(ts),
        "ttft_ms": round(statistics.median(ttft), 3) if ttft else None,
        "samples_ttft_ms": [round(x, 3) for x in ttft],
        "e2e_ms": round(statistics.median(r["e2e_ms"] for r in reqs), 3),
        "samples_e2e_ms": [round(r["e2e_ms"], 3) for r in reqs],
        "n_gen_tokens_mean": round(statistics.fmean(r["n_gen_tokens"] for r in reqs), 2),
        "rag_context_tokens": round(statistics.fmean(m["context_tokens"] for m in info)),
        "rag_context_cut_by_n_ctx": any(m["cut_by_n_ctx"] for m in info),
        "rag_search_k_used": s.rag_search_k, "max_context_length_used": s.max_context_length,
        "timed_region": "streamed create_chat_completion of a RAG-shaped prompt (k chunks within "
                        "max_context_length) to its last chunk; retrieval excluded; prompt cache reset per request",
    }


def rag_request(max_tokens: int = 32, n_questions: int = 2, chunk_chars: int = 400) -> Test:
    return Test("kit.studies.autotune:rag_request_test", n_gen=max_tokens,
                params={"n_questions": n_questions, "chunk_chars": chunk_chars})


# ---- rows -> numbers ------------------------------------------------------------------------------------------
def _keys(settings: Settings, tests: Sequence[Test], repetitions: int) -> list[str]:
    from kit.models import model_card
    from kit.sweep import trial_key

    sha = model_card(settings.model).sha256
    return [trial_key(sha, settings, t, repetitions) for t in tests]


def _rows_for(df, settings: Settings, tests: Sequence[Test], repetitions: int) -> list[dict]:
    keys = _keys(settings, tests, repetitions)
    if df is None or df.empty:
        return [{} for _ in keys]
    by = {r["trial_key"]: r for r in df.to_dict("records")}
    return [by.get(k, {"trial_key": k, "status": "missing"}) for k in keys]


def _samples(row: dict, col: str = "samples_ts") -> list[float]:
    v = row.get(col)
    if isinstance(v, list):
        return [float(x) for x in v if x is not None]
    return []


def request_time_samples(pp_row: dict, tg_row: dict, n_prompt: int, n_gen: int) -> list[float]:
    """Per-repetition request time n_prompt/pp + n_gen/tg (samples paired by repetition index)."""
    a, b = _samples(pp_row), _samples(tg_row)
    return [n_prompt / x + n_gen / y for x, y in zip(a, b) if x > 0 and y > 0]


def _num(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


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
    vram_added_mb: float | None = None
    ppl: float | None = None
    ppl_ratio: float | None = None
    samples_ppl: list = field(default_factory=list)
    trial_keys: list = field(default_factory=list)
    samples_request_s: list = field(default_factory=list)

    def label(self) -> str:
        return _describe(self.settings)

    def to_row(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "settings"}
        d.update({f"cfg_{k}": v for k, v in self.settings.to_dict().items()})
        d["label"] = self.label()
        return d


def _describe(s: Settings) -> str:
    t = s.n_threads if s.n_threads == s.n_threads_batch else f"{s.n_threads}/{s.n_threads_batch}"
    kv = s.type_k if s.type_k == s.type_v else f"{s.type_k}/{s.type_v}"
    return (f"ngl={s.n_gpu_layers} t={t} b={s.n_batch} ub={s.n_ubatch} fa={int(s.flash_attn)} "
            f"kv={kv} ctx={s.n_ctx}")


def _changes_quality(s: Settings, ref: Settings) -> bool:
    return any(getattr(s, f) != getattr(ref, f) for f in QUALITY_FIELDS)


# ---- the tuner ---------------------------------------------------------------------------------------------------
@dataclass
class TuneResult:
    best: Settings
    start: Settings
    defaults: Settings
    start_notes: list
    gpu_layers: dict
    screened: list                      # Candidate
    confirmed: list                     # Candidate
    refusals: list                      # dicts: what, why, the numbers
    steps: list                         # dicts: axis, chosen, why
    reference_ppl: float | None
    constraints: Constraints
    workload: Workload
    repetitions: int
    screen_repetitions: int
    study_dir: str

    def table(self, which: str = "confirmed"):
        import pandas as pd

        return pd.DataFrame([c.to_row() for c in getattr(self, which)])

    def refusal_table(self):
        import pandas as pd

        return pd.DataFrame(self.refusals)

    def confirmed_for(self, settings: Settings) -> Candidate | None:
        for c in self.confirmed:
            if c.settings == settings:
                return c
        return None

    def to_dict(self) -> dict:
        return {
            "best": self.best.to_dict(), "start": self.start.to_dict(), "defaults": self.defaults.to_dict(),
            "start_notes": self.start_notes, "gpu_layers": self.gpu_layers,
            "screened": [c.to_row() for c in self.screened], "confirmed": [c.to_row() for c in self.confirmed],
            "refusals": self.refusals, "steps": self.steps, "reference_ppl": self.reference_ppl,
            "constraints": asdict(self.constraints), "workload": asdict(self.workload),
            "repetitions": self.repetitions, "screen_repetitions": self.screen_repetitions,
        }

    def save(self, path: str | os.PathLike | None = None) -> Path:
        p = Path(path) if path else Path(self.study_dir) / "autotune.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_dict(), indent=2, default=str))
        return p


class _Tuner:
    def __init__(self, study: str, out_root: str, constraints: Constraints, workload: Workload,
                 screen_reps: int, reps: int, min_gain: float, progress: bool):
        self.study, self.out_root = study, out_root
        self.c, self.w = constraints, workload
        self.screen_reps, self.reps = screen_reps, reps
        self.min_gain = min_gain
        self.progress = progress
        self.reference: Candidate | None = None
        self.screened: list[Candidate] = []
        self.refusals: list[dict] = []
        self.steps: list[dict] = []

    def measure(self, configs: list[Settings], stage: str, axis: str, changes: list[dict], reps: int,
                extra_tests: Sequence[Test] = (), quality_ref: Settings | None = None) -> list[Candidate]:
        from kit.sweep import run_sweep

        speed = self.w.speed_tests()
        out = []
        plain = [s for s in configs if quality_ref is None or not _changes_quality(s, quality_ref)]
        qual = [s for s in configs if s not in plain]
        tests_plain = speed + list(extra_tests)
        tests_qual = tests_plain + [self.w.quality_test()]
        df = None
        for group, tests in ((plain, tests_plain), (qual, tests_qual)):
            if group:
                df = run_sweep(self.study, group, tests, repetitions=reps, out_root=self.out_root,
                               progress=self.progress, extra={"autotune_stage": stage, "autotune_axis": axis})
        for s, ch in zip(configs, changes):
            tests = tests_qual if s in qual else tests_plain
            rows = _rows_for(df, s, tests, reps)
            out.append(self._candidate(s, stage, axis, ch, rows, tests))
        return out

    def _candidate(self, s: Settings, stage: str, axis: str, change: dict, rows: list[dict], tests) -> Candidate:
        c = Candidate(settings=s, stage=stage, axis=axis, change=change,
                      trial_keys=[r.get("trial_key") for r in rows])
        bad = [r for r in rows if r.get("status") != "ok"]
        n_speed = 2
        speed_rows = rows[:n_speed]
        mem_rows = [r for r in rows if r.get("test_kind") != QUALITY_KIND]
        rss = [_num(r.get("rss_peak_mb")) for r in mem_rows]
        rss = [x for x in rss if x is not None]
        c.rss_peak_mb = max(rss) if rss else None
        vram = [(_num(r.get("vram_peak_mb")), _num(r.get("vram_baseline_mb"))) for r in mem_rows]
        vram = [a - (b or 0) for a, b in vram if a is not None]
        c.vram_added_mb = round(max(vram), 1) if vram else None
        if bad:
            c.status = bad[0].get("status", "error")
            c.error = str(bad[0].get("error") or "")[:300]
        if all(r.get("status") == "ok" for r in speed_rows):
            c.samples_request_s = request_time_samples(speed_rows[0], speed_rows[1], self.w.n_prompt, self.w.n_gen)
            if c.samples_request_s:
                c.score_s = statistics.median(c.samples_request_s)
            c.pp_ts = _num(speed_rows[0].get("median_ts"))
            c.tg_ts = _num(speed_rows[1].get("median_ts"))
        q = [r for r in rows if r.get("test_kind") == QUALITY_KIND and r.get("status") == "ok"]
        if q:
            c.ppl = _num(q[0].get("ppl"))
            c.samples_ppl = [round(math.exp(x), 5) for x in _samples(q[0], "chunk_nll")]
        return c

    # -- decisions --
    def violation(self, c: Candidate) -> tuple[str, str] | None:
        """(kind, words) when a candidate breaks a constraint, else None."""
        if c.status != "ok" or c.score_s is None:
            return "failed", f"trial {c.status}: {c.error}"
        if self.c.min_n_ctx and c.settings.n_ctx and c.settings.n_ctx < self.c.min_n_ctx:
            return "context", f"n_ctx={c.settings.n_ctx} < the {self.c.min_n_ctx} tokens the workload needs"
        if self.c.ram_limit_mb is not None and c.rss_peak_mb is not None and c.rss_peak_mb > self.c.ram_limit_mb:
            return "memory", f"peak RSS {c.rss_peak_mb:.0f} MB > RAM limit {self.c.ram_limit_mb:.0f} MB"
        if self.c.vram_limit_mb is not None and c.vram_added_mb is not None and c.vram_added_mb > self.c.vram_limit_mb:
            return "memory", f"VRAM {c.vram_added_mb:.0f} MB > limit {self.c.vram_limit_mb:.0f} MB"
        if self.reference is not None and _changes_quality(c.settings, self.reference.settings):
            if c.ppl is None:
                return "quality", "quality changes with this setting and its perplexity was not measured"
            if self.reference.ppl:
                c.ppl_ratio = round(c.ppl / self.reference.ppl, 5)
            if self.c.max_ppl_ratio is not None and c.ppl_ratio is not None and c.ppl_ratio > self.c.max_ppl_ratio:
                return "quality", (f"perplexity {c.ppl:.4g} is {100 * (c.ppl_ratio - 1):.2f} % above the reference "
                                   f"{self.reference.ppl:.4g} (floor: at most {100 * (self.c.max_ppl_ratio - 1):.2f} %)")
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

    def step(self, current: Candidate, axis: str, configs: list[Settings], changes: list[dict]) -> Candidate:
        todo = [(s, ch) for s, ch in zip(configs, changes) if s != current.settings]
        if not todo:
            return current
        cands = self.measure([s for s, _ in todo], "screen", axis, [ch for _, ch in todo], self.screen_reps,
                             quality_ref=self.reference.settings)
        self.screened.extend(cands)
        best = current
        for c in cands:
            v = self.violation(c)
            if v:
                self.refuse(c, current, *v)
                continue
            if c.score_s < best.score_s * (1 - self.min_gain):
                best = c
        self.steps.append({"axis": axis, "from": current.label(), "to": best.label(),
                           "changed": best is not current,
                           "score_s": best.score_s, "tried": [c.change for c in cands]})
        return best


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


def optimal_gpu_layers(settings: Settings, vram_limit_mb: float | None = None) -> dict:
    """gpu_layers.find_optimal_gpu_layers (child-process probes over kit.gpu's bisection) from `settings`;
    "not testable here: this build has no GPU offload" on a CPU-only build, with n_gpu_layers 0."""
    from kit.studies.gpu_layers import find_optimal_gpu_layers

    base = settings.replace(n_gpu_layers=0)
    return find_optimal_gpu_layers(settings.model, vram_limit_mb=vram_limit_mb, base=base)


def benchmark_settings(model: str = "smollm2-135m", *, study: str = "85_autotune",
                       out_root: str | os.PathLike = "outputs", space: SearchSpace | None = None,
                       constraints: Constraints | None = None, workload: Workload | None = None,
                       screen_repetitions: int = 1, repetitions: int = 5, confirm_top: int = 2,
                       min_gain: float = 0.03, start: Settings | None = None,
                       confirm_tests: Sequence[Test] = (), progress: bool = True) -> TuneResult:
    """Search for the fastest settings under a memory limit and a quality floor (see the module docstring)."""
    space = space or SearchSpace()
    cons = constraints or Constraints()
    w = workload or Workload()
    if screen_repetitions < 1 or repetitions < 1 or confirm_top < 0:
        raise SettingsError("screen_repetitions and repetitions must be >= 1, confirm_top >= 0")
    if min_gain < 0:
        raise SettingsError("min_gain must be >= 0")
    notes: list[str] = []
    if start is None:
        start, notes = guide_baseline(model, out_root)
    need = w.n_prompt + w.n_gen
    if start.n_ctx and start.n_ctx < max(need, w.ppl_chunk_tokens):
        raise SettingsError(f"start n_ctx={start.n_ctx} cannot hold the workload ({need} tokens)")
    cons_eff = Constraints(**{**asdict(cons), "min_n_ctx": max(cons.min_n_ctx, need)})
    t = _Tuner(study, str(out_root), cons_eff, w, screen_repetitions, repetitions, min_gain, progress)

    gpu = optimal_gpu_layers(start, cons.vram_limit_mb) if space.gpu_layers else \
        {"best_n_gpu_layers": start.n_gpu_layers, "reason": "not searched", "testable": False, "probes": []}
    # the search starts from the guide's settings with the GPU layers found; the guide's own settings stay the
    # baseline every comparison is made against
    origin = start
    if gpu.get("testable") and gpu.get("best_n_gpu_layers") is not None:
        origin = start.replace(n_gpu_layers=gpu["best_n_gpu_layers"])
    elif gpu.get("reason", "").startswith("not testable"):
        start = origin = start.replace(n_gpu_layers=0)

    # the search's start point, with the quality reference measured on it (quality test forced on)
    ref = t.measure([origin], "reference", "start", [{}], screen_repetitions,
                    extra_tests=[w.quality_test()])[0]
    if ref.status != "ok" or ref.score_s is None:
        raise RuntimeError(f"the start configuration failed: {ref.status} {ref.error}")
    t.reference = ref
    cur = ref
    for axis in AXES_ORDER:
        values = getattr(space, axis)
        if not values:
            continue
        configs, changes = _axis_configs(axis, cur.settings, values)
        cur = t.step(cur, axis, configs, changes)

    # confirm: the best few feasible screened, the start point and llama.cpp's defaults, full repetitions
    feasible = [c for c in [ref] + t.screened if c.score_s is not None and t.violation(c) is None]
    feasible.sort(key=lambda c: c.score_s)
    top: list[Settings] = []
    for c in [cur] + feasible:
        if c.settings not in top and len(top) < max(confirm_top, 1):
            top.append(c.settings)
    defaults = llama_defaults(start.model)
    if defaults.n_ctx < need:
        defaults = defaults.replace(n_ctx=start.n_ctx)
    pool: list[Settings] = []
    for s in top + [start, defaults]:
        if s not in pool:
            pool.append(s)
    conf = t.measure(pool, "confirm", "confirm", [{} for _ in pool], repetitions, extra_tests=confirm_tests,
                     quality_ref=None)
    by_settings = {_key_of(c.settings): c for c in [ref] + t.screened}
    for c in conf:  # quality is deterministic: carry the screening's perplexity over
        prev = by_settings.get(_key_of(c.settings))
        if prev is not None and prev.ppl is not None:
            c.ppl, c.ppl_ratio, c.samples_ppl = prev.ppl, prev.ppl_ratio, prev.samples_ppl
    ok = [c for c in conf if c.settings in top and t.violation(c) is None]
    for c in conf:
        v = t.violation(c)
        if v and c.settings in top:
            t.refuse(c, conf[pool.index(start)], *v)
    best = min(ok, key=lambda c: c.score_s).settings if ok else start
    return TuneResult(best=best, start=start, defaults=defaults, start_notes=notes, gpu_layers=gpu,
                      screened=[ref] + t.screened, confirmed=conf, refusals=t.refusals, steps=t.steps,
                      reference_ppl=ref.ppl, constraints=cons_eff, workload=w, repetitions=repetitions,
                      screen_repetitions=screen_repetitions, study_dir=str(Path(out_root) / study))


def _key_of(s: Settings) -> str:
    return json.dumps(s.to_dict(), sort_keys=True, default=str)


# ---- profiles ---------------------------------------------------------------------------------------------------
def measure_profiles(profiles: dict[str, Settings], *, study: str = "85_autotune",
                     out_root: str | os.PathLike = "outputs", repetitions: int = 3, workload: Workload | None = None,
                     request: Test | None = None, progress: bool = True) -> dict[str, dict]:
    """Measure named configurations (e.g. the guide's three profiles) as written: engine pp/tg at the workload
    and RAG-shaped requests sized by each profile's own RAG settings. Returns name -> rows by test.

    Engine pp/tg decode random tokens without sampling, so profiles that differ only in request, RAG or service
    settings (say, temperature) share one engine measurement: the first such profile's rows (`engine_from`). Where
    the study already holds successful engine rows for the same model and load settings with at least
    `repetitions` runs (the tuner's confirm stage), those are used instead of measuring again.
    """
    from kit.sweep import run_sweep

    w = workload or Workload()
    speed = w.speed_tests()
    req = request or rag_request()
    engine_from: dict[str, str] = {}
    first: dict[str, str] = {}
    for name, s in profiles.items():
        engine_from[name] = first.setdefault(_engine_key(s), name)
    leaders = list(dict.fromkeys(engine_from.values()))
    earlier = {n: _measured_engine_rows(study, out_root, profiles[n], speed, repetitions) for n in leaders}
    todo = [profiles[n] for n in leaders if earlier[n] is None]
    if todo:
        run_sweep(study, todo, speed, repetitions=repetitions, out_root=out_root, progress=progress,
                  extra={"autotune_stage": "profile"})
    unique = list({_key_of(s): s for s in profiles.values()}.values())
    df = run_sweep(study, unique, [req], repetitions=repetitions, out_root=out_root, progress=progress,
                   extra={"autotune_stage": "profile"})
    out = {}
    for name, s in profiles.items():
        lead = engine_from[name]
        pp_row, tg_row = earlier[lead] or _rows_for(df, profiles[lead], speed, repetitions)
        (req_row,) = _rows_for(df, s, [req], repetitions)
        out[name] = {"settings": s, "pp": pp_row, "tg": tg_row, "request": req_row, "engine_from": lead,
                     "engine_stage": pp_row.get("autotune_stage"),
                     "samples_request_s": request_time_samples(pp_row, tg_row, w.n_prompt, w.n_gen)
                     if pp_row.get("status") == "ok" and tg_row.get("status") == "ok" else []}
    return out


def _measured_engine_rows(study: str, out_root: str | os.PathLike, s: Settings, tests: Sequence[Test],
                          min_repetitions: int) -> list[dict] | None:
    """The study's latest successful rows of these engine tests under the same model and load settings, run with
    at least min_repetitions; None unless every test has one."""
    from kit.models import model_card
    from kit.results import RESULTS_FILE, read_rows
    from kit.sweep import study_dir

    rows = read_rows(study_dir(study, out_root) / RESULTS_FILE)
    if not rows:
        return None
    sha = model_card(s.model).sha256
    want = {k: v for k, v in _engine_settings(s).items() if k != "model"}
    found = []
    for t in tests:
        hits = [r for r in rows if r.get("status") == "ok" and r.get("model_sha256") == sha
                and r.get("test_kind") == t.kind and (r.get("n_prompt"), r.get("n_gen"), r.get("n_depth"))
                == (t.n_prompt, t.n_gen, t.n_depth) and (r.get("repetitions") or 0) >= min_repetitions
                and all(r.get(k) == v for k, v in want.items())]
        if not hits:
            return None
        found.append(max(hits, key=lambda r: (r.get("repetitions") or 0, r.get("test_time") or "")))
    return found


def _engine_settings(s: Settings) -> dict:
    """What the engine tests depend on: the model and load settings, not request, RAG or service settings."""
    d = s.to_dict()
    return {k: d[k] for k in Settings.group("model") + Settings.group("load")}


def _engine_key(s: Settings) -> str:
    return json.dumps(_engine_settings(s), sort_keys=True, default=str)


def profile_header(name: str, measured: dict, source: str, extra: Sequence[str] = ()) -> str:
    """The comment block on top of a written profile: what was measured, and from which trials."""
    req, tgr = measured.get("request", {}), measured.get("tg", {})
    lines = [f"kit profile '{name}' - chosen from measurements on this machine ({source})",
             f"measured: generation {_fmt(_num(req.get('median_ts')))} tokens/s (streamed, RAG-shaped request), "
             f"engine tg {_fmt(_num(tgr.get('median_ts')))} t/s, TTFT {_fmt(_num(req.get('ttft_ms')))} ms",
             f"memory: peak RSS {_fmt(_num(req.get('rss_peak_mb')))} MB"
             + (f", VRAM {_fmt(_num(req.get('vram_peak_mb')))} MB" if req.get('vram_peak_mb') is not None else ""),
             f"quality: perplexity {_fmt(measured.get('ppl'))} "
             f"(ratio to the f16-KV reference {_fmt(measured.get('ppl_ratio'))})",
             "trials (trial_key): " + ", ".join(k for k in measured.get("trial_keys", []) if k)]
    src, stage = measured.get("engine_from"), measured.get("engine_stage")
    if src and src not in (name, f"kit_{name}"):
        lines.append(f"engine pp/tg: the rows of profile '{src}', which has the same model and load settings "
                     "(the engine tests do not sample)")
    if stage and stage != "profile":
        lines.append(f"engine pp/tg: measured in the tuner's '{stage}' stage with the same model and load settings")
    lines += list(extra)
    return "\n".join(lines)


def _fmt(x) -> str:
    if x is None:
        return "n/a"
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def write_profile(path: str | os.PathLike, settings: Settings, header: str) -> Path:
    """A `.env` file in the guide's LLAMACPP_* names; reads back with Settings.from_dotenv."""
    return settings.to_dotenv(path, header=header)


def _rag_part(out_root: str | os.PathLike, part: str):
    """One part of the RAG study's files (outputs/60_rag/<part>.jsonl) as a DataFrame; empty when absent."""
    import pandas as pd

    from kit.results import read_rows

    return pd.DataFrame(read_rows(Path(out_root) / "60_rag" / f"{part}.jsonl"))


def rag_floor_from_study(out_root: str | os.PathLike = "outputs", min_recall: float = 0.9) -> dict | None:
    """The smallest rag_search_k whose mean recall@k (dev questions) meets the floor, from outputs/60_rag.

    Reads the RAG study's retrieval.jsonl (columns k, split, recall_at_k). None where the study has not run.
    """
    df = _rag_part(out_root, "retrieval")
    if df.empty or not {"k", "recall_at_k"} <= set(df.columns):
        return None
    if "split" in df:
        df = df[df["split"] == "dev"]
    g = df.dropna(subset=["recall_at_k"]).groupby("k")["recall_at_k"].mean()
    if g.empty:
        return None
    ok = g[g >= min_recall]
    col = "recall@k (dev, outputs/60_rag/retrieval.jsonl)"
    if ok.empty:
        return {"rag_search_k": int(g.idxmax()), "recall": float(g.max()), "column": col, "met": False,
                "min_recall": min_recall}
    k = int(ok.index.min())
    return {"rag_search_k": k, "recall": float(ok.loc[k]), "column": col, "met": True, "min_recall": min_recall}


def rag_search_samples(out_root: str | os.PathLike = "outputs") -> dict[int, list[float]] | None:
    """Retrieval time samples (ms: embed the question + search) per k from the RAG study's latency.jsonl."""
    df = _rag_part(out_root, "latency")
    if df.empty or not {"k", "search_ms"} <= set(df.columns):
        return None
    out = {int(k): [float(x) for x in g["search_ms"].dropna()] for k, g in df.groupby("k")}
    return {k: v for k, v in out.items() if v} or None


# ---- choosing and describing the kit's own profiles ---------------------------------------------------------------
def _pow2_at_least(n: int) -> int:
    p = 512
    while p < n:
        p *= 2
    return p


def choose_kit_profiles(result: TuneResult, guide: dict[str, Settings], rag_floor: dict | None = None,
                        balanced_ppl_ratio: float = 1.01, answer_tokens: int = 512) -> tuple[dict[str, Settings], dict]:
    """The kit's speed / balanced / quality from the tuner's confirmed candidates.

    speed: the tuned best (fastest confirmed under the memory limit and the quality floor);
    balanced: the fastest confirmed with perplexity within ``balanced_ppl_ratio`` of the reference;
    quality: the fastest confirmed that leaves the numbers untouched (f16 KV, the reference model).
    Request settings (temperature, RAG k and budget) come from the guide's profile of the same name, except
    rag_search_k, which the RAG study's recall floor sets where outputs/60_rag exists. n_ctx is raised where the
    RAG budget plus an answer would not fit. Returns (profiles, why) with a reason per profile.
    """
    from kit.models import model_card

    ref = result.screened[0].settings if result.screened else result.start
    ok = [c for c in result.confirmed if c.score_s is not None and c.status == "ok"]
    feasible = [c for c in ok if c.settings in _top_settings(result)] or ok
    limit = result.constraints.ram_limit_mb
    if limit is not None:
        feasible = [c for c in feasible if c.rss_peak_mb is None or c.rss_peak_mb <= limit] or feasible
    fastest = min(feasible, key=lambda c: c.score_s) if feasible else None
    speed = result.best

    def pick(max_ratio: float | None) -> Settings:
        pool = [c for c in feasible if not _changes_quality(c.settings, ref)
                or (max_ratio is not None and c.ppl_ratio is not None and c.ppl_ratio <= max_ratio)]
        return min(pool, key=lambda c: c.score_s).settings if pool else result.start

    engine = {"speed": speed, "balanced": pick(balanced_ppl_ratio), "quality": pick(None)}
    n_ctx_train = model_card(speed.model).n_ctx_train or 0
    out, why = {}, {}
    for name, eng in engine.items():
        g = guide[name]
        req = {k: getattr(g, k) for k in ("temperature", "top_p", "top_k", "repeat_penalty", "max_tokens",
                                          "rag_search_k", "max_context_length", "enable_embedding_cache",
                                          "concurrent_rag_queries", "log_level")}
        notes = [f"engine settings: {_describe(eng)}"
                 + (" (the tuned best)" if eng == speed else "")
                 + (" - fastest confirmed" if fastest is not None and eng == fastest.settings else "")]
        if rag_floor:
            k = rag_floor["rag_search_k"] if name != "quality" else max(rag_floor["rag_search_k"], g.rag_search_k)
            req["rag_search_k"] = k
            notes.append(f"rag_search_k={k}: the smallest k with {rag_floor['column']} >= {rag_floor['min_recall']} "
                         f"in outputs/60_rag ({rag_floor['recall']:.3f})" if rag_floor.get("met") else
                         f"rag_search_k={k}: no k met the recall floor; the best recall")
        else:
            notes.append("rag_search_k / max_context_length / temperature: the guide's values for this profile "
                         "(no RAG study results to set a recall floor)")
        s = eng.replace(**req)
        need = _pow2_at_least(s.max_context_length + answer_tokens)
        if n_ctx_train:
            need = min(need, n_ctx_train)
        if s.n_ctx and s.n_ctx < need:
            notes.append(f"n_ctx {s.n_ctx} -> {need}: max_context_length {s.max_context_length} + an answer must fit")
            s = s.replace(n_ctx=need)
        if s.n_batch > s.n_ctx:
            s = s.replace(n_batch=s.n_ctx, n_ubatch=min(s.n_ubatch, s.n_ctx))
        out[name] = s
        why[name] = notes
    return out, why


def _top_settings(result: TuneResult) -> list[Settings]:
    return [c.settings for c in result.confirmed if c.settings not in (result.start, result.defaults)] + [result.start]


def write_kit_profiles(profiles: dict[str, Settings], measured: dict[str, dict], result: TuneResult,
                       why: dict[str, list], out_dir: str | os.PathLike = "outputs/profiles") -> dict[str, Path]:
    """outputs/profiles/{speed,balanced,quality}.env, each with its measured numbers and trial keys on top."""
    by = {_key_of(c.settings): c for c in result.screened + result.confirmed}
    ref = result.screened[0].settings if result.screened else result.start
    paths = {}
    for name, s in profiles.items():
        m = dict(measured.get(name, {}))
        cand = next((c for c in by.values() if _same_engine(c.settings, s) and c.ppl is not None), None)
        m["ppl"] = cand.ppl if cand and cand.ppl is not None else result.reference_ppl
        m["ppl_ratio"] = cand.ppl_ratio if cand and cand.ppl_ratio is not None else (
            1.0 if not _changes_quality(s, ref) else None)
        m["trial_keys"] = [m.get(t, {}).get("trial_key") for t in ("pp", "tg", "request")]
        header = profile_header(name, m, "kit.autotune", why.get(name, []))
        paths[name] = write_profile(Path(out_dir) / f"{name}.env", s, header)
    return paths


def _same_engine(a: Settings, b: Settings) -> bool:
    keys = ("model", "n_gpu_layers", "type_k", "type_v", "rope_freq_base")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


# ---- verdicts for X1 .. X4 ---------------------------------------------------------------------------------------
MIN_SAMPLES = 3  # fewer samples on either side give no interval worth a verdict


def _too_few(claim: str, what: str, a: Sequence, b: Sequence, evidence: Sequence[str]):
    from kit.verdicts import too_few

    return too_few(claim, len(a), len(b), f"the repetitions ({what})", evidence, MIN_SAMPLES)


def _req_samples(m: dict, col: str) -> list[float]:
    return _samples(m.get("request", {}), col)


def x1_verdict(guide_measured: dict[str, dict], notes: dict[str, list] | None = None, evidence: Sequence[str] = ()):
    """X1: the guide's speed profile is faster than its quality profile (RAG-shaped request, e2e time)."""
    from kit.verdicts import compare, not_testable

    a, b = _req_samples(guide_measured.get("speed", {}), "samples_e2e_ms"), \
        _req_samples(guide_measured.get("quality", {}), "samples_e2e_ms")
    if not a or not b:
        return not_testable("X1", "the guide's speed or quality profile produced no request samples "
                            "(see the profile rows' status and error)", evidence=evidence)
    few = _too_few("X1", "request e2e time, guide speed vs quality profile", a, b, evidence)
    if few:
        return few
    v = compare("X1", a, b, higher_is_better=False, claimed="better", evidence=evidence,
                metric="request e2e time ratio, guide .env.speed / .env.quality (RAG-shaped prompt)")
    med = {n: {"ttft_ms": _num(m.get("request", {}).get("ttft_ms")),
               "tokens_per_s": _num(m.get("request", {}).get("median_ts")),
               "e2e_ms": _num(m.get("request", {}).get("e2e_ms")),
               "prompt_tokens": _num(m.get("request", {}).get("n_prompt"))} for n, m in guide_measured.items()}
    v.details = {"profiles": med, "notes": notes or {}}
    return v


def x2_verdict(baseline: dict, tuned: dict, rag_samples: dict[int, list[float]] | None = None,
               baseline_k: int = 8, tuned_k: int | None = None, evidence: Sequence[str] = ()):
    """X2: baseline vs tuned on this machine (t/s, TTFT, RAG search), beside the guide's +50-75 % / -50 % / -50 %."""
    from kit.verdicts import REFUTED, SUPPORTED, compare, not_testable

    metrics = {}
    pairs = {"tokens_per_s": ("samples_ts", True), "ttft": ("samples_ttft_ms", False)}
    for name, (col, hib) in pairs.items():
        c, b = _req_samples(tuned, col), _req_samples(baseline, col)
        if c and b:
            metrics[name] = compare("X2", c, b, higher_is_better=hib, claimed="better", metric=name)
    if rag_samples and tuned_k in rag_samples and baseline_k in rag_samples and tuned_k != baseline_k:
        metrics["rag_search"] = compare("X2", rag_samples[tuned_k], rag_samples[baseline_k], higher_is_better=False,
                                        claimed="better", metric="rag_search")
    few = _too_few("X2", "generated tokens/s, tuned vs baseline", _req_samples(tuned, "samples_ts"),
                   _req_samples(baseline, "samples_ts"), evidence)
    if few:
        return few
    if "tokens_per_s" not in metrics:
        return not_testable("X2", "no request samples for the baseline or the tuned configuration", evidence=evidence)
    table = {}
    for name, v in metrics.items():
        cl = GUIDE_CLAIMED_RATIOS[name]
        table[name] = {"effect": v.effect, "ci_low": v.ci_low, "ci_high": v.ci_high, "verdict": v.verdict,
                       "claimed": cl["text"], "claimed_ratio_low": cl["low"], "claimed_ratio_high": cl["high"]}
    if "rag_search" not in table:
        table["rag_search"] = {"verdict": "not run", "claimed": GUIDE_CLAIMED_RATIOS["rag_search"]["text"],
                               "reason": "outputs/60_rag has no retrieval-time samples for both k values"
                               if rag_samples is None or tuned_k != baseline_k else
                               "the tuned profile keeps the baseline's rag_search_k"}
    head = metrics["tokens_per_s"]
    verdict = head.verdict
    words = (f"tuned / baseline tokens/s {head.effect:.3g} (95 % CI {head.ci_low:.3g}-{head.ci_high:.3g}); "
             f"the guide claims 1.50-1.75")
    if verdict == SUPPORTED and head.ci_high < 1.5:
        verdict = REFUTED
        words += ": faster, but by less than the claimed +50 %"
    elif verdict == SUPPORTED and head.ci_low < 1.5:
        words += ": faster; the interval does not settle whether by +50 %"
    for name in ("ttft", "rag_search"):
        t = table[name]
        if t.get("effect") is not None:
            words += f"; {name} ratio {t['effect']:.3g} [{t['ci_low']:.3g}, {t['ci_high']:.3g}] (claimed 0.5)"
    head.verdict = verdict
    head.summary = words
    head.metric = "generated tokens/s ratio, tuned / baseline (RAG-shaped streamed request)"
    head.evidence = list(evidence)
    head.details = {"ratios": table}
    return head


def x3_verdict(result: TuneResult, evidence: Sequence[str] = ()):
    """X3: benchmark_settings finds settings faster than the guide's good settings (request time)."""
    from kit.verdicts import compare, not_testable

    best, start = result.confirmed_for(result.best), result.confirmed_for(result.start)
    gpu = result.gpu_layers.get("reason", "")
    if best is None or start is None or not best.samples_request_s or not start.samples_request_s:
        return not_testable("X3", "the confirmation trials of the start or the tuned configuration failed",
                            evidence=evidence)
    few = _too_few("X3", "request time, tuned vs start", best.samples_request_s, start.samples_request_s, evidence)
    if few:
        few.details = {"find_optimal_gpu_layers": gpu, "steps": result.steps}
        return few
    if best.settings == start.settings:
        v = compare("X3", best.samples_request_s, start.samples_request_s, higher_is_better=False,
                    claimed="better", evidence=evidence,
                    metric="request time ratio, tuned / guide's good settings")
        v.summary = ("the tuner kept the guide's good settings: nothing it screened beat them by more than "
                     f"the {100 * 0.03:.0f} % step; " + v.summary)
    else:
        v = compare("X3", best.samples_request_s, start.samples_request_s, higher_is_better=False,
                    claimed="better", evidence=evidence,
                    metric="request time ratio (n_prompt/pp + n_gen/tg), tuned / guide's good settings")
    dflt = result.confirmed_for(result.defaults)
    vs_defaults = None
    if dflt is not None and len(dflt.samples_request_s) >= MIN_SAMPLES:
        d = compare("X3", best.samples_request_s, dflt.samples_request_s, higher_is_better=False)
        vs_defaults = {"effect": d.effect, "ci_low": d.ci_low, "ci_high": d.ci_high, "verdict": d.verdict,
                       "metric": "request time ratio, tuned / llama-cpp-python defaults"}
    v.details = {"tuned": _describe(result.best), "start": _describe(result.start),
                 "llama_defaults": _describe(result.defaults), "vs_llama_defaults": vs_defaults,
                 "find_optimal_gpu_layers": gpu, "steps": result.steps,
                 "n_screened": len(result.screened), "n_confirmed": len(result.confirmed)}
    if gpu.startswith("not testable"):
        v.reason = (v.reason + "; " if v.reason else "") + f"find_optimal_gpu_layers: {gpu}"
    return v


def x4_verdict(result: TuneResult, evidence: Sequence[str] = ()):
    """X4: "aggressive settings may cost quality" - the fastest quality-changing candidate's per-chunk perplexity
    against the reference (paired ratios), and the tuner's refusals as the record of what it turned down."""
    from kit.verdicts import compare, not_testable

    ref = result.screened[0] if result.screened else None
    qc = [c for c in result.screened[1:] if c.samples_ppl and ref is not None and ref.samples_ppl
          and _changes_quality(c.settings, ref.settings)]
    refused = [r for r in result.refusals if r["reason"] in ("quality", "memory")]
    details = {"refusals": refused, "n_refused_faster": sum(1 for r in refused if r["faster"]),
               "max_ppl_ratio": result.constraints.max_ppl_ratio, "ram_limit_mb": result.constraints.ram_limit_mb}
    if not qc:
        v = not_testable("X4", "no quality-changing setting (quantized KV cache, other model file) was screened",
                         evidence=evidence)
        v.details = details
        return v
    # the most aggressive: the fastest of them
    c = min(qc, key=lambda x: x.score_s if x.score_s is not None else float("inf"))
    ratios = [a / b for a, b in zip(c.samples_ppl, ref.samples_ppl) if b]
    few = _too_few("X4", "perplexity chunks", ratios, ratios, evidence)
    if few:
        few.details = details
        return few
    v = compare("X4", ratios, [1.0] * len(ratios), higher_is_better=False, claimed="worse", evidence=evidence,
                metric=f"perplexity ratio per chunk (paired), {c.label()} / reference")
    faster = [r for r in refused if r["faster"]]
    words = (f"{c.change}: perplexity {100 * (v.effect - 1):+.2f} % (95 % CI {v.ci_low:.4f}-{v.ci_high:.4f}, "
             f"{len(ratios)} paired chunks). The tuner refused {len(faster)} faster setting(s) for quality or memory")
    if faster:
        words += ": " + "; ".join(f"{r['change']} ({r['reason']}: {r['detail']})" for r in faster[:3])
    v.summary = words
    v.details = details
    return v


def profile_table(measured: dict[str, dict]):
    """One row per measured profile: the settings that differ between profiles and what they gave."""
    import pandas as pd

    rows = []
    for name, m in measured.items():
        s, req, tgr = m["settings"], m.get("request", {}), m.get("tg", {})
        rows.append({"profile": name, "status": req.get("status"), "n_ctx": s.n_ctx, "n_batch": s.n_batch,
                     "n_ubatch": s.n_ubatch, "threads": s.n_threads, "flash_attn": s.flash_attn,
                     "kv": s.type_k, "temperature": s.temperature, "rag_search_k": s.rag_search_k,
                     "max_context_length": s.max_context_length, "prompt_tokens": req.get("n_prompt"),
                     "ttft_ms": _num(req.get("ttft_ms")), "gen_tokens_per_s": _num(req.get("median_ts")),
                     "e2e_ms": _num(req.get("e2e_ms")), "engine_tg_ts": _num(tgr.get("median_ts")),
                     "request_s_model": round(statistics.median(m["samples_request_s"]), 4)
                     if m.get("samples_request_s") else None,
                     "rss_peak_mb": _num(req.get("rss_peak_mb")), "engine_from": m.get("engine_from", name),
                     "error": req.get("error")})
    return pd.DataFrame(rows)
