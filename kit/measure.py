"""Measure one configuration: engine speed as llama-bench measures it, and end-to-end speed as a server sees it.

Timed regions (stated in every row's `timed_region`):
- pp / tg / pg (engine): from before the first llama_decode to after llama_synchronize of the last one;
  random tokens, prompt processing in batches of n_batch, generation as single-token decodes; no
  tokenization, no sampling (llama-bench's `test_prompt` / `test_gen`). KV cache cleared before each
  repetition; with n_depth, the depth is filled once per test (untimed) and the KV cache is rolled back to it
  before the warm-up and every repetition, as llama-bench restores its cached depth state. A trial's test that
  finds the cache already holding its depth (tg32 @ d256 after pp256) keeps those tokens instead of refilling.
- e2e (server view): from the call of a streamed chat completion to its last chunk; prompt cache reset
  before each request, so every request pays prompt processing as a fresh request would.
The model is loaded once per configuration; a warm-up run precedes the timed repetitions.
"""
from __future__ import annotations

import importlib
import json
import math
import random
import resource
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from kit.config import ChatFormatError, Settings, SettingsError
import jinja2
import llama_cpp
import psutil
from kit.logs import llama_log_to_file
from kit.models import CHAT_TEMPLATE_KEY, chat_format_for, resolve_model
from kit.gpu import GpuSampler, backend_devices, device_buffers, device_memory_columns
from kit.environment import process_provenance

DEFAULT_REPETITIONS = 5

# Real prompts for end-to-end timing: short RAG-server style questions about Python.
DEFAULT_PROMPTS = (
    "Explain in two sentences what a Python generator is.",
    "What does the `with` statement do in Python? Answer briefly.",
    "Name three built-in Python data types and one use of each.",
)


@dataclass(frozen=True)
class Test:
    """One measurement inside a trial. kind: pp, tg, pg (engine), e2e (server view), or 'module:function'."""

    __test__ = False  # not a pytest test class

    kind: str
    n_prompt: int = 0
    n_gen: int = 0
    n_depth: int = 0
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # token counts are checked like Settings' fields: a negative count would "run" and report nonsense speeds
        for name in ("n_prompt", "n_gen", "n_depth"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise SettingsError(f"{name}={v!r} must be an integer >= 0 (test {self.kind})")

    @property
    def name(self) -> str:
        """llama-bench's test label: pp512, tg128, pp512+tg128, with '@ d<depth>' for a filled context."""
        if self.kind in ("pp", "tg", "pg"):
            parts = ([f"pp{self.n_prompt}"] if self.n_prompt else []) + ([f"tg{self.n_gen}"] if self.n_gen else [])
            label = "+".join(parts)
        else:
            label = self.kind.rsplit(":", 1)[-1]
            if self.n_gen:
                label += f"{self.n_gen}"
        return label + (f" @ d{self.n_depth}" if self.n_depth else "")

    def tokens_needed(self) -> int:
        return self.n_depth + self.n_prompt + self.n_gen

    def to_dict(self) -> dict:
        return asdict(self)

    def __hash__(self) -> int:  # params is a dict: hash the canonical JSON instead
        return hash(json.dumps(self.to_dict(), sort_keys=True, default=str))

    @classmethod
    def from_dict(cls, d: dict) -> "Test":
        return cls(**d)


def pp(n: int = 512, depth: int = 0) -> Test:
    return Test("pp", n_prompt=n, n_depth=depth)


def tg(n: int = 128, depth: int = 0) -> Test:
    return Test("tg", n_gen=n, n_depth=depth)


def e2e(max_tokens: int = 64, prompts: tuple[str, ...] = DEFAULT_PROMPTS) -> Test:
    return Test("e2e", n_gen=max_tokens, params={"prompts": list(prompts)})


ENGINE_KINDS = ("pp", "tg", "pg")
ENGINE_TIMED_REGION = ("llama_decode of random tokens (pp: batches of n_batch; tg: 1-token decodes) to "
                       "llama_synchronize; no tokenize/sample; KV cleared per repetition; a depth is filled once "
                       "per test, untimed (or kept from the previous test of the trial when the cache already holds that "
                       "many tokens), and the KV cache rolled back to it before each repetition (llama-bench's cached "
                       "depth state)")


# ---- loading -------------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    llm: Any
    settings: Settings
    load_ms: float
    effective: dict

    @property
    def ctx(self):
        return self.llm._ctx.ctx

    def close(self) -> None:
        self.llm.close()


def load_model(settings: Settings, model_path: str | None = None, log_file: str | None = None) -> LoadedModel:
    """Load through llama_cpp.Llama (as a server would), timing the load; effective values read back from llama.cpp.

    The chat format is `kit.models.chat_format_for`'s: the setting (passed to Llama), the GGUF's template, or for a
    GGUF without one a format chosen from its vocabulary, set on the Llama in place of llama-cpp-python's "llama-2"
    fallback (the Llama reads it at each request). Only a template-less GGUF costs the header parse here. Rows say
    which (chat_format_effective, chat_format_source)."""
    log_path = llama_log_to_file(log_file)
    path = model_path or str(resolve_model(settings.model))
    offset = log_path.stat().st_size if log_path.exists() else 0
    devices_before = backend_devices()
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(**settings.llama_kwargs(path))
    load_ms = (time.perf_counter() - t0) * 1e3
    device = {**device_buffers(_read_from(log_path, offset)), **device_memory_columns(devices_before,
                                                                                      backend_devices())}
    if settings.chat_format is not None:
        source = "setting"
    elif CHAT_TEMPLATE_KEY in llm.metadata:
        source = "gguf"
    else:
        try:
            chat = chat_format_for(path)
            llm.chat_format, source = chat.name, chat.source
        except ChatFormatError as exc:  # engine tests need no template: the chat studies refuse this model up front
            source = f"none: llama-cpp-python's fallback ({exc})"
    ctx = llm._ctx.ctx
    eff = {
        "n_ctx_effective": int(llama_cpp.llama_n_ctx(ctx)),
        "n_batch_effective": int(llama_cpp.llama_n_batch(ctx)),
        "n_ubatch_effective": int(llama_cpp.llama_n_ubatch(ctx)),
        "n_threads_effective": int(llm.n_threads),
        "n_threads_batch_effective": int(llm.n_threads_batch),
        "chat_format_effective": llm.chat_format,  # "chat_template.default": the GGUF's template as written
        "chat_format_source": source,
        **device,
    }
    return LoadedModel(llm=llm, settings=settings, load_ms=load_ms, effective=eff)


def _read_from(path, offset: int) -> str:
    """What a log file gained since `offset` (llama.cpp's lines about this load)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


# ---- engine: llama-bench's test_prompt / test_gen --------------------------------------------------------------
def _clear_kv(ctx) -> None:

    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), False)


def _fill_depth(lm: LoadedModel, n_depth: int, rng: random.Random) -> float:
    """Empty the KV cache, then decode n_depth random tokens into it (untimed context). Returns the fill's ms."""
    _clear_kv(lm.ctx)
    t0 = time.perf_counter()
    _decode_prompt(lm, n_depth, rng)
    return (time.perf_counter() - t0) * 1e3


def _holds_depth(ctx, n_depth: int) -> bool:
    """Does sequence 0 already hold positions 0 .. n_depth-1 (the cache only ever grows at its end here)?"""

    mem = llama_cpp.llama_get_memory(ctx)
    return llama_cpp.llama_memory_seq_pos_min(mem, 0) == 0 and llama_cpp.llama_memory_seq_pos_max(mem, 0) >= n_depth - 1


def _rollback_to_depth(ctx, n_depth: int) -> bool:
    """Drop every cell at position >= n_depth: the cache holds exactly the filled depth again."""

    return bool(llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx), 0, n_depth, -1))


def _decode_prompt(lm: LoadedModel, n_prompt: int, rng: random.Random) -> None:

    ctx, vocab = lm.ctx, llama_cpp.llama_model_get_vocab(lm.llm._model.model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    add_bos = llama_cpp.llama_vocab_get_add_bos(vocab)
    n_batch = lm.effective["n_batch_effective"]
    buf = (llama_cpp.llama_token * n_batch)()
    done = 0
    while done < n_prompt:
        n = min(n_prompt - done, n_batch)
        buf[0] = llama_cpp.llama_vocab_bos(vocab) if done == 0 and add_bos else rng.randrange(n_vocab)
        for i in range(1, n):
            buf[i] = rng.randrange(n_vocab)
        rc = llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(buf, n))
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc} while processing the prompt")
        done += n
    llama_cpp.llama_synchronize(ctx)


def _decode_gen(lm: LoadedModel, n_gen: int, rng: random.Random) -> None:

    ctx, vocab = lm.ctx, llama_cpp.llama_model_get_vocab(lm.llm._model.model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    tok = (llama_cpp.llama_token * 1)()
    tok[0] = llama_cpp.llama_vocab_bos(vocab) if llama_cpp.llama_vocab_get_add_bos(vocab) else rng.randrange(n_vocab)
    for _ in range(n_gen):
        rc = llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(tok, 1))
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc} while generating")
        llama_cpp.llama_synchronize(ctx)
        tok[0] = rng.randrange(n_vocab)


class EngineRun:
    """One pp/tg/pg test on a loaded model, one step at a time: `warmup()`, then `once()` per repetition, then `row()`.

    `bench_engine` runs the steps back to back, as llama-bench does. The steps exist so that an interleaved sweep
    (`kit.sweep`, one live child per configuration) can alternate repetitions between configurations: a machine
    whose speed drifts then moves every configuration's samples alike instead of favouring the one measured first.
    Each `once()` resets the cache (or rolls it back to the filled depth) before its timed region, so a repetition
    does not depend on what ran before it. `at_s` keeps when each repetition started (perf_counter seconds).

    max_s (tg only): each timed run stops after n_gen tokens or at the first token that ends past max_s seconds,
    at least one token; t/s = tokens decoded / time. For runs under contention, where one decode can take seconds:
    the number of runs stays fixed and each costs about max_s, however slow the machine is made.
    """

    def __init__(self, lm: LoadedModel, test: Test, seed: int = 0, max_s: float | None = None):
        lm.settings.check_fits(test.tokens_needed(), what=f"test {test.name} (depth + prompt + generation)")
        if test.tokens_needed() > lm.effective["n_ctx_effective"]:
            raise ValueError(f"test {test.name} needs {test.tokens_needed()} tokens; n_ctx is {lm.effective['n_ctx_effective']}")
        if max_s is not None and (test.n_prompt or not test.n_gen or not max_s > 0):
            raise ValueError(f"max_s={max_s!r} needs a tg test (n_gen > 0, no prompt) and a positive number of seconds")
        self.lm, self.test, self.max_s = lm, test, max_s
        self.rng = random.Random(seed)
        self.samples_ns: list[int] = []
        self.samples_n: list[int] = []
        self.perf_ts: list[float] = []
        self.at_s: list[float] = []
        ctx = lm.ctx
        self.reused = bool(test.n_depth) and _holds_depth(ctx, test.n_depth)
        self.fill_ms = None
        if test.n_depth:
            # an earlier test of this trial may have left at least n_depth tokens in the cache (pp256 before
            # tg32 @ d256): attention costs the same whatever those tokens are, so keep them instead of refilling
            self.fill_ms = 0.0 if self.reused else _fill_depth(lm, test.n_depth, self.rng)

    def _reset(self) -> None:
        ctx = self.lm.ctx
        if not self.test.n_depth:
            _clear_kv(ctx)
        elif not _rollback_to_depth(ctx, self.test.n_depth):
            self.fill_ms = _fill_depth(self.lm, self.test.n_depth, self.rng)  # a memory that cannot be cut: refill

    def warmup(self) -> None:
        self._reset()
        if self.test.n_prompt:
            _decode_prompt(self.lm, self.test.n_prompt, self.rng)
        if self.test.n_gen:
            _decode_gen(self.lm, 1, self.rng)

    def once(self) -> None:
        """One timed repetition (the cache reset before it is not timed)."""

        test, lm = self.test, self.lm
        self._reset()
        llama_cpp.llama_perf_context_reset(lm.ctx)
        self.at_s.append(time.perf_counter())
        t0 = time.perf_counter_ns()
        n_gen = test.n_gen
        if test.n_prompt:
            _decode_prompt(lm, test.n_prompt, self.rng)
        if self.max_s is None:
            if test.n_gen:
                _decode_gen(lm, test.n_gen, self.rng)
        else:
            deadline, n_gen = t0 + int(self.max_s * 1e9), 0
            while n_gen < test.n_gen:
                _decode_gen(lm, 1, self.rng)
                n_gen += 1
                if time.perf_counter_ns() >= deadline:
                    break
        self.samples_ns.append(time.perf_counter_ns() - t0)
        self.samples_n.append(test.n_prompt + n_gen)
        perf = llama_cpp.llama_perf_context(lm.ctx)
        perf_ms = perf.t_p_eval_ms + perf.t_eval_ms
        if perf_ms > 0:
            self.perf_ts.append(self.samples_n[-1] / (perf_ms / 1e3))

    def row(self) -> dict:
        test, max_s = self.test, self.max_s
        samples_ts = [n / (ns / 1e9) for n, ns in zip(self.samples_n, self.samples_ns)]
        row = {
            "n_prompt": test.n_prompt,
            "n_gen": test.n_gen,
            "n_depth": test.n_depth,
            "repetitions": len(self.samples_ns),
            "samples_ns": list(self.samples_ns),
            "samples_ts": [round(x, 4) for x in samples_ts],
            **summarize(samples_ts, self.samples_ns),
            "perf_ts": round(statistics.median(self.perf_ts), 4) if self.perf_ts else None,
            "timed_region": ENGINE_TIMED_REGION if max_s is None else
            f"{ENGINE_TIMED_REGION}; time-boxed: each run stops after n_gen tokens or once {max_s:g} s have passed "
            f"(at least one token), t/s = tokens decoded / time",
        }
        if max_s is not None:
            row.update(max_s=max_s, samples_n_gen=list(self.samples_n))
        if self.fill_ms is not None:
            row["depth_fill_ms"] = round(self.fill_ms, 3)
            row["depth_reused"] = self.reused
        if row["perf_ts"] and row["median_ts"]:
            row["perf_wall_ratio"] = round(row["perf_ts"] / row["median_ts"], 4)
        return row


def bench_engine(lm: LoadedModel, test: Test, repetitions: int = DEFAULT_REPETITIONS, warmup: bool = True,
                 seed: int = 0, max_s: float | None = None) -> dict:
    """pp/tg/pg exactly as llama-bench times them: one warm-up, then `repetitions` timed runs back to back.

    Returns llama-bench's columns plus the perf-counter cross-check; max_s as in `EngineRun`.
    """
    run = EngineRun(lm, test, seed=seed, max_s=max_s)
    if warmup:
        run.warmup()
    for _ in range(repetitions):
        run.once()
    return run.row()


def summarize(samples_ts: list[float], samples_ns: list[int] | None = None) -> dict:
    """llama-bench's avg/stddev (sample stddev, n-1) plus median and coefficient of variation."""
    n = len(samples_ts)
    out = {
        "avg_ts": round(statistics.fmean(samples_ts), 4) if n else None,
        "stddev_ts": round(statistics.stdev(samples_ts), 4) if n > 1 else 0.0,
        "median_ts": round(statistics.median(samples_ts), 4) if n else None,
        "min_ts": round(min(samples_ts), 4) if n else None,
        "max_ts": round(max(samples_ts), 4) if n else None,
    }
    out["cv"] = round(out["stddev_ts"] / out["avg_ts"], 4) if n and out["avg_ts"] else None
    if samples_ns:
        out["avg_ns"] = int(statistics.fmean(samples_ns))
        out["stddev_ns"] = int(statistics.stdev(samples_ns)) if len(samples_ns) > 1 else 0
    return out


# ---- end to end: a streamed chat completion, as a server client sees it ------------------------------------------
class EmptyAnswerError(RuntimeError):
    """A streamed request that produced no token: a row with 0 tokens would time nothing and hide the cause."""


class ChatTemplateError(RuntimeError):
    """The model's chat template could not be rendered (llama-cpp-python's jinja2 sandbox refused it)."""


def stream_chat(lm: LoadedModel, prompt: str | list[dict], allow_empty: bool = False, **overrides) -> dict:
    """One streamed chat completion from a fresh prompt cache: TTFT, inter-token latencies, e2e, counts.

    A request-level helper shared by the e2e test and the studies that serve requests (RAG, queueing).
    A request that streams no token raises EmptyAnswerError naming the cause (`empty_answer_cause`), so its test
    becomes an error row; allow_empty=True returns it instead (ttft_ms None).
    """

    llm, s = lm.llm, lm.settings
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    kw = s.sampling_kwargs()
    kw.update(overrides)
    if kw.get("max_tokens") is None:
        kw["max_tokens"] = -1  # llama-cpp-python: until EOS or the context is full
    llm.reset()  # no cached prefix: every request pays its prompt processing
    _clear_kv(lm.ctx)
    llama_cpp.llama_perf_context_reset(lm.ctx)
    times, pieces, finish = [], [], None
    t0 = time.perf_counter()
    try:
        for chunk in llm.create_chat_completion(messages=messages, stream=True, **kw):
            choice = chunk["choices"][0]
            content = choice.get("delta", {}).get("content")
            if content:
                times.append(time.perf_counter())
                pieces.append(content)
            if choice.get("finish_reason"):
                finish = choice["finish_reason"]
    except jinja2.TemplateError as exc:  # a template the sandbox refuses, or one that does not parse
        eff = lm.effective
        raise ChatTemplateError(
            f"the chat template could not be rendered (chat format {eff.get('chat_format_effective')!r}, "
            f"{eff.get('chat_format_source')}): {type(exc).__name__}: {str(exc).rstrip('.')}. Set LLAMACPP_CHAT_FORMAT "
            f"(Settings.chat_format) to a registered format to use instead of the GGUF's template") from None
    t_end = time.perf_counter()
    perf = llama_cpp.llama_perf_context(lm.ctx)
    itl = [(b - a) * 1e3 for a, b in zip(times, times[1:])]
    n_gen = int(perf.n_eval) or len(times)
    e2e_ms = (t_end - t0) * 1e3
    if not times and not allow_empty:
        raise EmptyAnswerError(empty_answer_cause(lm, finish, n_gen, kw["max_tokens"]))
    return {
        "text": "".join(pieces),
        "finish_reason": finish,
        "ttft_ms": (times[0] - t0) * 1e3 if times else None,
        "e2e_ms": e2e_ms,
        "itl_ms": itl,
        "n_prompt_tokens": int(perf.n_p_eval),
        "n_gen_tokens": n_gen,
        "n_chunks": len(times),
        "engine_pp_ms": float(perf.t_p_eval_ms),
        "engine_tg_ms": float(perf.t_eval_ms),
    }


def empty_answer_cause(lm: LoadedModel, finish_reason: str | None, n_gen: int, max_tokens: int | None) -> str:
    """Why a request streamed no token, in words a reader can act on."""
    eff = lm.effective
    fmt = f"chat format {eff.get('chat_format_effective')!r} ({eff.get('chat_format_source')})"
    if finish_reason == "stop":
        return (f"the model produced no tokens: it ended at once (finish_reason 'stop') with {fmt}. A prompt "
                f"template the model was not trained on makes it answer with end-of-sequence; set "
                f"LLAMACPP_CHAT_FORMAT (Settings.chat_format) to its own format")
    return (f"the model produced no text: {n_gen} token(s) decoded, none streamed as text (finish_reason "
            f"{finish_reason!r}, max_tokens {max_tokens}) with {fmt}")


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-quantile (0..1) with linear interpolation, as numpy's default; None for no values."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


E2E_TIMED_REGION = ("streamed create_chat_completion call to its last chunk (template, tokenize, prompt "
                    "processing, sampling, detokenize); prompt cache reset per request; avg_ts = generated "
                    "tokens / e2e time")


def _r(x, digits: int = 3):
    return None if x is None else round(x, digits)


def requests_row(reqs: Sequence[dict], speed: str = "e2e") -> dict:
    """The one place where stream_chat results become row columns: tokens/s samples (avg_ts, stddev_ts ...),
    TTFT, ITL p50/p95, e2e with their raw samples, token counts, finish reasons and the engine's share of
    the decode wall time. Requests that produced no token count in n_requests and n_empty, not in the speeds.

    Per-token decode cost per request: mean ITL (decode_ms_per_token) and llama.cpp's own decode time per token
    (engine_decode_ms_per_token), with their samples. speed="decode" makes the tokens/s samples 1000 / each
    request's mean ITL (decode + sampling + detokenize, the prompt excluded) instead of tokens / e2e time."""
    reqs = list(reqs)
    got = [r for r in reqs if r.get("ttft_ms") is not None]
    itl = [x for r in got for x in r["itl_ms"]]
    per_tok = [statistics.fmean(r["itl_ms"]) for r in got if r["itl_ms"]]
    # a served request (kit.serve) has no engine timing: None, left out of the engine columns
    engine_per_tok = [r["engine_tg_ms"] / r["n_gen_tokens"] for r in got
                      if r["n_gen_tokens"] and r.get("engine_tg_ms") is not None]
    ts = ([1e3 / x for x in per_tok if x > 0] if speed == "decode" else
          [r["n_gen_tokens"] / (r["e2e_ms"] / 1e3) for r in got if r["e2e_ms"] > 0])
    decode_wall = sum(r["e2e_ms"] - r["ttft_ms"] for r in got)
    decode_engine = sum(r["engine_tg_ms"] for r in got if r.get("engine_tg_ms") is not None)
    finish: dict[str, int] = {}
    for r in reqs:
        finish[str(r.get("finish_reason"))] = finish.get(str(r.get("finish_reason")), 0) + 1
    return {
        "n_requests": len(reqs),
        "n_empty": len(reqs) - len(got),
        "n_prompt": round(statistics.fmean(r["n_prompt_tokens"] for r in reqs)) if reqs else None,
        "samples_ts": [round(x, 4) for x in ts],
        **summarize(ts),
        "ttft_ms": _r(statistics.median(r["ttft_ms"] for r in got)) if got else None,
        "samples_ttft_ms": [round(r["ttft_ms"], 3) for r in got],
        "itl_p50_ms": _r(percentile(itl, 0.5)),
        "itl_p95_ms": _r(percentile(itl, 0.95)),
        "e2e_ms": _r(statistics.median(r["e2e_ms"] for r in reqs)) if reqs else None,
        "samples_e2e_ms": [round(r["e2e_ms"], 3) for r in reqs],
        "n_gen_tokens_mean": round(statistics.fmean(r["n_gen_tokens"] for r in reqs), 2) if reqs else None,
        "finish_reasons": finish,
        "engine_share_of_decode": round(decode_engine / decode_wall, 4) if decode_wall > 0 and engine_per_tok else None,
        "samples_decode_ms_per_token": [round(x, 4) for x in per_tok],
        "decode_ms_per_token": _r(statistics.median(per_tok), 4) if per_tok else None,
        "samples_engine_decode_ms_per_token": [round(x, 4) for x in engine_per_tok],
        "engine_decode_ms_per_token": _r(statistics.median(engine_per_tok), 4) if engine_per_tok else None,
        "samples_n_gen_tokens": [r["n_gen_tokens"] for r in reqs],
    }


def bench_e2e(lm: LoadedModel, test: Test, repetitions: int = DEFAULT_REPETITIONS, warmup: bool = True) -> dict:
    """Streamed chat completions over the test's prompts, `repetitions` passes; TTFT, ITL p50/p95, e2e, tokens/s."""
    prompts = test.params.get("prompts") or list(DEFAULT_PROMPTS)
    max_tokens = test.n_gen or None
    if warmup:
        stream_chat(lm, prompts[0], max_tokens=4)
    reqs = [stream_chat(lm, p, max_tokens=max_tokens) for _ in range(repetitions) for p in prompts]
    return {"n_gen": test.n_gen, "n_depth": 0, "repetitions": repetitions, **requests_row(reqs),
            "timed_region": E2E_TIMED_REGION}


# ---- resources -------------------------------------------------------------------------------------------------
class ResourceMonitor:
    """Peak RSS (kernel's ru_maxrss plus a sampled current RSS), CPU utilisation, and GPU via NVML when present."""

    def __init__(self, interval_s: float = 0.05):
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._rss_peak = 0

    def __enter__(self):


        self._proc = psutil.Process()
        self._cpu0 = self._proc.cpu_times()
        self._t0 = time.perf_counter()
        self._gpu = GpuSampler()
        self._gpu.__enter__()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._rss_peak = max(self._rss_peak, self._proc.memory_info().rss)
            except Exception:
                return

    def snapshot(self) -> dict:
        cpu = self._proc.cpu_times()
        wall = time.perf_counter() - self._t0
        busy = (cpu.user - self._cpu0.user) + (cpu.system - self._cpu0.system)
        maxrss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss_now = self._proc.memory_info().rss
        return {
            "rss_mb": round(rss_now / 2**20, 1),
            "rss_peak_mb": round(max(self._rss_peak, rss_now, maxrss_kb * 1024) / 2**20, 1),
            "cpu_util_pct": round(100 * busy / wall, 1) if wall > 0 else None,
            **self._gpu.snapshot(),
        }

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=1)
        self._gpu.__exit__(*exc)


# ---- one configuration ------------------------------------------------------------------------------------------
def proc_memory(pid: int | str = "self") -> dict:
    """VmRSS, RssAnon, RssFile and VmLck (locked) in MiB, from /proc/<pid>/status (Linux)."""
    want = {"VmRSS": "proc_rss_mb", "RssAnon": "rss_anon_mb", "RssFile": "rss_file_mb", "VmLck": "vm_lck_mb",
            "VmHWM": "vm_hwm_mb"}
    out = {v: None for v in want.values()}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in want:
                out[want[key]] = round(int(rest.split()[0]) / 1024, 2)
    except OSError:
        pass
    return out


def memory_probe(lm, test: Test, repetitions: int = 1) -> dict:
    """Test kind: the process's memory right now (first test of a trial: just after loading)."""
    return {"n_prompt": 0, "n_gen": 0, "n_depth": 0, "repetitions": 1, **proc_memory(),
            "timed_region": "none: /proc/self/status read after loading (memory, no timing)"}


def resolve_test_fn(kind: str) -> Callable:
    """Engine kinds, e2e, or a 'package.module:function' taking (LoadedModel, Test, repetitions) -> dict."""
    if kind in ENGINE_KINDS:
        return bench_engine
    if kind == "e2e":
        return bench_e2e
    if ":" in kind:
        mod, _, fn = kind.partition(":")
        return getattr(importlib.import_module(mod), fn)
    raise ValueError(f"unknown test kind {kind!r}: use pp, tg, pg, e2e or 'module:function'")


def with_trial_columns(row: dict, lm: LoadedModel, test: Test, mon: ResourceMonitor) -> dict:
    """A test's row as a trial's child reports it: the test, the load, the resources after the measurement, and
    the build and machine of this process (`kit.environment.process_provenance`: the one that measured it)."""
    return {**row, "test": test.name, "test_kind": test.kind, "load_ms": round(lm.load_ms, 3), **lm.effective,
            **mon.snapshot(), **process_provenance()}


def measure_config(settings: Settings, tests: list[Test], repetitions: int = DEFAULT_REPETITIONS,
                   model_path: str | None = None, on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Load once, run every test, return one row per test (measurement fields only; the sweep adds the rest).

    A test that raises becomes a row with status 'error' and the message; the others still run.
    """
    rows = []
    with ResourceMonitor() as mon:
        lm = load_model(settings, model_path=model_path)
        try:
            for test in tests:
                fn = resolve_test_fn(test.kind)
                try:
                    row = {"status": "ok", "error": None, **fn(lm, test, repetitions)}
                except Exception as exc:  # one failing test must not hide the others
                    row = {"status": "error", "error": f"{type(exc).__name__}: {exc}",
                           "n_prompt": test.n_prompt, "n_gen": test.n_gen, "n_depth": test.n_depth}
                    if "label" in test.params:  # a study's name for the test: its table of failures shows it
                        row["label"] = test.params["label"]
                row = with_trial_columns(row, lm, test, mon)
                rows.append(row)
                if on_row:
                    on_row(row)
        finally:
            lm.close()
    return rows
