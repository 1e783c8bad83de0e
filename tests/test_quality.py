"""kit.quality: perplexity and KL divergence as llama-perplexity computes them, on the bundled model."""
import json
import math

import numpy as np
import pytest

from kit import quality as q
from kit.config import Settings
from kit.measure import Test, load_model
from kit.models import model_card

N_CTX, N_CHUNKS = 64, 2
N_SCORED = N_CHUNKS * (N_CTX - 1 - N_CTX // 2)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    m = load_model(Settings(n_ctx=128), log_file=str(tmp_path_factory.mktemp("log") / "llama.log"))
    yield m
    m.close()


@pytest.fixture(scope="module")
def reference(lm, tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "ref.npz"
    row = q.write_reference(lm, path, n_ctx=N_CTX, n_chunks=N_CHUNKS)
    return path, row


def test_heldout_text_is_deterministic_and_sorted():
    from pydoc_data import topics

    t = q.heldout_text()
    assert t == q.heldout_text()
    first = sorted(topics.topics)[0]
    assert t.startswith(topics.topics[first])
    assert q.heldout_text(100) == t[:100]
    assert len(t) > 100_000


def test_logprob_encoding_round_trip_error_is_bounded():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((5, 1000)) * 4).astype(np.float32)
    qv, scale, mn = q.encode_logprobs(logits)
    lp = q.decode_logprobs(qv, scale, mn)
    exact = logits - (logits.max(1, keepdims=True) + np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)))
    inside = logits > (logits.max(1, keepdims=True) - q.LOGIT_RANGE)
    err = np.abs(lp - exact)[inside]
    assert err.max() < 16 / 65535  # half a step plus float32 rounding
    assert qv.dtype == np.uint16


def test_perplexity_is_plausible_and_independent_of_n_batch(lm):
    r = q.perplexity(lm, n_ctx=N_CTX, n_chunks=N_CHUNKS)
    assert r["n_tokens_scored"] == N_SCORED and r["n_chunks"] == N_CHUNKS and r["first"] == N_CTX // 2
    assert 1.0 < r["ppl"] < 1000.0, r
    assert r["ppl_stderr"] > 0 and math.isclose(r["ppl"], math.exp(r["nll_mean"]), rel_tol=1e-5)
    assert len(r["chunk_nll"]) == N_CHUNKS and len(r["samples_ts"]) == N_CHUNKS
    split = q.perplexity(lm, n_ctx=N_CTX, n_chunks=N_CHUNKS, n_batch=16)
    assert split["n_batch"] == 16
    assert abs(split["nll_mean"] - r["nll_mean"]) < 1e-3


def test_chunk_larger_than_context_is_refused(lm):
    with pytest.raises(q.QualityError, match="exceeds the loaded context"):
        q.perplexity(lm, n_ctx=1024, n_chunks=1)  # llama.cpp pads the loaded 128 to 256


def test_reference_file_is_open_and_self_kld_is_zero(lm, reference):
    path, row = reference
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        assert z["logprob_q"].shape == (N_SCORED, meta["n_vocab"]) and z["logprob_q"].dtype == np.uint16
        assert z["tokens"].shape == (N_CTX * N_CHUNKS,)
    assert meta["model_sha256"] == model_card("smollm2-135m").sha256
    # the same logits, encoded: zero up to the encoding's rounding
    assert abs(row["kld_mean"]) < 1e-5 and row["top1_agree_pct"] == 100.0
    # a fresh evaluation of the same model against the file (llama-perplexity --kl-divergence on itself)
    again = q.kl_divergence(lm, path)
    assert again["is_reference"] is True and again["n_tokens_scored"] == N_SCORED
    assert abs(again["kld_mean"]) < 1e-5 and again["kld_p99"] < 1e-3
    assert again["top1_agree_pct"] == 100.0 and again["top1_agree_stderr_pct"] == 0.0
    assert abs(again["ln_ppl_ratio"]) < 1e-4
    assert math.isclose(again["ppl"], again["ppl_base"], rel_tol=1e-4)
    plain = q.perplexity(lm, n_ctx=N_CTX, n_chunks=N_CHUNKS)
    assert math.isclose(again["ppl"], plain["ppl"], rel_tol=1e-5)


def test_a_different_model_diverges_from_the_reference(reference, tmp_path):
    path, _ = reference
    # the same weights with a wrong RoPE base: a clearly different distribution, same vocabulary
    other = load_model(Settings(n_ctx=128, rope_freq_base=1000.0), log_file=str(tmp_path / "llama.log"))
    try:
        r = q.kl_divergence(other, path)
    finally:
        other.close()
    assert r["kld_mean"] > 3 * max(r["kld_stderr"], 1e-6) and r["kld_mean"] > 1e-3
    assert r["kld_p99"] >= r["kld_median"] >= 0
    assert r["top1_agree_pct"] < 100.0 and r["top1_agree_stderr_pct"] > 0
    assert r["ppl"] != r["ppl_base"]


def test_missing_reference_is_explained(lm, tmp_path):
    t = Test("kit.quality:kld_test", params={"reference_logits": str(tmp_path / "none.npz"), "create": False})
    with pytest.raises(q.QualityError, match="run the reference"):
        q.kld_test(lm, t)
    with pytest.raises(q.QualityError, match="unknown"):
        q.perplexity_test(lm, Test("kit.quality:perplexity_test", params={"n_chunk": 2}))


def test_sweep_kinds_reference_first_then_candidate(tmp_path):
    from kit.sweep import run_sweep

    ref = tmp_path / "cache" / "ref.npz"
    sha = model_card("smollm2-135m").sha256
    tests = [q.ppl_test(N_CTX, N_CHUNKS), q.kld_test_for(ref, N_CTX, N_CHUNKS)]
    configs = [Settings(n_ctx=128), Settings(n_ctx=128, rope_freq_base=1000.0)]
    df = run_sweep("quality_smoke", configs, tests, repetitions=1, out_root=tmp_path, progress=False)
    assert (df["status"] == "ok").all(), df[["status", "error"]]
    assert ref.exists()
    kl = df[df["test_kind"] == "kit.quality:kld_test"].reset_index(drop=True)
    assert kl.loc[0, "is_reference"] and kl.loc[0, "reference_sha256"] == sha
    assert abs(kl.loc[0, "kld_mean"]) < 1e-5 and kl.loc[0, "top1_agree_pct"] == 100.0
    assert kl.loc[1, "kld_mean"] > 1e-3 and kl.loc[1, "top1_agree_pct"] < 100.0
    pp = df[df["test_kind"] == "kit.quality:perplexity_test"].reset_index(drop=True)
    assert set(["ppl", "ppl_stderr", "nll_mean", "n_tokens_scored", "n_chunks", "avg_ts"]) <= set(pp.columns)
    assert pp.loc[0, "n_tokens_scored"] == N_SCORED
    assert math.isclose(pp.loc[0, "ppl"], kl.loc[0, "ppl"], rel_tol=1e-5)
