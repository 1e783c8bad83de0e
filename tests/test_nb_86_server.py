"""Notebook 86 (the deployed server over HTTP) headless with quick.json's smoke parameters, through conftest's
run_notebook; a kit speed profile is written first so that X2 has both sides."""
import json

import pytest

from kit import Settings
from kit.results import read_rows
from kit.verdicts import NOT_TESTABLE, SUPPORTED, VERDICTS, verdicts_by_claim

from test_serve import _server_pids


@pytest.mark.notebook
def test_86_serves_every_profile_and_writes_verdicts(run_notebook, tmp_path):
    kit_dir = tmp_path / "profiles"
    kit_dir.mkdir()
    Settings(n_ctx=1024, n_threads=2, n_threads_batch=2, rag_search_k=3, max_context_length=300,
             temperature=0.1).to_dotenv(kit_dir / "speed.env")
    before = set(_server_pids())
    run = run_notebook("86_server", kit_profiles_dir=str(kit_dir))
    d = run.out
    assert set(_server_pids()) <= before  # every server the notebook started is gone
    vs = verdicts_by_claim(d)
    assert set(vs) == {"X1", "X2", "P1", "R4"} and all(v["verdict"] in VERDICTS for v in vs.values())
    assert all("served" in v["metric"] or "server" in v["summary"] for v in vs.values())
    # X2 on the server: both sides served, each metric against the guide's ratio
    x2 = vs["X2"]
    assert x2["verdict"] != NOT_TESTABLE, x2
    assert {c["condition"] for c in x2["conditions"]} == {"decode tokens/s", "TTFT"}
    # P1 at the server: every successful request carries tokens/s, TTFT, memory and queue time
    assert vs["P1"]["verdict"] == SUPPORTED, vs["P1"]
    # R4: both interrupt modes, and the truncation the default causes, counted
    r4 = vs["R4"]
    trunc = r4["details"]["truncation"]
    assert any("on (the default), 2" in k for k in trunc) and any("off, 2" in k for k in trunc)
    assert all(t["truncated"] == 0 for k, t in trunc.items() if "off" in k)
    rows = read_rows(d / "results.jsonl")
    served = [r for r in rows if r.get("part") == "served"]
    inproc = [r for r in rows if r.get("part") == "in_process"]
    profiles = {"baseline", "guide_speed", "guide_quality", "kit_speed"}
    assert {r["profile"] for r in served} == profiles and {r["profile"] for r in inproc} == profiles
    for r in served:
        assert "server_interrupt_requests" in r and r["timed_region"] and r["llama_cpp_python_version"]
        assert r["status"] == "ok" or r["error"]
    assert {r["level_part"] for r in served} == {"sequential", "concurrency", "rate"}
    # the deploy files of every served profile, and the .env's translation
    for p in profiles:
        cfg = json.loads((d / "deploy" / f"{p}.server.json").read_text())
        assert cfg["host"] == "127.0.0.1" and cfg["models"][0]["model"].endswith(".gguf")
        assert (d / "deploy" / f"{p}.llama-server.sh").exists()
    assert (d / "figures" / "served.png").exists()
    # the served-vs-in-process table and the knee are in the executed notebook
    assert "served_ttft_ms" in run.text and "knee" in run.text
    assert "Traceback" not in run.text
