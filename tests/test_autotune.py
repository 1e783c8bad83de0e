"""kit.studies.autotune on the bundled model: real screening with tiny grids and few repetitions.

The tuner must respect a memory limit and a quality floor, log what it refused with the numbers, keep its current
settings unless a change is measured beyond X3's band (the stability rule), and the profiles it writes must use
the guide's LLAMACPP_* names, read back with Settings.from_dotenv and follow from the winner alone.
"""
import dataclasses
from pathlib import Path

import pytest

from kit import Settings, verdicts
from kit.config import StudyConfigError, read_dotenv
from kit.gpu import build_supports_gpu_offload
from kit.models import model_card
from kit.paths import DEFAULT_MODEL, GUIDE_PROFILES_DIR
from kit.results import append_rows, read_rows
from kit.search import NOT_TESTABLE_NO_OFFLOAD
from kit.studies import autotune
from kit.sweep import run_sweep

GUIDE = Path("/work/shared/seed/llm-optimization-guide.ru.md")


def test_guide_profiles_are_verbatim_and_load():
    for name in autotune.GUIDE_PROFILE_NAMES:
        text = (GUIDE_PROFILES_DIR / f"{name}.env").read_text()
        assert all(line.startswith("LLAMACPP_") for line in text.splitlines())
        if GUIDE.exists():  # the guide's "Готовые профили" section holds exactly these lines
            assert text.strip() in GUIDE.read_text()
        s, notes = autotune.load_guide_profile(name, DEFAULT_MODEL)
        assert s.n_ctx in (2048, 4096, 8192) and s.n_gpu_layers in (30, 35, 40)
        if not build_supports_gpu_offload():
            assert any("accepted and ignored" in n for n in notes)
    q, notes = autotune.load_guide_profile("quality", DEFAULT_MODEL)
    assert q.n_batch == 256 and q.n_ubatch == 256 and any("clamps" in n for n in notes)


def test_config_validation():
    with pytest.raises(StudyConfigError, match="kv_type"):
        autotune.AutotuneStudy(kv_type=["q3_x"])
    with pytest.raises(StudyConfigError, match="max_ppl_ratio"):
        autotune.AutotuneStudy(max_ppl_ratio=0.9)
    with pytest.raises(StudyConfigError, match="n_prompt"):
        autotune.AutotuneStudy(n_prompt=0)
    with pytest.raises(StudyConfigError, match="repetitions"):
        autotune.AutotuneStudy(repetitions="abc")
    with pytest.raises(StudyConfigError, match="flash_attn"):
        autotune.AutotuneStudy(flash_attn=[0, 1])
    with pytest.raises(StudyConfigError, match="rope_freq_base"):
        autotune.AutotuneStudy(rope_freq_base=[0.0])


def test_config_builds_what_the_tuner_takes():
    study = autotune.AutotuneStudy(ram_limit_mb=0.0, vram_limit_mb=2048.0, threads=[])
    cons = study.constraints()
    assert cons.ram_limit_mb is None and cons.vram_limit_mb == 2048.0  # 0 = no limit
    assert study.space().threads  # empty = half the CPUs and all of them
    kw = study.tuner_kwargs()
    assert kw["study"] == "85_autotune" and kw["out_root"].is_absolute() and kw["confirm_top"] == 1
    assert study.request().params == {"n_questions": 1, "chunk_chars": 400}
    assert study.space().rope_freq_base == [10000.0]  # the guide's override, screened as a quality change
    topics = autotune.AutotuneStudy(corpus_topics=["pass", "while"]).request().params["corpus_topics"]
    assert topics == ["pass", "while"]
    assert study.space().only(["n_ctx"]).n_batch == [] and not study.space().only(["n_ctx"]).gpu_layers


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    out = tmp_path_factory.mktemp("tune")
    start = Settings(n_ctx=512, n_batch=128, n_ubatch=128, n_threads=2, n_threads_batch=2)
    work = autotune.Workload(n_prompt=32, n_gen=8, ppl_chunks=3, ppl_chunk_tokens=256)
    # measure the start point first (the tuner reuses this very trial as its reference): its memory sets a
    # limit that an 8192-token KV cache (about 190 MB more) cannot meet
    df = run_sweep("tune", start, work.speed_tests() + [work.quality_test()], repetitions=1, out_root=out,
                   progress=False)
    assert (df["status"] == "ok").all(), df[["status", "error"]]
    # the tuner judges memory on the speed tests' rows (the perplexity test holds logits on top)
    rss0 = float(df[df["test_kind"].isin(["pp", "tg"])]["rss_peak_mb"].max())
    cons = autotune.Constraints(ram_limit_mb=rss0 + 60, vram_limit_mb=None, max_ppl_ratio=1.01)
    # n_batch 64 against 128 on a 32-token prompt: one batch either way, the same work (nothing to take)
    space = autotune.SearchSpace(threads=[2], n_batch=[64, 128], n_ubatch=[], flash_attn=[], kv_type=["f16", "q4_0"],
                                 n_ctx=[512, 8192], rope_freq_base=[10000.0])
    kw = dict(study="tune", out_root=out, workload=work, screen_repetitions=1, repetitions=3, min_gain=0.03,
              progress=False)
    res = autotune.benchmark_settings(DEFAULT_MODEL, start=start, space=space, constraints=cons, confirm_top=1,
                                      **kw)
    limits = autotune.x4_limits(res, 1.01)
    x4 = autotune.constrained_run(res, limits, model=DEFAULT_MODEL, space=space,
                                  **{k: v for k, v in kw.items() if k != "workload"})
    return res, out, rss0, x4, limits


def test_tuner_refuses_quality_and_memory_violations(tuned):
    res, out, rss0, _, _ = tuned
    quality = [r for r in res.refusals if r["reason"] == "quality"]
    memory = [r for r in res.refusals if r["reason"] == "memory"]
    assert quality, res.refusals
    q = {r["change"].get("type_v") or r["change"].get("rope_freq_base"): r for r in quality}
    assert q["q4_0"]["ppl_ratio"] > 1.01 and q["q4_0"]["max_ppl_ratio"] == 1.01
    assert q[10000.0]["ppl_ratio"] > 1.01  # the guide's RoPE base on a model trained with its own
    assert all("perplexity" in r["detail"] and r["trial_keys"] for r in quality)
    assert memory, res.refusals
    m = memory[0]
    assert m["change"] == {"n_ctx": 8192} and m["rss_peak_mb"] > m["ram_limit_mb"] == pytest.approx(rss0 + 60)
    # the choice respects both
    assert res.best.type_v == "f16" and res.best.n_ctx == 512 and res.best.rope_freq_base is None
    best = res.confirmed_for(res.best)
    assert best is not None and best.status == "ok" and best.rss_peak_mb <= rss0 + 60
    assert best.score_s > 0 and best.pp_ts > 0 and best.tg_ts > 0
    assert res.reference_ppl and 1 < res.reference_ppl < 1000
    assert res.save().exists()


def test_stability_rule_on_real_samples(tuned):
    res, _, _, _, _ = tuned
    start = res.confirmed_for(res.start).samples_request_s
    assert len(start) == 3
    same = autotune.beats(start, start)  # one configuration against itself: never a reason to move
    assert same.verdict in (verdicts.NO_EFFECT, verdicts.INCONCLUSIVE) and same.effect == 1
    # every sample 10 % below the fastest one measured: faster beyond doubt, whatever this machine's spread
    spread = max(start) / min(start)
    assert autotune.beats([x / spread * 0.9 for x in start], start).verdict == verdicts.SUPPORTED
    assert autotune.beats([x * spread * 1.1 for x in start], start).verdict == verdicts.REFUTED
    assert autotune.beats(start[:2], start).verdict == verdicts.NOT_TESTABLE  # too few samples: never move
    assert same.band == verdicts.band_of("X3").width


def test_tuner_moves_only_on_a_supported_comparison(tuned):
    res, _, _, _, _ = tuned
    # every change it took was labelled supported, every one it left was not; nothing else moved
    for d in res.decisions:
        assert d["taken"] == (d["verdict"] == verdicts.SUPPORTED), d
        assert d["n"] == 3 and d["ci_low"] <= d["effect"] <= d["ci_high"]
    for step in res.steps:  # the start is within every limit here, so only a decision moves it
        assert step["changed"] == bool(step["decision"] and step["decision"]["taken"]), step
    # the winner is the start unless the confirmation measured it beaten beyond the band
    start = res.confirmed_for(res.start)
    if res.kept_start:
        assert res.best == res.start and "no contender beat the start" in res.why_best
    else:
        win = res.confirmed_for(res.best)
        assert autotune.beats(win.samples_request_s, start.samples_request_s).verdict == verdicts.SUPPORTED
    # n_batch 64 vs 128 on a 32-token prompt is the same work: the tuner keeps the start's 128
    assert res.best.n_batch == 128
    assert all(w["verdict"] in (verdicts.NO_EFFECT, verdicts.INCONCLUSIVE) for w in res.within_noise)


def test_x4_limits_derive_from_the_measurements_and_bind(tuned):
    res, _, _, x4, limits = tuned
    rss = [c.rss_peak_mb for c in res.screened + res.confirmed if c.rss_peak_mb is not None]
    levels = sorted({round(x) for x in rss})
    below, above = max(zip(levels, levels[1:]), key=lambda g: g[1] - g[0])
    assert limits["ram_limit_mb"] == pytest.approx((below + above) / 2, abs=0.1)
    # the limit sits in the widest gap between footprints: no configuration within a few MB of it
    assert min(abs(x - limits["ram_limit_mb"]) for x in rss) >= (above - below) / 2 - 1
    assert limits["max_ppl_ratio"] == 1.01  # the floor given: q4_0 and the RoPE override exceed it
    # the constrained run starts at the largest configuration measured (over the limit by construction, so it must
    # move) and screens KV type, RoPE base and n_ctx only
    largest = max((c for c in res.screened + res.confirmed if c.rss_peak_mb is not None), key=lambda c: c.rss_peak_mb)
    assert x4.start == largest.settings == autotune.x4_start(res, limits) and largest.rss_peak_mb > limits["ram_limit_mb"]
    assert {s["axis"] for s in x4.steps} <= {"kv_type", "rope_freq_base", "n_ctx"}
    assert x4.candidate_for(x4.best).rss_peak_mb <= limits["ram_limit_mb"] and x4.best != x4.start
    over = [c for c in x4.screened + x4.confirmed if c.rss_peak_mb and c.rss_peak_mb > limits["ram_limit_mb"]]
    assert over, "the limit must bind on something measured"
    assert all(c.settings != x4.best for c in over)
    mem = autotune.memory_condition(x4, limits)
    assert mem.verdict == verdicts.SUPPORTED and f"{limits['ram_limit_mb']:.0f} MB" in mem.summary
    assert any(r["reason"] == "memory" for r in x4.refusals)
    qual = autotune.quality_condition(x4, limits)
    assert qual.verdict == verdicts.SUPPORTED and qual.effect > 1.01 and qual.ci_low <= qual.effect <= qual.ci_high
    v = autotune.x4_verdict(x4, limits)
    assert v.verdict == verdicts.SUPPORTED and {c["condition"] for c in v.conditions} == {"memory limit",
                                                                                          "quality floor"}
    # a run whose configurations share one memory footprint leaves no room for a limit: not testable, no claim
    flat = dataclasses.replace(res, screened=res.screened[:1], confirmed=[])
    none = autotune.x4_limits(flat, 1.01)
    assert none["ram_limit_mb"] is None and "no limit can bind" in none["ram_why"]
    assert autotune.memory_condition(x4, none).verdict == verdicts.NOT_TESTABLE
    assert autotune.x4_start(res, none) == res.best  # no memory limit: from the winner
    # a floor above every candidate's ratio binds on nothing: not testable, with the largest ratio
    loose = {**limits, "max_ppl_ratio": 1e6}
    assert autotune.quality_condition(x4, loose).verdict == verdicts.NOT_TESTABLE


def test_gpu_layers_search_on_this_build(tuned):
    res, _, _, _, _ = tuned
    gpu = res.gpu_layers
    if not build_supports_gpu_offload():
        assert gpu["reason"] == NOT_TESTABLE_NO_OFFLOAD and not gpu["probes"] and not gpu["testable"]
        assert res.best.n_gpu_layers == 0 and res.start.n_gpu_layers == 0
    elif gpu["testable"]:  # an offloading build with a visible GPU: real probes, and the search starts there
        assert gpu["probes"] and 0 <= gpu["best_n_gpu_layers"] <= model_card(DEFAULT_MODEL).n_layers + 1
        assert res.screened[0].settings.n_gpu_layers == gpu["best_n_gpu_layers"]
    else:  # an offloading build that sees no NVIDIA GPU: nothing probed, and it says why
        assert gpu["reason"].startswith("not testable here") and not gpu["probes"]
        assert res.start.n_gpu_layers == 0


def test_verdict_x3(tuned):
    res, _, _, _, _ = tuned
    x3 = autotune.x3_verdict(res)
    assert x3.verdict != verdicts.NOT_TESTABLE, x3.reason
    assert x3.verdict == verdicts.decide(x3.ci_low, x3.ci_high, claimed="better", higher_is_better=False,
                                         equivalence=verdicts.band_of("X3").width)
    assert x3.details["steps"] == res.steps and x3.details["kept_start"] == res.kept_start
    if res.kept_start:  # the best contender against the start; a kept start is never "supported"
        assert "kept the guide's good settings" in x3.summary and x3.verdict != verdicts.SUPPORTED


def test_profiles_follow_the_winner_and_roundtrip(tuned, tmp_path):
    res, _, _, _, _ = tuned
    guide = {n: s for n, (s, _) in autotune.load_guide_profiles(DEFAULT_MODEL).items()}
    profiles, why = autotune.choose_kit_profiles(res, guide, rag_floor=None)
    again, _ = autotune.choose_kit_profiles(res, guide, rag_floor=None)
    assert again == profiles  # from the winner alone: no second pick by speed
    assert profiles["speed"].type_v == "f16"  # the q4_0 cache was refused for quality
    engine = {k: getattr(res.best, k) for k in ("n_threads", "n_batch", "n_ubatch", "flash_attn", "type_k")}
    for name, s in profiles.items():
        assert {k: getattr(s, k) for k in engine} == engine
        assert s.n_ctx >= s.max_context_length  # the RAG budget fits
    paths = autotune.write_kit_profiles(profiles, {}, res, why, tmp_path / "profiles")
    for name, p in paths.items():
        text = p.read_text()
        assert text.startswith("# kit profile")
        assert "trial_key" in text and "perplexity" in text
        assert "# tuner winner:" in text and "# within noise of the winner" in text
        env = read_dotenv(p)
        assert env and all(k.startswith("LLAMACPP_") for k in env)
        assert "LLAMACPP_N_CTX" in env and "LLAMACPP_RAG_SEARCH_K" in env
        assert Settings.from_dotenv(p) == profiles[name]


def test_profiles_differing_only_in_sampling_share_the_engine_rows(tmp_path):
    base = Settings(n_ctx=512, rag_search_k=2, max_context_length=200)
    profiles = {"a": base.replace(temperature=0.1), "b": base.replace(temperature=0.3),
                "c": base.replace(n_batch=256, n_ubatch=256)}
    work = autotune.Workload(n_prompt=32, n_gen=8, ppl_chunks=1, ppl_chunk_tokens=64)
    m = autotune.measure_profiles(profiles, study="prof", out_root=tmp_path, repetitions=1, workload=work,
                                  request=autotune.rag_request(max_tokens=4, n_questions=1, chunk_chars=200),
                                  progress=False)
    assert [m[n]["engine_from"] for n in "abc"] == ["a", "a", "c"]
    req = m["a"]["request"]
    # the RAG pipeline packed 2 chunks (rag_search_k) of the gold topic within the 200-token budget
    assert 0 < req["rag_context_tokens"] <= 200 and req["rag_chunks_in_context"] >= 1
    assert req["n_prompt"] > req["rag_context_tokens"] and req["n_requests"] == 1
    assert req["samples_ttft_ms"] and req["ttft_ms"] > 0 and req["e2e_ms"] >= req["ttft_ms"]
    assert m["b"]["pp"]["trial_key"] == m["a"]["pp"]["trial_key"] != m["c"]["pp"]["trial_key"]
    assert m["b"]["request"]["trial_key"] != m["a"]["request"]["trial_key"]
    assert all(m[n][t]["status"] == "ok" for n in "abc" for t in ("pp", "tg", "request"))
    rows = read_rows(tmp_path / "prof" / "results.jsonl")
    assert len(rows) == 2 * 2 + 3  # engine pp/tg for a and c only; a request row for each profile
    assert "profile 'a'" in autotune.profile_header("b", m["b"], "test")
    # engine rows already in the study for the same load settings (and enough repetitions) are used, not remeasured
    again = autotune.measure_profiles({"d": base.replace(temperature=0.7)}, study="prof", out_root=tmp_path,
                                      repetitions=1, workload=work,
                                      request=autotune.rag_request(max_tokens=4, n_questions=1, chunk_chars=200),
                                      progress=False)
    assert again["d"]["pp"]["trial_key"] == m["a"]["pp"]["trial_key"]
    assert len(read_rows(tmp_path / "prof" / "results.jsonl")) == 2 * 2 + 3 + 1
    assert autotune.measured_engine_rows("prof", tmp_path, base, work.speed_tests(), 2) is None  # too few runs


QUICK_TOPICS = ["pass", "continue", "break", "lambda", "while", "if", "else", "yield", "assert", "raise", "with",
                "return"]


def test_retrieval_cost_recall_and_search_time(tmp_path):
    cost = autotune.retrieval_cost([8, 3], chunk_chars=400, cache_dir=tmp_path / "emb", corpus_topics=QUICK_TOPICS,
                                   repetitions=2, n_timed=3)
    assert cost["ks"] == [3, 8] and cost["n_questions"] >= 3 and cost["n_embedded"] == cost["n_chunks"] > 0
    r3, r8 = cost["recall"][3], cost["recall"][8]
    assert len(r3) == len(r8) == cost["n_questions"]
    assert all(b >= a for a, b in zip(r3, r8))  # a gold topic among the top 3 is among the top 8
    assert all(len(cost["search_ms"][k]) == 2 * 3 and min(cost["search_ms"][k]) > 0 for k in (3, 8))
    rc = autotune.recall_cost(cost, 3, 8)
    assert rc["difference"] <= 0 and rc["ci_low"] <= rc["difference"] <= rc["ci_high"]
    again = autotune.retrieval_cost([3, 8], chunk_chars=400, cache_dir=tmp_path / "emb", corpus_topics=QUICK_TOPICS,
                                    repetitions=1, n_timed=1)
    assert again["n_embedded"] == 0 and again["recall"] == cost["recall"]  # the cache: nothing embedded twice
    # the RAG study's rows, where they hold both k values, are read instead of measuring again
    assert autotune.from_rag_study(tmp_path, [3, 8]) is None
    rag = tmp_path / "60_rag"
    rag.mkdir()
    ids = cost["question_ids"]
    append_rows(rag / "retrieval.jsonl", [{"question_id": q, "k": k, "budget": b, "recall_at_k": cost["recall"][k][i]}
                                         for k in (3, 8) for i, q in enumerate(ids) for b in (100, 4000)])
    append_rows(rag / "latency.jsonl", [{"question_id": ids[0], "k": k, "search_ms": x}
                                       for k in (3, 8) for x in cost["search_ms"][k]])
    read = autotune.from_rag_study(tmp_path, [8, 3])
    assert read["recall"] == {k: [float(x) for x in cost["recall"][k]] for k in (3, 8)}  # one row per question
    assert read["search_ms"][3] == cost["search_ms"][3] and "RAG study" in read["source"]
    assert autotune.from_rag_study(tmp_path, [3, 10]) is None  # a k the RAG study did not measure


def _measured(settings: Settings, decode_ms: list[float], ttft: list[float], n_prompt: int, pp_ts: float,
              tg_ts: float) -> dict:
    return {"settings": settings, "pp": {"median_ts": pp_ts}, "tg": {"median_ts": tg_ts},
            "request": {"status": "ok", "samples_decode_ms_per_token": decode_ms, "samples_ttft_ms": ttft,
                        "samples_e2e_ms": [t + 30 * d for t, d in zip(ttft, decode_ms)],
                        "ttft_ms": sorted(ttft)[len(ttft) // 2],
                        "e2e_ms": sorted(t + 30 * d for t, d in zip(ttft, decode_ms))[len(ttft) // 2],
                        "n_prompt": n_prompt, "n_gen_tokens_mean": 30}}


def test_x2_each_metric_against_its_claimed_ratio():
    base_s = Settings(n_ctx=8192)
    tuned_s = base_s.replace(n_threads=2, n_threads_batch=2, flash_attn=True, rag_search_k=3, max_context_length=2000)
    base = _measured(base_s, [20, 20.4, 19.8, 20.2, 20.1], [1000, 1010, 990, 1005, 995], 732, 300, 80)
    # decode x1.10 (short of x1.5), TTFT x0.40 (beyond the claimed x0.5)
    tuned = _measured(tuned_s, [18.2, 18.1, 18.4, 18.0, 18.3], [400, 405, 398, 402, 401], 345, 320, 88)
    search = {8: [10, 10.4, 9.8, 10.1, 10.2], 3: [9.9, 10.1, 10.0, 10.3, 9.7]}
    ret = {"search_ms": search, "recall": {3: [1, 0, 1, 1, 0, 1], 8: [1, 1, 1, 1, 0, 1]}}
    v = autotune.x2_verdict(base, tuned, ret, baseline_k=8, tuned_k=3)
    cond = {c["condition"]: c for c in v.conditions}
    assert set(cond) == {"decode tokens/s", "TTFT", "end-to-end time", "RAG search time"}
    assert cond["decode tokens/s"]["verdict"] == verdicts.REFUTED  # faster, but short of +50 %
    assert cond["decode tokens/s"]["details"]["vs_no_change"]["verdict"] == verdicts.SUPPORTED
    assert cond["TTFT"]["verdict"] == verdicts.SUPPORTED
    assert cond["RAG search time"]["verdict"] == verdicts.REFUTED  # k hardly moves search time
    assert v.verdict == verdicts.MIXED and v.depends_on == "metric"
    att = v.details["attribution"]
    assert att["prompt_tokens"]["ratio"] == pytest.approx(345 / 732, abs=1e-3)
    assert set(att["engine_settings"]) == {"n_threads", "n_threads_batch", "flash_attn"}
    assert set(att["request_settings"]) == {"rag_search_k", "max_context_length"}
    assert v.details["recall"]["recall_small"] < v.details["recall"]["recall_large"]
    assert "345 vs 732 tokens" in v.summary and "recall@3" in v.summary
    table = autotune.x2_ratio_table([v])
    assert list(table["metric"]) == list(cond) and table["claimed"].iloc[1] == 0.5
    # the same k on both sides: search time is not testable, never a claim
    same = autotune.x2_verdict(base, tuned, ret, baseline_k=8, tuned_k=8)
    assert {c["condition"]: c for c in same.conditions}["RAG search time"]["verdict"] == verdicts.NOT_TESTABLE
    # an interval straddling the claimed ratio stays inconclusive, with the samples that would decide it
    mid = _measured(tuned_s, [13.0, 14.5, 12.5, 14.0, 13.3], [500] * 5, 345, 320, 88)
    d = {c["condition"]: c for c in autotune.x2_verdict(base, mid).conditions}["decode tokens/s"]
    assert d["ci_low"] < 1.5 < d["ci_high"] and d["verdict"] == verdicts.INCONCLUSIVE and d["samples_to_decide"]


def test_x1_speed_profile_against_quality_profile():
    def m(e2e):
        return {"request": {"status": "ok", "samples_e2e_ms": e2e}}
    guide = {"speed": m([300, 310, 290, 305]), "balanced": m([600] * 4), "quality": m([900, 910, 890, 905])}
    v = autotune.x1_verdict(guide)
    assert v.verdict == verdicts.SUPPORTED and v.effect < 1 and set(v.details["profiles"]) == set(guide)
    close = autotune.x1_verdict({"speed": m([880, 950, 900, 870]), "quality": m([900, 910, 860, 930])})
    assert close.verdict in (verdicts.NO_EFFECT, verdicts.INCONCLUSIVE) and close.band == 0.05


def test_a_start_over_the_limit_falls_back_to_defaults_within_it(tmp_path):
    """The confirmation's rule where the start breaks the memory limit and the contender, admitted at screening,
    is refused at confirmation (its footprint straddles the limit): llama.cpp's defaults, confirmed beside them
    and within the limit, are the answer, never the start over the limit (run C of 2026-12-08 kept a 390 MB start
    under a 304 MB limit). The measurements are given, so the rule alone is tested."""
    from kit.studies.autotune import tuner

    start, contender, defaults = (Settings(n_ctx=8192, n_batch=1024), Settings(n_ctx=8192, type_k="q8_0",
                                  type_v="q8_0", flash_attn=True), Settings(n_ctx=2048))
    key = tuner.settings_key
    footprint = {key(start): 390.3, key(contender): 304.3, key(defaults): 218.0}
    speed = {key(start): 1.34, key(contender): 1.47, key(defaults): 1.47}

    class Measured(tuner._Tuner):
        def measure(self, configs, stage, axis, changes, reps, **kw):
            return [tuner.Candidate(settings=s, stage=stage, axis=axis, change={}, score_s=speed[key(s)],
                                    rss_peak_mb=footprint[key(s)],
                                    samples_request_s=[speed[key(s)] * f for f in (0.99, 1.0, 1.01, 1.0, 0.995)])
                    for s in configs]

    cons = autotune.Constraints(ram_limit_mb=304.1, vram_limit_mb=None, max_ppl_ratio=None)
    t = Measured("t", str(tmp_path), cons, autotune.Workload(32, 8, 1, 64), 1, 5, 0.05, False)
    cur = tuner.Candidate(settings=contender, stage="screen", axis="kv_type", change={}, score_s=1.45,
                          rss_peak_mb=304.0)
    best, conf, _, why = tuner._confirm(t, cur, start, defaults, 1, [])
    assert best == defaults and "llama.cpp's defaults" in why and "breaks a limit" in why
    assert [r["reason"] for r in t.refusals] == ["memory"]  # the contender, refused at confirmation
    # with no configuration within the limit the tuner says so rather than pretending
    footprint[key(defaults)] = 320.0
    t = Measured("t", str(tmp_path), cons, autotune.Workload(32, 8, 1, 64), 1, 5, 0.05, False)
    best, _, _, why = tuner._confirm(t, cur, start, defaults, 1, [])
    assert best == start and why == "the start breaks a limit and no confirmed configuration is within it"
