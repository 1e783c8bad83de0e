"""Sweeps on the real model: columns and values, crashes and hangs isolated, kill-and-resume without loss."""
import importlib.metadata
import json
import shutil
import subprocess
import sys
import time
import uuid

import matplotlib.pyplot as plt
import pytest

from kit import plots, verdicts
from kit.config import Settings, SettingsError
from kit.environment import ENVIRONMENT_FILE, cpu_model, process_provenance
from kit.measure import Test, pp, tg
from kit.paths import NOTEBOOKS_DIR, REPO_ROOT
from kit.results import append_rows, load_results, read_rows
from kit.sweep import grid, run_sweep, split_out_dir, study_dir

BASE = Settings(n_ctx=512, n_batch=256, n_ubatch=256, n_threads=2, n_threads_batch=2)
LLAMA_BENCH_COLUMNS = ["model_filename", "model_type", "model_size", "model_n_params", "n_batch", "n_ubatch",
                       "n_threads", "type_k", "type_v", "n_gpu_layers", "flash_attn", "n_prompt", "n_gen",
                       "n_depth", "avg_ts", "stddev_ts", "samples_ts", "samples_ns", "avg_ns", "stddev_ns",
                       "test_time", "cpu_info", "gpu_info", "backends", "build_commit"]
PROVENANCE = ["build_commit", "ggml_version", "llama_cpp_python_version", "cpu_info", "gpu_info", "backends"]
OUR_COLUMNS = ["ttft_ms", "itl_p50_ms", "e2e_ms", "load_ms", "rss_peak_mb", "cpu_util_pct", "gpu_util_pct",
               "vram_peak_mb", "status", "error", "trial_key", "model_sha256", "median_ts", "timed_region",
               "n_batch_effective", "n_ubatch_effective", "n_ctx_effective"]


@pytest.fixture(scope="module")
def sweep_df(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    configs = grid(BASE, n_batch=[128, 1024], n_ubatch=[128])
    df = run_sweep("basic", configs, [pp(128), tg(16), Test("e2e", n_gen=8, params={"prompts": ["Say hi."]})],
                   repetitions=2, out_root=out, progress=False, timeout_s=300)
    return out / "basic", df


def test_sweep_rows_have_llama_bench_and_our_columns(sweep_df):
    _, df = sweep_df
    assert len(df) == 6 and (df["status"] == "ok").all(), df[["test", "status", "error"]]
    missing = [c for c in LLAMA_BENCH_COLUMNS + OUR_COLUMNS if c not in df.columns]
    assert not missing, missing
    assert df["trial_key"].is_unique


def test_sweep_values_are_plausible(sweep_df):
    _, df = sweep_df
    engine = df[df["test_kind"].isin(["pp", "tg"])]
    for r in engine.to_dict("records"):
        assert len(r["samples_ts"]) == 2 and len(r["samples_ns"]) == 2
        assert 1 < r["avg_ts"] < 100_000
        n = r["n_prompt"] + r["n_gen"]
        # avg_ts is the mean of the per-sample rates, as llama-bench computes it
        assert r["avg_ts"] == pytest.approx(sum(n / (ns / 1e9) for ns in r["samples_ns"]) / 2, rel=1e-3)
        # llama.cpp's own perf counters agree with the wall clock over the timed region
        assert 0.7 < r["perf_wall_ratio"] < 1.3
        assert 50 < r["rss_peak_mb"] < 4000 and r["load_ms"] > 0
        assert r["gpu_util_pct"] is None and r["vram_peak_mb"] is None  # no GPU here: empty, not an error
    e2e = df[df["test_kind"] == "e2e"].iloc[0]
    assert 0 < e2e["ttft_ms"] < e2e["e2e_ms"] and e2e["itl_p50_ms"] > 0
    # llama.cpp silently clamps n_batch to n_ctx: the effective value is recorded
    big = df[(df["n_batch"] == 1024) & (df["test_kind"] == "pp")].iloc[0]
    assert big["n_batch_effective"] == 512


def test_rows_carry_the_build_and_machine_that_measured_them(sweep_df):
    _, df = sweep_df
    live = process_provenance()
    for col in PROVENANCE:
        assert (df[col] == live[col]).all(), col
    assert (df["llama_cpp_python_version"] == importlib.metadata.version("llama-cpp-python")).all()
    assert df["build_commit"].iloc[0] and df["build_commit"].iloc[0] != df["llama_cpp_python_version"].iloc[0]
    assert df["model_sha256"].str.fullmatch("[0-9a-f]{64}").all()


def test_each_run_replaces_a_stale_environment(tmp_path):
    # an environment.json left by an older build and machine must not be reused for new rows
    stale = {"cpu_info": "OLD CPU", "llama_cpp_python": "0.0.1", "captured_at": "2020-01-01T00:00:00"}
    (tmp_path / "stale").mkdir()
    (tmp_path / "stale" / ENVIRONMENT_FILE).write_text(json.dumps(stale))
    df = run_sweep("stale", BASE, [tg(4)], repetitions=1, out_root=tmp_path, progress=False)
    env = json.loads((tmp_path / "stale" / ENVIRONMENT_FILE).read_text())
    assert env["cpu_info"] == cpu_model() and env["llama_cpp_python"] == importlib.metadata.version("llama-cpp-python")
    assert env["captured_at"] > stale["captured_at"]
    assert (df["status"] == "ok").all() and (df["cpu_info"] == cpu_model()).all()


def test_relative_output_paths_are_taken_from_the_repo_root_not_the_cwd(monkeypatch):
    # a JupyterLab kernel starts in notebooks/: "outputs/..." must still mean <repo>/outputs/...
    rel = f"outputs/_test_rel_{uuid.uuid4().hex[:8]}"
    monkeypatch.chdir(NOTEBOOKS_DIR)
    try:
        assert study_dir("s", rel) == REPO_ROOT / rel / "s" and split_out_dir(f"{rel}/s") == ("s", REPO_ROOT / rel)
        run_sweep("s", BASE, [tg(4)], repetitions=1, out_root=rel, progress=False)
        assert len(read_rows(REPO_ROOT / rel / "s" / "results.jsonl")) == 1
        assert verdicts.write_verdicts(f"{rel}/s", [verdicts.not_testable("G2", "no GPU")]) == \
            REPO_ROOT / rel / "s" / verdicts.VERDICTS_FILE
        fig, _ = plt.subplots()
        fig_path = plots.save_figure(fig, f"{rel}/s", "f")
        plt.close(fig)
        assert fig_path == str(REPO_ROOT / rel / "s" / "figures" / "f.png")
        assert verdicts.evidence_path(f"{rel}/s/figures/f.png", f"{rel}/s") == "s/figures/f.png"
        assert not (NOTEBOOKS_DIR / rel).exists()
    finally:
        shutil.rmtree(REPO_ROOT / rel, ignore_errors=True)
        shutil.rmtree(NOTEBOOKS_DIR / rel, ignore_errors=True)


def test_rerun_skips_finished_trials(sweep_df):
    out, df = sweep_df
    t = time.perf_counter()
    again = run_sweep("basic", grid(BASE, n_batch=[128, 1024], n_ubatch=[128]),
                      [pp(128), tg(16), Test("e2e", n_gen=8, params={"prompts": ["Say hi."]})],
                      repetitions=2, out_root=out.parent, progress=False)
    assert time.perf_counter() - t < 60  # no model was loaded: nothing ran
    assert len(read_rows(out / "results.jsonl")) == 6 and len(again) == 6


def test_crash_and_hang_are_recorded_and_the_sweep_goes_on(tmp_path):
    configs = [BASE, BASE.replace(n_batch=128, n_ubatch=128)]
    tests = [tg(8), Test("kit.faults:abort_in_llama"), Test("kit.faults:hang"), Test("kit.faults:segfault")]
    df = run_sweep("faults", configs, [tests[0], tests[1]], repetitions=1, out_root=tmp_path, progress=False,
                   timeout_s=120)
    df = run_sweep("faults", configs, [tests[2]], repetitions=1, out_root=tmp_path, progress=False, timeout_s=15)
    df = run_sweep("faults", configs, [tests[3], tests[0]], repetitions=1, out_root=tmp_path, progress=False,
                   timeout_s=120)
    by = {(r["n_batch"], r["test"]): r for r in df.to_dict("records")}
    for nb in (256, 128):
        assert by[(nb, "tg8")]["status"] == "ok"
        abort = by[(nb, "abort_in_llama")]
        assert abort["status"] == "crashed" and "SIGABRT" in abort["error"] and "GGML_ASSERT" in abort["error"]
        assert by[(nb, "hang")]["status"] == "timeout"
        assert by[(nb, "segfault")]["status"] == "crashed" and "SIGSEGV" in by[(nb, "segfault")]["error"]


def test_a_python_error_in_one_test_keeps_the_others(tmp_path):
    df = run_sweep("pyerr", BASE, [Test("kit.faults:python_error"), tg(8)], repetitions=1, out_root=tmp_path,
                   progress=False)
    st = dict(zip(df["test"], df["status"]))
    assert st == {"python_error": "error", "tg8": "ok"}


def test_failed_trials_are_retried_only_when_asked(tmp_path):
    kw = dict(repetitions=1, out_root=tmp_path, progress=False, timeout_s=120)
    run_sweep("retry", BASE, [Test("kit.faults:exit_process")], **kw)
    rows = read_rows(tmp_path / "retry" / "results.jsonl")
    assert len(rows) == 1 and rows[0]["status"] == "killed" and "SIGKILL" in rows[0]["error"]
    run_sweep("retry", BASE, [Test("kit.faults:exit_process")], **kw)
    assert len(read_rows(tmp_path / "retry" / "results.jsonl")) == 1
    df = run_sweep("retry", BASE, [Test("kit.faults:exit_process")], retry_failed=True, **kw)
    assert len(read_rows(tmp_path / "retry" / "results.jsonl")) == 2 and len(df) == 1  # latest row per key


def test_bad_input_fails_before_any_work(tmp_path):
    with pytest.raises(SettingsError, match="n_ctx=512 is smaller than the test tg600"):
        run_sweep("bad", BASE, [tg(600)], out_root=tmp_path, progress=False)
    with pytest.raises(SettingsError, match="invalid combination"):
        grid(BASE, n_ubatch=[128, 512], n_batch=[256])
    with pytest.raises(SettingsError, match="study name"):
        run_sweep("../escape", BASE, [tg(8)], out_root=tmp_path, progress=False)
    with pytest.raises(SettingsError, match="unknown setting 'n_bach'"):
        grid(BASE, n_bach=[1, 2])
    assert not (tmp_path / "bad").exists()
    skipped = grid(BASE, skip_invalid=True, n_ubatch=[128, 512], n_batch=[256])
    assert len(skipped) == 1 and "n_ubatch=512" in skipped.skipped[0][1]


SWEEP_SCRIPT = """
import sys
from kit.config import Settings
from kit.measure import tg
from kit.sweep import run_sweep
from kit.measure import pp
configs = [Settings(n_ctx=256, n_batch=256, n_ubatch=256, n_threads=t, n_threads_batch=t, seed=s)
           for s in range(4) for t in (1, 2)]
interleave = sys.argv[2] == "1"
tests = [tg(24), pp(32)] if interleave else [tg(24)]
run_sweep("killed", configs, tests, repetitions=2, out_root=sys.argv[1], progress=False, interleave=interleave)
"""


def _workers_of(study_root) -> list[int]:
    """Trial children still alive whose spec points into this test's folder (other sweeps may run beside us)."""
    import psutil

    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = p.info["cmdline"] or []
        if "kit.worker" in cmd:
            try:
                args = cmd[cmd.index("kit.worker") + 1:]  # SPEC RESULT, or --serve SPEC (a live child)
                spec = json.loads(open(args[1] if args[0] == "--serve" else args[0]).read())
            except (OSError, ValueError, IndexError):
                continue
            if str(study_root) in str(spec.get("log_file")):
                pids.append(p.info["pid"])
    return pids


@pytest.mark.parametrize("interleave", [False, True], ids=["back-to-back", "interleaved"])
def test_killed_sweep_resumes_without_duplicates_or_loss(tmp_path, repo_root, interleave):
    # back to back, rows land per configuration; interleaved (8 live children), per test for all 8 at once
    results = tmp_path / "killed" / "results.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", SWEEP_SCRIPT, str(tmp_path), str(int(interleave))], cwd=repo_root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first, total = (8, 16) if interleave else (2, 8)
    deadline = time.time() + 240
    while time.time() < deadline and len(read_rows(results)) < first:
        time.sleep(0.2)
    proc.kill()  # SIGKILL: no cleanup, a trial is in flight
    proc.wait()
    before = read_rows(results)
    assert first <= len(before) < total, "the sweep should have been killed mid-way"
    assert all(r["interleaved"] is interleave for r in before)
    time.sleep(1)
    # the trial in flight died with its parent (no orphan still measuring)
    assert not _workers_of(tmp_path)
    with open(results, "ab") as fh:  # and a torn line, as a kill during a write would leave
        fh.write(b'{"study": "killed", "trial_key": "torn", "sta')
    configs = [Settings(n_ctx=256, n_batch=256, n_ubatch=256, n_threads=t, n_threads_batch=t, seed=s)
               for s in range(4) for t in (1, 2)]
    tests = [tg(24), pp(32)] if interleave else [tg(24)]
    with pytest.warns(UserWarning, match="torn"):
        df = run_sweep("killed", configs, tests, repetitions=2, out_root=tmp_path, progress=False,
                       interleave=interleave)
    after = read_rows(results)
    assert len(df) == total and df["trial_key"].is_unique and (df["status"] == "ok").all()
    assert after[:len(before)] == before  # nothing measured before the kill was lost or rewritten
    assert len(after) == total


def test_append_survives_torn_line_and_load_results_is_one_call(tmp_path):
    p = tmp_path / "results.jsonl"
    append_rows(p, [{"trial_key": "a", "status": "ok", "avg_ts": 1.0}])
    with open(p, "ab") as fh:
        fh.write(b'{"trial_key": "b", "sta')
    append_rows(p, [{"trial_key": "c", "status": "ok", "avg_ts": 2.0}])
    with pytest.warns(UserWarning):
        df = load_results(tmp_path)
    assert list(df["trial_key"]) == ["a", "c"]
    assert json.loads(p.read_text().splitlines()[-1])["trial_key"] == "c"
