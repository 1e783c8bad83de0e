"""One configuration in-process: the prompt cache is reset per request, timing regions agree with llama.cpp."""
import pytest

from kit.config import Settings
from kit.measure import EmptyAnswerError, Test, bench_engine, e2e, load_model, measure_config, pp, stream_chat, tg


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


def test_the_chat_format_in_use_is_read_back(lm):
    # the bundled GGUF carries its template: llama-cpp-python renders it as written
    assert lm.effective["chat_format_effective"] == "chat_template.default"
    assert lm.effective["chat_format_source"] == "gguf"


def test_a_request_that_yields_no_token_is_an_error_naming_the_cause(model_path):
    """llama-2's [INST] turns make this ChatML-trained model end at once: an error, never an ok row of 0 tokens."""
    m = load_model(Settings(n_ctx=256, temperature=0.0, chat_format="llama-2"))
    try:
        with pytest.raises(EmptyAnswerError, match=r"ended at once .* chat format 'llama-2' \(setting\)"):
            stream_chat(m, "Explain in two sentences what a Python generator is.", max_tokens=8)
        out = stream_chat(m, "Explain in two sentences what a Python generator is.", max_tokens=8, allow_empty=True)
        assert out["ttft_ms"] is None and out["text"] == "" and out["finish_reason"] == "stop"
    finally:
        m.close()
    rows = measure_config(Settings(n_ctx=256, temperature=0.0, chat_format="llama-2"), [e2e(8)], repetitions=1)
    assert rows[0]["status"] == "error" and "EmptyAnswerError: the model produced no tokens" in rows[0]["error"]
    assert rows[0]["chat_format_effective"] == "llama-2" and rows[0]["chat_format_source"] == "setting"


def test_engine_depth_and_context_limit(lm):
    r = bench_engine(lm, tg(16, depth=256), repetitions=2)
    assert r["n_depth"] == 256 and len(r["samples_ns"]) == 2 and r["avg_ts"] > 0
    with pytest.raises(ValueError, match="n_ctx=512 is smaller than the test pp600"):
        bench_engine(lm, pp(600), repetitions=1)


def test_test_names_follow_llama_bench():
    assert pp(512).name == "pp512" and tg(128, depth=1024).name == "tg128 @ d1024"
    assert Test("pg", n_prompt=512, n_gen=128).name == "pp512+tg128"
    assert Test("kit.quality:perplexity_test").name == "perplexity_test"
