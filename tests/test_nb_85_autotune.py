"""Notebook 85 (auto-tune, profiles) headless with quick.json's smoke parameters, through conftest's run_notebook."""
import json

import pytest

from kit import Settings
from kit.results import read_rows
from kit.studies.autotune.profiles import REQUEST_KIND
from kit.verdicts import NOT_TESTABLE, decide, verdicts_by_claim


@pytest.mark.notebook
def test_85_writes_verdicts_profiles_and_figure(run_notebook, tmp_path):
    run = run_notebook("85_autotune", profiles_dir=str(tmp_path / "profiles"))
    d = run.out
    vs = verdicts_by_claim(d)
    assert set(vs) == {"X1", "X2", "X3", "X4"}
    # the labels follow kit.verdicts' one rule on each verdict's own interval
    x1, x3, x4 = vs["X1"], vs["X3"], vs["X4"]
    assert x1["verdict"] == decide(x1["ci_low"], x1["ci_high"], claimed="better", higher_is_better=False)
    assert x3["verdict"] == decide(x3["ci_low"], x3["ci_high"], claimed="better", higher_is_better=False)
    assert x4["verdict"] == decide(x4["ci_low"], x4["ci_high"], claimed="worse", higher_is_better=False)
    # the guide's speed profile packs 3 chunks (rag_search_k) against the quality profile's 8: shorter prompts,
    # faster requests
    prof = x1["details"]["profiles"]
    assert prof["speed"]["prompt_tokens"] < prof["balanced"]["prompt_tokens"] <= prof["quality"]["prompt_tokens"]
    assert x1["effect"] < 1
    # q4_0 KV was screened, and its paired perplexity chunks say what it costs
    assert "q4_0" in x4["metric"] and x4["effect"] > 1 and x4["n_candidate"] == 3
    x2 = vs["X2"]
    assert x2["verdict"] == NOT_TESTABLE or 0.2 < x2["effect"] < 5
    assert (d / "figures" / "autotune_profiles.png").stat().st_size > 10_000
    assert all(e.startswith("85_autotune/") for e in x3["evidence"])
    tune = json.loads((d / "autotune.json").read_text())
    assert tune["confirmed"] and all(c["status"] == "ok" and c["score_s"] > 0 for c in tune["confirmed"])
    for name in ("speed", "balanced", "quality"):
        p = tmp_path / "profiles" / f"{name}.env"
        s = Settings.from_dotenv(p)
        assert s.n_ctx >= s.max_context_length
        assert "tokens/s" in p.read_text() and "trial_key" in p.read_text()
    req = [r for r in read_rows(d / "results.jsonl") if r.get("test_kind") == REQUEST_KIND]
    assert len(req) == 7 and all(r["status"] == "ok" for r in req)  # baseline, 3 guide, 3 kit profiles
    assert all(r["ttft_ms"] > 0 and r["median_ts"] > 0 and len(r["samples_e2e_ms"]) == 3 for r in req)
