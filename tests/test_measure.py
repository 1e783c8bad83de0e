"""One configuration in-process: the prompt cache is reset per request, timing regions agree with llama.cpp."""
import pytest

from kit.config import Settings
from kit.measure import Test, bench_engine, load_model, pp, stream_chat, tg


@pytest.fixture(scope="module")
def lm():
    m = load_model(Settings(n_ctx=512, n_batch=512, n_ubatch=256, n_threads=2, n_threads_batch=2,
                            temperature=0.0))
    yield m
    m.close()


def test_every_request_pays_its_prompt_processing(lm):
    """llama-cpp-python reuses a cached prefix; stream_chat resets it, so a repeated prompt is processed again."""
    a = stream_chat(lm, "What is a Python decorator?", max_tokens=8)
    b = stream_chat(lm, "What is a Python decorator?", max_tokens=8)
    assert a["n_prompt_tokens"] == b["n_prompt_tokens"] > 5
    assert a["text"] == b["text"] != ""  # greedy: the same answer both times
    assert b["ttft_ms"] > 0 and b["e2e_ms"] > b["ttft_ms"]
    # without our reset the library would skip the shared prefix
    lm.llm.create_chat_completion(messages=[{"role": "user", "content": "What is a Python decorator?"}],
                                  max_tokens=2, temperature=0.0)
    import llama_cpp

    llama_cpp.llama_perf_context_reset(lm.ctx)
    lm.llm.create_chat_completion(messages=[{"role": "user", "content": "What is a Python decorator?"}],
                                  max_tokens=2, temperature=0.0)
    assert llama_cpp.llama_perf_context(lm.ctx).n_p_eval < a["n_prompt_tokens"]


def test_engine_depth_and_context_limit(lm):
    r = bench_engine(lm, tg(16, depth=256), repetitions=2)
    assert r["n_depth"] == 256 and len(r["samples_ns"]) == 2 and r["avg_ts"] > 0
    with pytest.raises(ValueError, match="n_ctx=512 is smaller than the test pp600"):
        bench_engine(lm, pp(600), repetitions=1)


def test_test_names_follow_llama_bench():
    assert pp(512).name == "pp512" and tg(128, depth=1024).name == "tg128 @ d1024"
    assert Test("pg", n_prompt=512, n_gen=128).name == "pp512+tg128"
    assert Test("kit.quality:perplexity_test").name == "perplexity_test"
