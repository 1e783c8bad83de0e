"""Notebook 85 (auto-tune, profiles) headless with quick.json's smoke parameters, through conftest's run_notebook."""
import json

import pytest

from kit import Settings
from kit.results import read_rows
from kit.studies.autotune.profiles import REQUEST_KIND
from kit.verdicts import NOT_TESTABLE, SUPPORTED, VERDICTS, decide, verdicts_by_claim


@pytest.mark.notebook
def test_85_writes_verdicts_profiles_and_figure(run_notebook, tmp_path):
    run = run_notebook("85_autotune", profiles_dir=str(tmp_path / "profiles"))
    d = run.out
    vs = verdicts_by_claim(d)
    assert set(vs) == {"X1", "X2", "X3", "X4"}
    # X1 and X3 follow kit.verdicts' one rule on their own interval and the claim's band
    x1, x3 = vs["X1"], vs["X3"]
    for v in (x1, x3):
        assert v["band"] == 0.05
        assert v["verdict"] == decide(v["ci_low"], v["ci_high"], claimed="better", higher_is_better=False,
                                      equivalence=v["band"])
    # the guide's speed profile packs 3 chunks (rag_search_k) against the quality profile's 8: shorter prompts
    prof = x1["details"]["profiles"]
    assert prof["speed"]["prompt_tokens"] < prof["balanced"]["prompt_tokens"] <= prof["quality"]["prompt_tokens"]
    # X2: one sub-verdict per metric against the guide's ratio, the prompt tokens and the recall the smaller k costs
    x2 = vs["X2"]
    cond = {c["condition"]: c for c in x2["conditions"]}
    assert set(cond) == {"decode tokens/s", "TTFT", "end-to-end time", "RAG search time"}
    assert x2["depends_on"] == "metric" and all(c["verdict"] in VERDICTS for c in cond.values())
    assert cond["TTFT"]["details"]["claimed_ratio"] == 0.5
    assert cond["decode tokens/s"]["details"]["claimed_ratio"] == 1.5
    tokens = x2["details"]["attribution"]["prompt_tokens"]
    assert tokens["tuned"] < tokens["baseline"]  # k 3 against 8
    rec = x2["details"]["recall"]
    assert (rec["k_small"], rec["k_large"]) == (3, 8) and rec["recall_small"] <= rec["recall_large"]
    assert "tokens" in x2["summary"] and "recall@3" in x2["summary"]
    # X4: the tuner again, from the largest configuration measured, under limits derived from the measurements; both
    # bind here (the guide's 8192-token context holds far more memory than 512, and q4_0 / the guide's RoPE base
    # cost perplexity), both refused
    x4 = vs["X4"]
    c4 = {c["condition"]: c for c in x4["conditions"]}
    assert set(c4) == {"memory limit", "quality floor"}
    assert c4["memory limit"]["verdict"] == SUPPORTED and "MB" in c4["memory limit"]["summary"], c4["memory limit"]
    assert c4["quality floor"]["verdict"] == SUPPORTED and c4["quality floor"]["effect"] > 1, c4["quality floor"]
    assert x4["verdict"] == SUPPORTED and x4["details"]["refusals"]
    tune = json.loads((d / "autotune.json").read_text())
    assert tune["confirmed"] and all(c["status"] == "ok" and c["score_s"] > 0 for c in tune["confirmed"])
    assert all(x["taken"] == (x["verdict"] == SUPPORTED) for x in tune["decisions"])
    # adaptive confirmation (quick.json: at most 2 blocks of 3 repetitions): a contender and the start that ran a
    # second block carry both blocks' samples, and every comparison is at the Bonferroni confidence of 2 looks
    assert tune["confirm_looks"] == 2 and tune["confidence"] == pytest.approx(0.975)
    assert all(len(c["samples_request_s"]) == 3 * c["looks"] and c["looks"] in (1, 2) for c in tune["confirmed"])
    assert x3["confidence"] == pytest.approx(0.975) and x3["details"]["confirm_looks_planned"] == 2
    lim = json.loads((d / "autotune_x4.json").read_text())["constraints"]
    assert lim["ram_limit_mb"] == x4["details"]["limits"]["ram_limit_mb"]
    assert x3["verdict"] != NOT_TESTABLE and all(e.startswith("85_autotune/") for e in x3["evidence"])
    assert (d / "figures" / "autotune_profiles.png").stat().st_size > 10_000
    assert json.loads((d / "retrieval.json").read_text())["ks"] == [3, 8]
    for name in ("speed", "balanced", "quality"):
        p = tmp_path / "profiles" / f"{name}.env"
        s = Settings.from_dotenv(p)
        assert s.n_ctx >= s.max_context_length
        text = p.read_text()
        assert "tokens/s" in text and "trial_key" in text and "within noise of the winner" in text
    req = [r for r in read_rows(d / "results.jsonl") if r.get("test_kind") == REQUEST_KIND]
    assert len(req) == 7 and all(r["status"] == "ok" for r in req)  # baseline, 3 guide, 3 kit profiles
    assert all(r["ttft_ms"] > 0 and r["median_ts"] > 0 and len(r["samples_e2e_ms"]) == 3 for r in req)
