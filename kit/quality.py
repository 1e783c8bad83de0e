"""Quality: perplexity, KL divergence and top-1 agreement, computed the way llama.cpp's `llama-perplexity` does.

What is computed (vendor/llama.cpp/tools/perplexity/perplexity.cpp, `perplexity()` and `kl_divergence()`):
- The text is tokenized once (BOS first where the vocab adds one) and cut into `n_chunks` chunks of `n_ctx`
  tokens. Each chunk is decoded from a cleared KV cache, in pieces of `n_batch` tokens, with the first token
  replaced by BOS where the vocab adds BOS. Logits are requested for positions >= first = n_ctx // 2; the
  logits at positions first .. n_ctx-2 score the next token, so each chunk scores n_ctx - 1 - first tokens
  (the model always has at least half a chunk of context).
- PPL = exp(mean NLL); its uncertainty is PPL x the standard error of the mean NLL (llama-perplexity's
  "PPL = x +/- y").
- KL divergence (`--kl-divergence`): a reference run stores, for every scored position, its log-softmax over
  the whole vocabulary; a candidate run on the same tokens computes per position
  KLD = sum_i p_ref(i) (log p_ref(i) - log p_cand(i)) over the i with log p_ref(i) > -16 (llama.cpp's cut-off),
  whether its argmax equals the reference's argmax ("same top p", top-1 agreement), and both models' NLL.
  Mean KLD with its standard error, percentiles (median, 90 / 99 / 99.9 %, max) of the per-token KLD, top-1
  agreement with sqrt(p (1 - p) / (n - 1)), and ln(PPL/PPL_ref) with the covariance-aware uncertainty.

The held-out text is the standard library's `pydoc_data.topics` (the Python reference manual's topic pages,
joined in sorted key order): present everywhere Python is, deterministic, and not a chat transcript. Its
content differs between Python versions, so every result carries the text's sha256.

Reference file (open format, numpy `.npz`, no pickles), arrays:
  tokens        int32 [n_chunks * n_ctx]          the evaluated tokens (before the per-chunk BOS substitution)
  logprob_q     uint16 [n_scored, n_vocab]        log-softmax per scored position, llama.cpp's encoding:
  scale         float32 [n_scored]                  log p = scale * q + min_log_prob for q > 0, where the
  min_log_prob  float32 [n_scored]                  range is [max logit - 16, max logit] (q = 0 below it);
                                                    absolute error <= 16 / 65535 / 2 = 1.2e-4 nats
  meta          0-d unicode array holding JSON: format, model_sha256, model_file, n_ctx, n_chunks, n_vocab,
                first, add_bos, text_sha256, n_batch, created
Size: n_chunks * (n_ctx/2 - 1) * n_vocab * 2 bytes (8 x 256-token chunks, vocab 49152: about 100 MB), so
references live in a git-ignored cache (`outputs/cache/quality/` by default) keyed by the reference model's
sha256, the text's sha256 and the chunking.

Sweep test kinds (run inside a trial's child process with the model loaded once; see `kit.measure.Test`):
  Test("kit.quality:perplexity_test", params={"n_ctx": 256, "n_chunks": 8})   (or `ppl_test(...)`)
  Test("kit.quality:kld_test", params={"reference_logits": "/abs/path.npz", "n_ctx": 256, "n_chunks": 8,
                                       "reference_sha256": "<sha of the reference GGUF>"})  (or `kld_test_for(...)`)
kld_test writes the reference file itself when it is missing and the loaded model may be the reference
(its sha256 equals `reference_sha256`, or no sha was given: then the first configuration run writes it, so
put the reference first). The reference's own row then scores it against the file it has just written:
KLD 0 and top-1 agreement 100 %, a live check of the pipeline in every study.
Quality numbers are deterministic for a given build and model: they are computed once per trial whatever
`repetitions` says; `samples_ts` holds per-chunk evaluation speed (tokens decoded / s) for information only.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Iterator
from pydoc_data import topics
import llama_cpp
import numpy as np
from kit.models import sha256_file
from kit.models import resolve_model, sha256_file
from kit.config import Settings
from kit.measure import load_model
from kit.measure import summarize
from kit.measure import Test

DEFAULT_N_CTX = 256
DEFAULT_N_CHUNKS = 8
DEFAULT_CACHE_DIR = Path("outputs") / "cache" / "quality"
REFERENCE_FORMAT = "kit.quality.reference/1"
LOGP_FLOOR = -16.0  # llama.cpp: reference log-probs at or below this are left out of the KLD sum
LOGIT_RANGE = 16.0  # llama.cpp: the uint16 encoding covers [max logit - 16, max logit]


class QualityError(ValueError):
    """Bad quality-evaluation input: chunk larger than the context, text too short, mismatched reference."""


# ---- the held-out text ------------------------------------------------------------------------------------------
def heldout_text(max_chars: int | None = None) -> str:
    """The Python reference manual's topic pages (`pydoc_data.topics`), joined in sorted key order."""

    t = topics.topics
    text = "\n\n".join(t[k] for k in sorted(t))
    return text if max_chars is None else text[: max(int(max_chars), 0)]


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenize_text(lm, text: str, n_tokens: int | None = None) -> list[int]:
    """common_tokenize(ctx, text, add_special=true): BOS first where the vocab adds it, special tokens as text.

    With n_tokens, only a prefix of the text long enough for n_tokens (+ margin) is tokenized; the tokens before
    the cut are those of the full text, because the cut only changes the last few tokens, which are dropped.
    """
    llm = lm.llm
    if n_tokens is None:
        return list(llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))
    margin = 64
    n_chars = max(4 * (n_tokens + margin), 1024)
    while True:
        part = text[:n_chars]
        toks = list(llm.tokenize(part.encode("utf-8"), add_bos=True, special=False))
        if n_chars >= len(text):
            return toks
        if len(toks) >= n_tokens + margin:
            return toks[: n_tokens + margin // 2]
        n_chars *= 2


# ---- decoding chunks as llama-perplexity does ---------------------------------------------------------------------
def _vocab_info(lm) -> dict:

    vocab = llama_cpp.llama_model_get_vocab(lm.llm._model.model)
    return {
        "n_vocab": int(llama_cpp.llama_vocab_n_tokens(vocab)),
        "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
        "bos": int(llama_cpp.llama_vocab_bos(vocab)),
    }


def _check_chunking(lm, n_ctx: int, n_chunks: int) -> None:

    if not isinstance(n_ctx, int) or n_ctx < 8:
        raise QualityError(f"n_ctx={n_ctx!r}: the chunk size must be an int >= 8")
    if not isinstance(n_chunks, int) or n_chunks < 1:
        raise QualityError(f"n_chunks={n_chunks!r} must be a positive int")
    loaded = int(llama_cpp.llama_n_ctx(lm.ctx))
    if n_ctx > loaded:
        raise QualityError(f"perplexity chunk n_ctx={n_ctx} exceeds the loaded context ({loaded}); "
                           f"load the model with Settings(n_ctx>={n_ctx}) or use smaller chunks")


def iter_chunk_logits(lm, tokens: list[int], n_ctx: int, n_chunks: int,
                      n_batch: int | None = None) -> Iterator[tuple[int, "object", "object", float]]:
    """Decode chunk after chunk; yield (chunk index, logits [n_scored, n_vocab] float32, targets [n_scored], seconds).

    Row r of the logits is the model's prediction at position first + r, scored against targets[r], the token at
    position first + r + 1. Seconds: wall time of the chunk's llama_decode calls up to llama_synchronize.
    """

    _check_chunking(lm, n_ctx, n_chunks)
    info = _vocab_info(lm)
    n_vocab = info["n_vocab"]
    ctx = lm.ctx
    n_batch = min(int(n_batch or llama_cpp.llama_n_batch(ctx)), n_ctx)
    first = n_ctx // 2
    n_score = n_ctx - 1 - first
    if len(tokens) < n_chunks * n_ctx:
        raise QualityError(f"{len(tokens)} tokens are fewer than n_chunks x n_ctx = {n_chunks * n_ctx}")
    batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
    mem = llama_cpp.llama_get_memory(ctx)
    try:
        for c in range(n_chunks):
            chunk = list(tokens[c * n_ctx:(c + 1) * n_ctx])
            targets = np.asarray(chunk[first + 1:n_ctx], dtype=np.int64)
            if info["add_bos"]:
                chunk[0] = info["bos"]
            llama_cpp.llama_memory_clear(mem, True)
            out = np.empty((n_score, n_vocab), dtype=np.float32)
            filled = 0
            t0 = time.perf_counter()
            for start in range(0, n_ctx, n_batch):
                n = min(n_batch, n_ctx - start)
                batch.n_tokens = n
                n_out = 0
                for k in range(n):
                    pos = start + k
                    batch.token[k] = chunk[pos]
                    batch.pos[k] = pos
                    batch.n_seq_id[k] = 1
                    batch.seq_id[k][0] = 0
                    need = pos >= first  # as llama-perplexity: logits from `first` on
                    batch.logits[k] = 1 if need else 0
                    n_out += need
                rc = llama_cpp.llama_decode(ctx, batch)
                if rc != 0:
                    raise RuntimeError(f"llama_decode failed with code {rc} (chunk {c}, position {start})")
                if n_out:
                    ptr = llama_cpp.llama_get_logits(ctx)
                    rows = np.ctypeslib.as_array(ptr, shape=(n_out, n_vocab))
                    take = min(n_out, n_score - filled)  # the logits at position n_ctx-1 score nothing
                    if take > 0:
                        out[filled:filled + take] = rows[:take]
                        filled += take
            llama_cpp.llama_synchronize(ctx)
            dt = time.perf_counter() - t0
            yield c, out, targets, dt
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_memory_clear(mem, True)
        try:
            lm.llm.reset()  # the high-level object's token cache no longer matches the KV cache
        except Exception:
            pass


def _log_softmax(logits):
    """Row-wise log-softmax in float32 with float64 sums (as llama.cpp: max-shifted expf summed in double)."""

    m = logits.max(axis=1)
    lse = np.log(np.exp(logits - m[:, None]).sum(axis=1, dtype=np.float64)).astype(np.float32)
    return logits - (m + lse)[:, None]


def _mean_unc(s: float, s2: float, n: int, min_count: int = 10) -> tuple[float, float]:
    """llama-perplexity's mean_and_uncertainty: mean and standard error sqrt(var / (n - 1))."""
    if n < 1:
        return 0.0, 0.0
    f = s / n
    var = s2 / n - f * f
    return f, (math.sqrt(var / (n - 1)) if var > 0 and n > min_count else 0.0)


def _percentile(sorted_values, fraction: float) -> float:
    """llama-perplexity's percentile: linear interpolation between closest ranks."""
    v = sorted_values
    if len(v) == 0:
        return float("nan")
    if fraction <= 0:
        return float(v[0])
    if fraction >= 1:
        return float(v[-1])
    p = fraction * (len(v) - 1)
    ip = int(p)
    p -= ip
    return float((1 - p) * v[ip] + p * v[min(ip + 1, len(v) - 1)])


# ---- perplexity ---------------------------------------------------------------------------------------------------
def perplexity(lm, text: str | None = None, n_ctx: int = DEFAULT_N_CTX, n_chunks: int = DEFAULT_N_CHUNKS,
               n_batch: int | None = None, tokens: list[int] | None = None) -> dict:
    """Perplexity of the loaded model (kit.measure.load_model) on `text` (default: heldout_text()), in process.

    Returns ppl, ppl_stderr, nll_mean, nll_stderr, n_tokens_scored, n_chunks (used), n_ctx, n_batch, first,
    chunk_nll (mean NLL per chunk), samples_ts (tokens decoded per second, per chunk), text_sha256.
    Like llama-perplexity, uses min(n_chunks, available chunks) and needs at least 2 x n_ctx tokens.
    """

    text = heldout_text() if text is None and tokens is None else text
    _check_chunking(lm, n_ctx, n_chunks)
    if tokens is None:
        tokens = tokenize_text(lm, text, n_tokens=n_ctx * max(n_chunks, 2))
    if len(tokens) < 2 * n_ctx:
        raise QualityError(f"the text tokenizes to {len(tokens)} tokens; perplexity with n_ctx={n_ctx} needs "
                           f"at least {2 * n_ctx}")
    n_chunks = min(n_chunks, len(tokens) // n_ctx)
    s = s2 = 0.0
    count = 0
    chunk_nll, speeds = [], []
    for _, logits, targets, dt in iter_chunk_logits(lm, tokens, n_ctx, n_chunks, n_batch):
        lp = _log_softmax(logits)
        nll = -lp[np.arange(len(targets)), targets].astype(np.float64)
        s += float(nll.sum())
        s2 += float((nll * nll).sum())
        count += len(nll)
        chunk_nll.append(round(float(nll.mean()), 6))
        speeds.append(n_ctx / dt if dt > 0 else float("nan"))
    nll_mean, nll_se = _mean_unc(s, s2, count, min_count=1)
    ppl = math.exp(nll_mean)

    return {
        "ppl": round(ppl, 6),
        "ppl_stderr": round(ppl * nll_se, 6),
        "nll_mean": round(nll_mean, 6),
        "nll_stderr": round(nll_se, 6),
        "n_tokens_scored": count,
        "n_chunks": n_chunks,
        "n_ctx": n_ctx,
        "n_batch": min(int(n_batch or llama_cpp.llama_n_batch(lm.ctx)), n_ctx),
        "first": n_ctx // 2,
        "chunk_nll": chunk_nll,
        "samples_ts": [round(x, 4) for x in speeds],
        "text_sha256": text_sha256(text) if text is not None else None,
    }


# ---- reference log-probabilities and KL divergence -----------------------------------------------------------------
def encode_logprobs(logits):
    """llama.cpp's uint16 encoding of one log-softmax per row: (q uint16, scale f32, min_log_prob f32, lse-shifted)."""

    mx = logits.max(axis=1)
    mn = np.maximum(logits.min(axis=1), mx - LOGIT_RANGE)
    lse = np.log(np.exp(logits - mx[:, None]).sum(axis=1, dtype=np.float64)).astype(np.float32)
    min_log_prob = (mn - mx - lse).astype(np.float32)
    scale = ((mx - mn) / np.float32(65535.0)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1.0))
    q = np.rint((logits - mn[:, None]) / safe[:, None])
    q = np.where((logits > mn[:, None]) & (scale[:, None] > 0), q, 0)
    return np.clip(q, 0, 65535).astype(np.uint16), scale, min_log_prob


def decode_logprobs(q, scale, min_log_prob):
    """Inverse of encode_logprobs: log p = scale * q + min_log_prob (float32)."""

    return scale[:, None].astype(np.float32) * q.astype(np.float32) + min_log_prob[:, None].astype(np.float32)


def _model_path(lm) -> str:
    return str(getattr(lm.llm, "model_path", "") or "")


def _model_sha(lm) -> str | None:

    p = _model_path(lm)
    return sha256_file(p) if p and os.path.exists(p) else None


def reference_path(model: str | os.PathLike, n_ctx: int = DEFAULT_N_CTX, n_chunks: int = DEFAULT_N_CHUNKS,
                   cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR, tag: str = "") -> Path:
    """Where the reference log-probs of `model` (bundled name or GGUF path) for this text and chunking go.

    Keyed by the model file's sha256, the held-out text's sha256 and the chunking; `tag` separates references of
    the same file under different settings (e.g. "kv-f16" when the reference is a KV cache type, not a file).
    """

    sha = sha256_file(resolve_model(model))
    t = text_sha256(heldout_text())[:8]
    name = f"{sha[:16]}-text{t}-c{n_ctx}x{n_chunks}" + (f"-{tag}" if tag else "") + ".npz"
    return Path(cache_dir) / name


def write_reference(lm, path: str | os.PathLike, text: str | None = None, n_ctx: int = DEFAULT_N_CTX,
                    n_chunks: int = DEFAULT_N_CHUNKS, n_batch: int | None = None) -> dict:
    """Evaluate the loaded model as the reference and write its per-position log-probs to `path` (.npz).

    Returns the reference's own perplexity row, plus its KLD against the file just written (computed from the
    same logits: 0 up to the encoding's rounding, a check of the encoding) and the file's meta.
    """

    text = heldout_text() if text is None else text
    _check_chunking(lm, n_ctx, n_chunks)
    tokens = tokenize_text(lm, text, n_tokens=n_ctx * max(n_chunks, 2))
    if len(tokens) < 2 * n_ctx:
        raise QualityError(f"the text tokenizes to {len(tokens)} tokens; n_ctx={n_ctx} needs at least {2 * n_ctx}")
    n_chunks = min(n_chunks, len(tokens) // n_ctx)
    tokens = tokens[: n_chunks * n_ctx]
    info = _vocab_info(lm)
    qs, scales, mins = [], [], []
    acc = _KldAccumulator()
    speeds = []
    for _, logits, targets, dt in iter_chunk_logits(lm, tokens, n_ctx, n_chunks, n_batch):
        q, sc, mn = encode_logprobs(logits)
        qs.append(q)
        scales.append(sc)
        mins.append(mn)
        acc.add(logits, targets, q, sc, mn)
        speeds.append(n_ctx / dt if dt > 0 else float("nan"))

    meta = {
        "format": REFERENCE_FORMAT,
        "model_sha256": _model_sha(lm),
        "model_file": Path(_model_path(lm)).name,
        "n_ctx": n_ctx,
        "n_chunks": n_chunks,
        "n_vocab": info["n_vocab"],
        "first": n_ctx // 2,
        "add_bos": info["add_bos"],
        "text_sha256": text_sha256(text),
        "n_batch": min(int(n_batch or llama_cpp.llama_n_batch(lm.ctx)), n_ctx),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.savez(fh, tokens=np.asarray(tokens, dtype=np.int32), logprob_q=np.concatenate(qs),
                 scale=np.concatenate(scales), min_log_prob=np.concatenate(mins), meta=np.array(json.dumps(meta)))
    os.replace(tmp, p)
    row = acc.result()
    row.update(reference_logits=str(p), reference_sha256=meta["model_sha256"], is_reference=True,
               text_sha256=meta["text_sha256"], n_ctx=n_ctx, first=n_ctx // 2,
               samples_ts=[round(x, 4) for x in speeds])
    return row


def read_reference(path: str | os.PathLike) -> dict:
    """Load a reference file: arrays tokens, logprob_q, scale, min_log_prob and the parsed meta."""

    p = Path(path)
    if not p.exists():
        raise QualityError(f"{p}: no reference log-probs here; run the reference model first "
                           f"(kld_test on it writes the file, or kit.quality.ensure_reference)")
    with np.load(p, allow_pickle=False) as z:
        d = {k: z[k] for k in ("tokens", "logprob_q", "scale", "min_log_prob")}
        meta = json.loads(str(z["meta"]))
    if meta.get("format") != REFERENCE_FORMAT:
        raise QualityError(f"{p}: format {meta.get('format')!r}, expected {REFERENCE_FORMAT!r}")
    n_score = meta["n_ctx"] - 1 - meta["first"]
    if d["logprob_q"].shape != (meta["n_chunks"] * n_score, meta["n_vocab"]):
        raise QualityError(f"{p}: log-prob array has shape {d['logprob_q'].shape}, meta says "
                           f"{(meta['n_chunks'] * n_score, meta['n_vocab'])}")
    d["meta"] = meta
    return d


class _KldAccumulator:
    """llama-perplexity's kl_divergence_result: running sums, per-token KLD values, same-top counts."""

    def __init__(self) -> None:
        self.sums = dict(nll=0.0, nll2=0.0, base=0.0, base2=0.0, nll_base=0.0, kld=0.0, kld2=0.0,
                         p_diff=0.0, p_diff2=0.0, p_diff4=0.0)
        self.same_top = 0
        self.count = 0
        self.kld_values: list = []
        self.chunk_kld: list[float] = []
        self.chunk_nll: list[float] = []
        self.max_p_diff = 0.0

    def add(self, logits, targets, q, scale, min_log_prob) -> None:

        lq = _log_softmax(logits)
        lpb = decode_logprobs(q, scale, min_log_prob)
        idx = np.arange(len(targets))
        nll = -lq[idx, targets].astype(np.float64)
        nll_base = -lpb[idx, targets].astype(np.float64)
        keep = lpb > LOGP_FLOOR
        terms = np.where(keep, np.exp(lpb) * (lpb - lq), np.float32(0.0))
        kld = terms.sum(axis=1, dtype=np.float64)
        same = logits.argmax(axis=1) == lpb.argmax(axis=1)
        p_diff = np.exp(-nll) - np.exp(-nll_base)
        s = self.sums
        s["nll"] += float(nll.sum()); s["nll2"] += float((nll * nll).sum())
        s["base"] += float(nll_base.sum()); s["base2"] += float((nll_base * nll_base).sum())
        s["nll_base"] += float((nll * nll_base).sum())
        s["kld"] += float(kld.sum()); s["kld2"] += float((kld * kld).sum())
        s["p_diff"] += float(p_diff.sum()); s["p_diff2"] += float((p_diff ** 2).sum())
        s["p_diff4"] += float((p_diff ** 4).sum())
        self.max_p_diff = max(self.max_p_diff, float(np.abs(p_diff).max()) if len(p_diff) else 0.0)
        self.same_top += int(same.sum())
        self.count += len(targets)
        self.kld_values.append(kld)
        self.chunk_kld.append(round(float(kld.mean()), 8))
        self.chunk_nll.append(round(float(nll.mean()), 6))

    def result(self) -> dict:

        s, n = self.sums, self.count
        if n < 2:
            raise QualityError(f"only {n} scored token(s): use larger chunks")
        log_ppl, log_ppl_se = _mean_unc(s["nll"], s["nll2"], n)
        log_base, log_base_se = _mean_unc(s["base"], s["base2"], n)
        cov = (s["nll_base"] / n - (s["nll"] / n) * (s["base"] / n)) / (n - 1) if n >= 10 else 0.0
        ratio_var = log_ppl_se ** 2 + log_base_se ** 2 - 2.0 * cov
        kl, kl_se = _mean_unc(s["kld"], s["kld2"], n)
        mse, mse_se = _mean_unc(s["p_diff2"], s["p_diff4"], n)
        rms = math.sqrt(max(mse, 0.0))
        top = self.same_top / n
        vals = np.sort(np.concatenate(self.kld_values)) if self.kld_values else np.zeros(0)
        ppl, ppl_base = math.exp(log_ppl), math.exp(log_base)
        return {
            "kld_mean": round(kl, 8),
            "kld_stderr": round(kl_se, 8),
            "kld_median": round(_percentile(vals, 0.5), 8),
            "kld_p90": round(_percentile(vals, 0.90), 8),
            "kld_p99": round(_percentile(vals, 0.99), 8),
            "kld_p999": round(_percentile(vals, 0.999), 8),
            "kld_max": round(float(vals[-1]), 8) if len(vals) else None,
            "top1_agree_pct": round(100.0 * top, 4),
            "top1_agree_stderr_pct": round(100.0 * math.sqrt(top * (1 - top) / (n - 1)), 4),
            "ppl": round(ppl, 6),
            "ppl_stderr": round(ppl * log_ppl_se, 6),
            "nll_mean": round(log_ppl, 6),
            "nll_stderr": round(log_ppl_se, 6),
            "ppl_base": round(ppl_base, 6),
            "ppl_base_stderr": round(ppl_base * log_base_se, 6),
            "ln_ppl_ratio": round(log_ppl - log_base, 8),
            "ln_ppl_ratio_stderr": round(math.sqrt(ratio_var) if ratio_var > 0 else 0.0, 8),
            "p_diff_rms_pct": round(100.0 * rms, 5),
            "p_diff_rms_stderr_pct": round(100.0 * (0.5 / rms * mse_se if rms > 0 else 0.0), 5),
            "p_diff_max_pct": round(100.0 * self.max_p_diff, 5),
            "n_tokens_scored": n,
            "n_chunks": len(self.chunk_kld),
            "chunk_kld": self.chunk_kld,
            "chunk_nll": self.chunk_nll,
        }


def kl_divergence(lm, reference_logits: str | os.PathLike, n_batch: int | None = None) -> dict:
    """Score the loaded model against a reference file: KLD (mean +- se, percentiles), top-1 agreement, PPL."""
    ref = read_reference(reference_logits)
    meta = ref["meta"]
    info = _vocab_info(lm)
    if info["n_vocab"] != meta["n_vocab"]:
        raise QualityError(f"vocabulary mismatch: the model has {info['n_vocab']} tokens, the reference "
                           f"{meta['n_vocab']}: KLD needs the same tokenizer")
    n_ctx, n_chunks = int(meta["n_ctx"]), int(meta["n_chunks"])
    n_score = n_ctx - 1 - meta["first"]
    tokens = [int(t) for t in ref["tokens"]]
    acc = _KldAccumulator()
    speeds = []
    for c, logits, targets, dt in iter_chunk_logits(lm, tokens, n_ctx, n_chunks, n_batch):
        sl = slice(c * n_score, (c + 1) * n_score)
        acc.add(logits, targets, ref["logprob_q"][sl], ref["scale"][sl], ref["min_log_prob"][sl])
        speeds.append(n_ctx / dt if dt > 0 else float("nan"))
    row = acc.result()
    sha = _model_sha(lm)
    row.update(reference_logits=str(reference_logits), reference_sha256=meta["model_sha256"],
               reference_file=meta.get("model_file"),
               is_reference=bool(sha and sha == meta["model_sha256"]), text_sha256=meta["text_sha256"],
               n_ctx=n_ctx, first=meta["first"], samples_ts=[round(x, 4) for x in speeds])
    return row


def ensure_reference(model_or_settings, path: str | os.PathLike | None = None, n_ctx: int = DEFAULT_N_CTX,
                     n_chunks: int = DEFAULT_N_CHUNKS, cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR,
                     tag: str = "") -> Path:
    """In process: write the reference file for a model (name, path or Settings) unless it is already cached."""

    s = model_or_settings if isinstance(model_or_settings, Settings) else Settings(model=str(model_or_settings))
    if s.n_ctx and s.n_ctx < n_ctx:
        s = s.replace(n_ctx=n_ctx)
    p = Path(path) if path else reference_path(s.model, n_ctx, n_chunks, cache_dir, tag)
    if p.exists():
        try:
            read_reference(p)
            return p
        except Exception:
            pass  # damaged or stale: rebuild
    lm = load_model(s)
    try:
        write_reference(lm, p, n_ctx=n_ctx, n_chunks=n_chunks)
    finally:
        lm.close()
    return p


# ---- sweep test kinds ----------------------------------------------------------------------------------------------
def _int_param(params: dict, name: str, default: int) -> int:
    v = params.get(name, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise QualityError(f"test parameter {name}={v!r} must be an int")
    return v


_COMMON_DOC = ("quality: deterministic, evaluated once per trial (repetitions ignored); samples_ts = tokens "
               "decoded per second per chunk, incl. copying the logits out")


def perplexity_test(lm, test, repetitions: int = 1) -> dict:
    """Sweep test kind: Test("kit.quality:perplexity_test", params={"n_ctx": 256, "n_chunks": 8, "n_batch": None})."""

    p = dict(test.params or {})
    unknown = set(p) - {"n_ctx", "n_chunks", "n_batch", "max_chars"}
    if unknown:
        raise QualityError(f"unknown perplexity_test parameter(s): {sorted(unknown)}")
    n_ctx = _int_param(p, "n_ctx", DEFAULT_N_CTX)
    n_chunks = _int_param(p, "n_chunks", DEFAULT_N_CHUNKS)
    text = heldout_text(p.get("max_chars"))
    row = perplexity(lm, text, n_ctx=n_ctx, n_chunks=n_chunks, n_batch=p.get("n_batch"))
    row.update(n_prompt=test.n_prompt, n_gen=0, n_depth=0, repetitions=1,
               **{k: v for k, v in summarize(row["samples_ts"]).items()},
               timed_region=_COMMON_DOC)
    return row


def kld_test(lm, test, repetitions: int = 1) -> dict:
    """Sweep test kind: KLD / top-1 agreement / PPL against a reference file (written here if missing, see module doc).

    params: reference_logits (path, required), reference_sha256 (optional: only this model may write the file),
    n_ctx, n_chunks (used when writing; checked against an existing file), n_batch, create (default True).
    """

    p = dict(test.params or {})
    unknown = set(p) - {"reference_logits", "reference_sha256", "n_ctx", "n_chunks", "n_batch", "create"}
    if unknown:
        raise QualityError(f"unknown kld_test parameter(s): {sorted(unknown)}")
    if not p.get("reference_logits"):
        raise QualityError("kld_test needs params['reference_logits'] (a path to the reference .npz)")
    path = Path(p["reference_logits"])
    n_ctx = _int_param(p, "n_ctx", DEFAULT_N_CTX)
    n_chunks = _int_param(p, "n_chunks", DEFAULT_N_CHUNKS)
    want_sha = p.get("reference_sha256")
    if path.exists():
        meta = read_reference(path)["meta"]
        if "n_ctx" in p and meta["n_ctx"] != n_ctx or "n_chunks" in p and meta["n_chunks"] != n_chunks:
            raise QualityError(f"{path} holds n_ctx={meta['n_ctx']} x {meta['n_chunks']} chunks; the test asks "
                               f"for {n_ctx} x {n_chunks}")
        if want_sha and meta["model_sha256"] != want_sha:
            raise QualityError(f"{path} was written by model {meta['model_sha256'][:16]}, not the requested "
                               f"reference {want_sha[:16]}")
        row = kl_divergence(lm, path, n_batch=p.get("n_batch"))
    else:
        sha = _model_sha(lm)
        if not p.get("create", True) or (want_sha and sha != want_sha):
            raise QualityError(f"{path}: no reference log-probs yet; run the reference model "
                               f"({(want_sha or '?')[:16]}) first, e.g. as the first configuration of the sweep")
        row = write_reference(lm, path, n_ctx=n_ctx, n_chunks=n_chunks, n_batch=p.get("n_batch"))
    row.update(n_prompt=test.n_prompt, n_gen=0, n_depth=0, repetitions=1, **summarize(row["samples_ts"]),
               timed_region=_COMMON_DOC)
    return row


def ppl_test(n_ctx: int = DEFAULT_N_CTX, n_chunks: int = DEFAULT_N_CHUNKS, n_batch: int | None = None):
    """A perplexity Test; n_prompt = n_ctx so the sweep checks before any trial that the chunk fits the context."""

    params = {"n_ctx": n_ctx, "n_chunks": n_chunks}
    if n_batch:
        params["n_batch"] = n_batch
    return Test("kit.quality:perplexity_test", n_prompt=n_ctx, params=params)


def kld_test_for(reference_logits: str | os.PathLike, n_ctx: int = DEFAULT_N_CTX, n_chunks: int = DEFAULT_N_CHUNKS,
                 reference_sha256: str | None = None, n_batch: int | None = None):
    """A KLD Test against `reference_logits` (made absolute: trials run in the repository root)."""

    params = {"reference_logits": str(Path(reference_logits).resolve()), "n_ctx": n_ctx, "n_chunks": n_chunks}
    if reference_sha256:
        params["reference_sha256"] = reference_sha256
    if n_batch:
        params["n_batch"] = n_batch
    return Test("kit.quality:kld_test", n_prompt=n_ctx, params=params)
