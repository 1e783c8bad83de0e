"""kit.serve on real servers: llama-cpp-python's OpenAI server started by the kit, and small stand-in HTTP servers
for the faults a real server cannot be made to produce on demand (a malformed or cut stream, a non-OpenAI
endpoint, a server that hangs)."""
from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from kit import Settings, serve
from kit.models import write_model_copy
from kit.paths import DEFAULT_MODEL, REPO_ROOT
from kit.results import read_rows
from kit.serve.client import Load, run_load
from kit.serve.server import LlamaCppServer, ServerError, check_endpoint
from kit.studies.server import ServedStudy, level_table, run_served_study

SMALL = Settings(n_ctx=512, n_threads=2, n_threads_batch=2, chat_format="chatml")
MESSAGES = [("p0", [{"role": "user", "content": "Name three colours."}]),
            ("p1", [{"role": "user", "content": "What is a list in Python?"}])]


def _server_pids() -> list[int]:
    """Every llama_cpp.server process on this machine (none may outlive a test)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().split(b"\0")
                state = (d / "stat").read_text().rsplit(") ", 1)[1][0]
            except (OSError, IndexError):
                continue
            if b"llama_cpp.server" in cmd and state != "Z":
                out.append(int(d.name))
    return out


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """One real server (interrupt_requests off) for the tests that only send load."""
    d = tmp_path_factory.mktemp("srv")
    srv = LlamaCppServer(SMALL, d, interrupt_requests=False, name="shared")
    ep = srv.start()
    yield ep, srv
    srv.stop()


def test_translation_names_every_setting_and_the_config_reads_back():
    s = SMALL.replace(type_k="q8_0", type_v="q8_0", flash_attn=True, rope_freq_base=20000.0, temperature=0.1)
    cfg = serve.server_config(s, port=8123, interrupt_requests=False)
    m = cfg["models"][0]
    assert cfg["host"] == "127.0.0.1" and cfg["port"] == 8123 and cfg["interrupt_requests"] is False
    assert m["n_ctx"] == 512 and m["type_k"] == 8 and m["flash_attn"] is True and m["rope_freq_base"] == 20000.0
    assert "temperature" not in m and serve.request_fields(s)["temperature"] == 0.1
    # llama-cpp-python's own settings model accepts the file as written
    from llama_cpp.server.settings import ConfigFileSettings
    parsed = ConfigFileSettings.model_validate_json(json.dumps(cfg))
    assert parsed.models[0].type_k == 8 and parsed.interrupt_requests is False
    rows = {r["env"]: r for r in serve.translation(s)}
    assert set(rows) == set(Settings.env_names().values())
    assert rows["LLAMACPP_TEMPERATURE"]["where"] == "per request"
    assert rows["LLAMACPP_RAG_SEARCH_K"]["where"] == "client side"
    assert rows["LLAMACPP_N_THREADS"]["where"] == "server config"
    cmd, notes = serve.llama_server_command(s, port=9000)
    assert cmd[cmd.index("-c") + 1] == "512" and cmd[cmd.index("-ctk") + 1] == "q8_0"
    assert "--rope-freq-base" in cmd and "--parallel" in cmd and any("LLAMACPP_RAG_SEARCH_K" in n for n in notes)


def test_deploy_files_beside_the_env(tmp_path):
    env = SMALL.to_dotenv(tmp_path / "speed.env")
    out = serve.write_deploy_files(env)
    cfg = json.loads(out["server_config"].read_text())
    assert cfg["models"][0]["n_ctx"] == 512 and cfg["interrupt_requests"] is False and cfg["models"][0]["logits_all"] is False
    assert "llama-server" in out["llama_server"].read_text() and os.access(out["llama_server"], os.X_OK)
    assert out["env_guide_name"].name == ".env.speed"
    assert Settings.from_dotenv(out["env_guide_name"]) == Settings.from_dotenv(env)


def test_a_template_less_model_is_served_with_the_chosen_format(tmp_path):
    bare = write_model_copy(DEFAULT_MODEL, tmp_path / "bare.gguf", chat_template=None)
    cfg = serve.server_config(Settings(model=str(bare)))
    assert cfg["models"][0]["chat_format"] == "chatml"  # not llama-cpp-python's silent llama-2


def test_served_requests_stream_with_finish_reasons(started):
    ep, _ = started
    assert ep.kind == "llama-cpp-python" and ep.alive() and ep.settings["server_interrupt_requests"] is False
    recs, lvl = run_load(ep.base_url, ep.model, MESSAGES, {"max_tokens": 6, "temperature": 0.0},
                         Load("closed", clients=1, requests_per_client=3))
    assert len(recs) == 3 and all(r["error"] is None and r["http_status"] == 200 for r in recs), recs
    for r in recs:
        assert 0 < r["ttft_ms"] < r["e2e_ms"] and 1 <= r["n_gen_tokens"] <= 6 and r["finish_reason"] in ("length", "stop")
        assert len(r["itl_ms"]) == r["n_gen_tokens"] - 1 and not r["truncated"]
    assert lvl["wall_s"] > 0 and lvl["client_cpu_s"] >= 0
    assert ep.peak_rss_mb() > 50 and ep.cpu_s() > 0


def test_interrupt_requests_truncates_answers_under_concurrency(tmp_path):
    """The server's default cuts a streaming answer when another request waits; off, every answer finishes."""
    before = set(_server_pids())  # the module's shared server may be running
    fields = {"max_tokens": 24, "temperature": 0.0}
    load = Load("closed", clients=2, requests_per_client=3)
    got = {}
    for interrupt in (True, False):
        with LlamaCppServer(SMALL, tmp_path, interrupt_requests=interrupt, name=f"i{int(interrupt)}") as ep:
            recs, _ = run_load(ep.base_url, ep.model, MESSAGES, fields, load)
        assert all(r["error"] is None for r in recs), recs
        got[interrupt] = recs
    on = [r for r in got[True] if r["truncated"]]
    assert on and all(r["finish_reason"] is None and r["stream_end"] == "[DONE] without a finish reason" for r in on)
    assert not any(r["truncated"] for r in got[False])
    assert all(r["finish_reason"] in ("length", "stop") for r in got[False])
    assert set(_server_pids()) <= before


def test_bad_servers_fail_with_one_clear_error(tmp_path):
    before = set(_server_pids())
    with pytest.raises(ServerError, match="model file.*no such file"):
        LlamaCppServer(SMALL.replace(model=str(tmp_path / "missing.gguf")), tmp_path)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file" * 100)
    with pytest.raises(ServerError, match="model file"):
        LlamaCppServer(SMALL.replace(model=str(junk)), tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(ServerError, match="already in use"):
            LlamaCppServer(SMALL, tmp_path, port=s.getsockname()[1])

    class Refused(LlamaCppServer):  # a config the server's own settings model rejects: it exits at once
        def config(self, port):
            cfg = super().config(port)
            cfg["models"][0]["n_ctx"] = -5
            return cfg

    with pytest.raises(ServerError, match="exited with code 1") as e:
        Refused(SMALL, tmp_path, name="refused").start()
    assert "n_ctx" in str(e.value)  # the log's last lines say why
    with pytest.raises(ServerError, match="did not answer"):
        LlamaCppServer(SMALL, tmp_path, ready_timeout_s=0.3, name="slow").start()
    assert set(_server_pids()) <= before


class _Fake(http.server.BaseHTTPRequestHandler):
    """A stand-in endpoint: /v1/models and /v1/chat/completions answer as `mode` says."""
    mode = "html"

    def log_message(self, *a):
        pass

    def do_GET(self):
        body = b"<html>hello</html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        mode = type(self).mode
        if mode == "hang":
            time.sleep(3)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        chunk = {"choices": [{"delta": {"content": "hi"}, "finish_reason": None}]}
        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        if mode == "malformed":
            self.wfile.write(b"data: {not json\n\n")
        self.wfile.flush()  # "cut": the connection closes with no finish reason and no [DONE]


@pytest.fixture
def fake():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Fake)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


def test_client_faults_become_records_not_exceptions(fake):
    with pytest.raises(ServerError, match="not an OpenAI-compatible endpoint"):
        check_endpoint(fake)
    one = Load("closed")
    _Fake.mode = "malformed"
    (r,), _ = run_load(fake, "m", MESSAGES, {}, one)
    assert r["error"].startswith("malformed stream") and r["n_gen_tokens"] == 1
    _Fake.mode = "cut"
    (r,), _ = run_load(fake, "m", MESSAGES, {}, one)
    assert r["truncated"] and r["stream_end"] == "the stream ended without [DONE]" and r["error"] is None
    _Fake.mode = "hang"
    (r,), _ = run_load(fake, "m", MESSAGES, {}, one, timeout_s=0.5)
    assert "timeout" in r["error"] and r["ttft_ms"] is None
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    (r,), _ = run_load(f"http://127.0.0.1:{port}/v1", "m", MESSAGES, {}, one)
    assert r["error"] and "Connect" in r["error"]


def test_a_killed_kit_takes_its_server_with_it(tmp_path):
    code = textwrap.dedent(f"""
        import time
        from kit import Settings
        from kit.serve.server import LlamaCppServer
        ep = LlamaCppServer(Settings(n_ctx=256, chat_format="chatml"), {str(tmp_path)!r}).start()
        print(ep.pid, flush=True)
        time.sleep(120)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=str(REPO_ROOT))
    pid = int(p.stdout.readline())
    assert pid in _server_pids()
    p.send_signal(signal.SIGKILL)
    p.wait()
    deadline = time.time() + 10
    while pid in _server_pids() and time.time() < deadline:
        time.sleep(0.1)
    assert pid not in _server_pids()


def test_server_killed_mid_level_writes_error_rows_and_a_rerun_resumes(tmp_path):
    servers_before = set(_server_pids())
    prof = SMALL.replace(max_tokens=16, rag_search_k=2, max_context_length=200)
    env = prof.to_dotenv(tmp_path / "mine.env")
    study = ServedStudy(guide_profiles=[], kit_profiles_dir=str(tmp_path / "none"), extra_profiles=[str(env)],
                        baseline=False, n_questions=1, chunk_chars=200, corpus_topics=["pass", "while"], max_tokens=16,
                        repetitions=25, concurrency=[1, 2], requests_per_client=2, concurrency_profile="mine",
                        rhos=[], out_dir=str(tmp_path / "out"))
    killed = []

    def killer():  # the first server, once it answers and has served a few requests of its (sequential) level
        deadline = time.time() + 180
        while time.time() < deadline:
            cfgs = list((tmp_path / "out" / "servers").glob("*.server.json"))
            pids = [p for p in _server_pids() if p not in servers_before]
            if cfgs and pids:
                port = json.loads(cfgs[0].read_text())["port"]
                try:
                    check_endpoint(f"http://127.0.0.1:{port}/v1", timeout_s=1.0)
                except ServerError:
                    time.sleep(0.1)
                    continue
                time.sleep(2.0)
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
                return
            time.sleep(0.1)

    t = threading.Thread(target=killer)
    t.start()
    res = run_served_study(study, progress=False)
    t.join()
    assert killed and set(_server_pids()) <= servers_before
    lv = level_table(res.rows, 3000, 100)
    seq = lv[lv["part"] == "sequential"].iloc[0]
    assert seq["level_status"] == "failed: the server exited during the level" and seq["errors"] > 0
    assert seq["requests"] == 25  # every request of the level has its row, the failed ones with their cause
    err = res.rows[(res.rows["level_part"] == "sequential") & (res.rows["status"] != "ok")]
    assert err["error"].notna().all() and err["status"].str.startswith("error: ").all()
    # the study went on: the concurrency levels ran on fresh servers
    conc = lv[lv["part"] == "concurrency"]
    assert len(conc) == 4 and (conc["level_status"] == "ok").all()
    before = read_rows(tmp_path / "out" / "results.jsonl")
    # a rerun skips what is done; retry_failed measures the failed level again, and only it
    study.retry_failed = True
    res2 = run_served_study(study, progress=False)
    after = read_rows(tmp_path / "out" / "results.jsonl")
    new = after[len(before):]
    assert {r["level_key"] for r in new if r.get("part") == "served"} == {seq["level_key"]}
    assert all(r["status"] == "ok" for r in new if r.get("part") == "served")
    assert not [r for r in new if r.get("part") == "in_process"]  # the in-process trial was done: skipped
    assert set(_server_pids()) <= servers_before
    lv2 = level_table(res2.rows, 3000, 100)
    assert len(lv2) == 5  # a level's rows: the latest run's


def test_the_same_load_against_an_endpoint_someone_else_started(tmp_path, started):
    """endpoint=URL: no server started by the study and nothing in-process; the levels run against that URL (here
    the module's llama-cpp-python server stands in for llama-server, Ollama or vLLM: `make serve-check` runs it on a
    real llama-server)."""
    ep, _ = started
    env = SMALL.replace(rag_search_k=2, max_context_length=200).to_dotenv(tmp_path / "theirs.env")
    study = ServedStudy(endpoint=ep.base_url, endpoint_profile=str(env), n_questions=1, chunk_chars=200,
                        corpus_topics=["pass", "while"], max_tokens=8, repetitions=3, concurrency=[1, 2],
                        requests_per_client=3, rhos=[1.0], poisson_requests=3, out_dir=str(tmp_path / "out"))
    assert list(study.profiles()) == ["endpoint"]
    before = set(_server_pids())
    res = run_served_study(study, progress=False)
    assert set(_server_pids()) == before  # the study started no server of its own
    rows = res.rows
    assert set(rows["part"]) == {"served"} and set(rows["endpoint_kind"]) == {"external"}
    assert (rows["endpoint"] == ep.base_url).all() and (rows["status"] == "ok").all()
    lv = level_table(rows, 3000, 100)
    assert set(lv["part"]) == {"sequential", "concurrency", "rate"} and (lv["level_status"] == "ok").all()
    assert not lv[lv["part"] == "concurrency"]["interrupt_requests"].any()  # a setting of the kit's own servers
    assert res.mu_rps and lv[lv["part"] == "rate"]["offered_rps"].iloc[0] == pytest.approx(res.mu_rps, rel=0.01)
    # an endpoint that is not OpenAI-compatible: every level a failed row with the cause, nothing raised
    bad = ServedStudy(endpoint="http://127.0.0.1:9/v1", endpoint_profile=str(env), n_questions=1, chunk_chars=200,
                      corpus_topics=["pass", "while"], max_tokens=8, repetitions=3, concurrency=[], rhos=[],
                      out_dir=str(tmp_path / "bad"))
    rows = run_served_study(bad, progress=False).rows
    assert len(rows) == 1 and rows["status"].iloc[0].startswith("error: ") and "no answer" in rows["error"].iloc[0]
