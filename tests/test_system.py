"""kit.studies.threads_system: topology, page cache, niceness, competing load, study validation, and the verdict logic."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from kit.config import Settings, StudyConfigError
from kit.measure import Test, load_model, proc_memory
from kit.models import resolve_model
from kit.paths import DEFAULT_MODEL, REPO_ROOT
from kit.studies import threads_system as system
from kit.sweep import run_trial
from kit.verdicts import INCONCLUSIVE, MIXED, NO_EFFECT, NOT_TESTABLE, REFUTED, SUPPORTED


def test_topology_and_default_thread_counts():
    topo = system.cpu_topology()
    assert 1 <= topo["physical"] <= topo["logical"]
    assert topo["os_cpu_count"] == os.cpu_count()
    counts = system.default_thread_counts({"logical": 16, "physical": 8, "affinity": 12, "os_cpu_count": 16})
    assert counts == [1, 2, 4, 8, 12, 16]
    assert system.default_thread_counts({"logical": 1, "physical": 1, "affinity": 1}) == [1]


def test_proc_memory_reads_this_process():
    m = proc_memory()
    assert m["proc_rss_mb"] > 1 and m["rss_anon_mb"] > 0
    assert m["vm_lck_mb"] is not None


def _fs_type(path: Path) -> str:
    best, fs = "", ""
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mnt, typ = line.split()[:3]
        if str(path.resolve()).startswith(mnt) and len(mnt) > len(best):
            best, fs = mnt, typ
    return fs


def test_evict_and_warm_page_cache(tmp_path):
    f = tmp_path / "blob.bin"
    f.write_bytes(os.urandom(8 << 20))
    if _fs_type(tmp_path) in ("tmpfs", "ramfs"):
        pytest.skip("tmpfs: file pages are the file itself and cannot be evicted")
    warm = system.warm_page_cache(f)
    assert warm["residency"] == pytest.approx(1.0, abs=0.01)
    cold = system.evict_from_page_cache(f)
    assert cold["residency_before_evict"] == pytest.approx(1.0, abs=0.01)
    assert cold["residency"] < system.COLD_RESIDENCY_MAX
    assert system.warm_page_cache(f)["residency"] > 0.99


def test_private_model_copy_is_reused(tmp_path):
    src = tmp_path / "m.gguf"
    src.write_bytes(b"x" * 1000)
    a = system.private_model_copy(src, tmp_path / "copy")
    mtime = a.stat().st_mtime_ns
    b = system.private_model_copy(src, tmp_path / "copy")
    assert a == b and a.read_bytes() == src.read_bytes() and b.stat().st_mtime_ns == mtime


def test_set_process_niceness_reaches_every_thread():
    # in a child: a worker thread exists before the change, as llama.cpp's do
    code = ("import threading, time, json, sys\nsys.path.insert(0, %r)\nfrom kit.studies.threads_system import set_process_niceness\n"
            "ev = threading.Event()\nt = threading.Thread(target=ev.wait); t.start()\n"
            "r = set_process_niceness(3)\nev.set(); t.join()\nprint(json.dumps(r))") % str(REPO_ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["n_threads_in_process"] >= 2
    assert r["nice_applied"] and r["thread_nice"] == [r["nice_before"] + 3]


def _may_raise_priority() -> bool:
    """What the kernel allows this process: root, CAP_SYS_NICE (bit 23 of CapEff) or an RLIMIT_NICE ceiling
    (20 - soft limit) below the current niceness."""
    if os.geteuid() == 0:
        return True
    cap_eff = next(int(line.split()[1], 16) for line in Path("/proc/self/status").read_text().splitlines()
                   if line.startswith("CapEff:"))
    soft = resource.getrlimit(resource.RLIMIT_NICE)[0]
    ceiling = 20 - soft if soft != resource.RLIM_INFINITY else -20
    return bool(cap_eff & (1 << 23)) or ceiling <= os.getpriority(os.PRIO_PROCESS, 0) - 1


def test_priority_permitted_for_lowering_and_for_raising():
    ok, why = system.priority_permitted(5)
    assert ok and "no privilege" in why
    ok, why = system.priority_permitted(-1)
    if _may_raise_priority():
        assert ok and why.startswith("permitted")
    else:
        assert not ok and "CAP_SYS_NICE" in why and "denied" in why


def test_competing_load_runs_and_is_killed():
    with system.CompetingLoad(n_procs=2, nice=5, max_s=30) as load:
        pids = load.pids
        assert len(pids) == 2
        time.sleep(0.3)
        for pid in pids:
            assert Path(f"/proc/{pid}").exists()
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            assert int(stat[16]) >= 5  # niced
    for pid in pids:
        st = Path(f"/proc/{pid}/stat")
        assert not st.exists() or st.read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")


def test_competing_load_ends_on_its_own():
    with system.CompetingLoad(n_procs=1, max_s=0.5) as load:
        p = load.procs[0]
        p.wait(timeout=20)
        assert p.returncode == 0


@pytest.mark.parametrize("bad", [
    {"n_gen": 0}, {"numa_modes": ["numactl"]}, {"numa_modes": ["fast"]}, {"thread_counts": [0]},
    {"mmap_values": []}, {"mlock_values": [1]}, {"n_ctx": 64, "n_prompt": 64, "n_gen": 8}, {"nice": -30},
    {"load_procs": -1}, {"repetitions": True},
])
def test_study_validation(bad):
    with pytest.raises(StudyConfigError):
        system.SystemStudy(**bad)


def test_defaults_are_the_notebook_values():
    s = system.SystemStudy()
    assert s.load_repetitions == 5 and s.nice == -10 and s.out_path == REPO_ROOT / "outputs" / "40_threads_system"
    assert s.thread_counts == system.default_thread_counts(s.topology)
    assert system.SystemStudy.defaults()["thread_counts"] == []


def test_study_expands_to_configs():
    s = system.SystemStudy(thread_counts=[2, 1, 2], n_ctx=256, n_prompt=64, n_gen=8)
    assert s.thread_counts == [1, 2]
    cfgs = s.thread_configs()
    assert [(c.n_threads, c.n_threads_batch) for c in cfgs] == [(1, 1), (2, 2)]
    assert [t.kind for t in s.thread_tests()] == ["tg", "pp"]
    conds = s.priority_conditions()
    assert [c["nice"] for c in conds] == [0, 0, -10, 0, 0, -10] and conds[0]["load_nice"] is None
    assert [c["load_session"] for c in conds] == [None, "same", "same", "same", "other", "other"]
    assert "load_procs" not in s.priority_test(conds[0]).params
    assert s.priority_test(conds[4]).params["load_session"] == "other"
    loads = s.loading_conditions()
    assert len(loads) == 2 * 2 * 2
    assert {(c.use_mmap, c.use_mlock, cache) for c, cache in loads} == {
        (a, b, c) for a in (True, False) for b in (False, True) for c in ("cold", "warm")}
    # cold and warm are different trials (different keys), and so are repetitions
    assert s.load_test("cold", 0) != s.load_test("warm", 0) != s.load_test("cold", 1)


def test_niced_bench_in_a_real_trial():
    test = Test("kit.studies.threads_system:niced_bench", params={"nice": 4, "inner": "tg", "n_gen": 4})
    (row,) = run_trial(Settings(n_ctx=64, n_threads=2), [test], 1, str(resolve_model(DEFAULT_MODEL)),
                       timeout_s=300)
    assert row["status"] == "ok", row.get("error")
    assert row["nice_applied"] and row["thread_nice_after"] == [row["nice_before"] + 4]
    assert row["n_threads_in_process"] >= 2 and row["median_ts"] > 0 and row["n_gen"] == 4


def test_timeboxed_tg_stops_at_the_time_box_or_at_n_gen():
    lm = load_model(Settings(n_ctx=512, n_threads=2))
    try:
        # a box too short for even one token: every run decodes exactly one
        row = system.timeboxed_tg(lm, 400, 1e-6, repetitions=3)
        assert row["samples_n_gen"] == [1, 1, 1] and row["repetitions"] == 3
        assert row["samples_ts"][0] == pytest.approx(1 / (row["samples_ns"][0] / 1e9), rel=1e-3)
        # a generous box: n_gen decides
        row = system.timeboxed_tg(lm, 8, 60.0, repetitions=2)
        assert row["samples_n_gen"] == [8, 8] and row["median_ts"] > 0
        # a 50 ms box on 400 tokens: runs stop early, soon after the box (one decode of this model is ~10-100 ms)
        row = system.timeboxed_tg(lm, 400, 0.05, repetitions=2)
        assert all(1 <= n < 400 for n in row["samples_n_gen"]) and all(ns < 5e9 for ns in row["samples_ns"])
    finally:
        lm.close()
    with pytest.raises(StudyConfigError, match="priority_max_s"):
        system.SystemStudy(priority_max_s=0)
    s = system.SystemStudy(n_ctx=128, n_prompt=16, n_gen=8, priority_max_s=2)
    t = s.priority_test(s.priority_conditions()[1])
    assert t.params["max_s"] == 2.0 and t.n_gen == 0 and t.params["n_gen"] == 8


# ---- verdict logic on synthetic rows ---------------------------------------------------------------------------
def _study(**topo):
    s = system.SystemStudy(n_ctx=128, n_prompt=16, n_gen=8)
    s.topology = {"os_cpu_count": 4, "logical": 4, "physical": 2, "affinity": 4, "smt": True, **topo}
    return s


def _thread_rows(speeds: dict) -> pd.DataFrame:
    rows = []
    for (t, kind), xs in speeds.items():
        rows.append({"part": "threads", "status": "ok", "n_threads": t, "test_kind": kind, "samples_ts": xs})
    return pd.DataFrame(rows)


def _labels(v) -> dict:
    return {c["condition"].split(" (")[0]: c["verdict"] for c in v.conditions}


def test_thread_verdict_combines_generation_and_prompt_processing():
    s = _study()
    df = _thread_rows({(1, "tg"): [50, 51, 49, 50, 50], (2, "tg"): [100, 101, 99, 100, 100],
                       (4, "tg"): [80, 81, 79, 80, 80],
                       (1, "pp"): [100, 101, 99, 100, 100], (2, "pp"): [200, 201, 199, 200, 200],
                       (4, "pp"): [260, 261, 259, 260, 260]})
    v = system.thread_verdict(df, s)
    # all 4 threads: slower than the 2 physical cores for generation, faster for prompt processing
    assert v.claim == "C1" and v.verdict == MIXED and "prompt processing" in v.depends_on
    assert _labels(v) == {"generation": REFUTED, "prompt processing": SUPPORTED}
    assert v.details["baseline_threads"] == 2 and v.effect == pytest.approx(0.8, abs=0.01)  # generation's ratio
    assert v.band == 0.05 and v.band_why and "Machine: 2 physical / 4 logical" in v.summary
    # both tests agree: one label
    df = _thread_rows({(1, "tg"): [50, 51, 49, 50, 50], (2, "tg"): [90, 91, 89, 90, 90],
                       (1, "pp"): [100, 101, 99, 100, 100], (2, "pp"): [190, 191, 189, 190, 190]})
    v = system.thread_verdict(df, _study(os_cpu_count=2, logical=2, physical=2, smt=False))
    assert v.verdict == SUPPORTED and v.details["baseline_threads"] == 1 and len(v.conditions) == 2


def test_thread_verdict_no_effect_needs_the_band_and_a_wide_interval_is_inconclusive():
    s = _study(os_cpu_count=2, logical=2, physical=2, smt=False)
    tight = _thread_rows({(1, "tg"): [50.0, 50.1, 49.9, 50.0, 50.05], (2, "tg"): [50.1, 50.0, 50.2, 49.95, 50.0],
                          (1, "pp"): [100, 101, 99, 100, 100], (2, "pp"): [190, 191, 189, 190, 190]})
    v = system.thread_verdict(tight, s)
    assert _labels(v) == {"generation": NO_EFFECT, "prompt processing": SUPPORTED} and v.verdict == MIXED
    # an interval that holds both a 15 % loss and a 15 % gain is no verdict at all, and says what would decide it
    wide = _thread_rows({(1, "tg"): [50, 48, 52, 47, 53], (2, "tg"): [40, 60, 50, 45, 56],
                         (1, "pp"): [100, 90, 110, 95, 105], (2, "pp"): [85, 115, 100, 92, 108]})
    v = system.thread_verdict(wide, s)
    assert v.verdict == INCONCLUSIVE and v.ci_low < 0.95 and v.ci_high > 1.05
    assert v.samples_to_decide and v.label().startswith("inconclusive: about")


def test_numa_verdict_on_one_node(monkeypatch):
    s = _study()
    monkeypatch.setattr(system.SystemStudy, "numa_nodes", lambda self: [{"node": 0, "cpus": "0-3"}])
    v = system.numa_verdict(pd.DataFrame(), s)
    assert v.verdict == NOT_TESTABLE and "1 NUMA node" in v.reason


def _prio_rows(s, applied: bool, other=((1, 1.1, 0.9, 1), (1, 1.05, 0.95, 1))) -> pd.DataFrame:
    labels = [c["condition"] for c in s.priority_conditions()]
    speeds = [[100, 101, 99, 100], [40, 41, 39, 40], [90, 91, 89, 90], [85, 86, 84, 85], list(other[0]),
              list(other[1])]
    return pd.DataFrame([{"part": "priority", "status": "ok", "condition": lab, "samples_ts": xs,
                          "nice_applied": applied or i not in (2, 5),
                          "nice_error": None if applied or i not in (2, 5) else "[Errno 13] Permission denied",
                          "load_nice": None, "autogroup": True} for i, (lab, xs) in enumerate(zip(labels, speeds))])


def test_priority_verdict_combines_where_the_load_runs():
    s = _study()
    v = system.priority_verdict(_prio_rows(s, True), s)
    # raised priority wins within the bench's session; against other sessions (autogroup) the interval is too wide
    assert v.verdict == MIXED and "where the competing load runs" in v.depends_on
    assert [c["verdict"] for c in v.conditions] == [SUPPORTED, SUPPORTED, INCONCLUSIVE]
    assert "nice -10" in v.metric and v.effect == pytest.approx(2.25, abs=0.01)  # the same-session headline
    assert v.details["load_slowdown"]["verdict"] == SUPPORTED and "autogroup" in v.summary
    # other sessions measured tightly at no change: decided, and still a disagreement
    v = system.priority_verdict(_prio_rows(s, True, ((1, 1.01, 0.99, 1), (1, 1.005, 0.995, 1))), s)
    assert v.verdict == MIXED and v.conditions[2]["verdict"] == NO_EFFECT
    # without root: the raised conditions are not testable (with why), the no-root proxy carries the label
    v = system.priority_verdict(_prio_rows(s, False), s)
    assert v.verdict == SUPPORTED and "load at nice +10" in v.metric
    assert [c["verdict"] for c in v.conditions] == [NOT_TESTABLE, SUPPORTED, NOT_TESTABLE]
    assert "not permitted" in v.conditions[0]["reason"] and "Permission denied" in v.conditions[2]["reason"]


def test_loading_verdicts_need_a_real_cold_load():
    s = _study()
    base = {"part": "loading", "status": "ok", "use_mmap": True, "use_mlock": False, "vm_lck_mb": 0.0}
    rows = [dict(base, cache="cold", cold_ok=False, residency=1.0, load_ms=50.0, first_decode_ms=20.0)] * 3 + \
           [dict(base, cache="warm", cold_ok=None, residency=1.0, load_ms=50.0, first_decode_ms=20.0)] * 3
    o2, o3 = system.loading_verdicts(pd.DataFrame(rows), s)
    assert o2.verdict == NOT_TESTABLE and "swappiness" in o2.reason
    assert o3.verdict == NOT_TESTABLE and "evict" in o3.reason
    rows = [dict(base, cache="cold", cold_ok=True, residency=0.0, load_ms=300.0 + i, first_decode_ms=100.0 + i)
            for i in range(4)] + \
           [dict(base, cache="warm", cold_ok=None, residency=1.0, load_ms=50.0 + i, first_decode_ms=20.0 + i)
            for i in range(4)]
    _, o3 = system.loading_verdicts(pd.DataFrame(rows), s)
    assert o3.verdict == SUPPORTED and o3.effect < 0.5 and "at most" in o3.summary and o3.band == 0.10
    assert o3.details["first_decode"]["verdict"] == SUPPORTED and o3.details["looks_stop"] == "decided"


def test_o3_on_a_schedule_of_looks():
    base = {"part": "loading", "status": "ok", "use_mmap": True, "use_mlock": False, "vm_lck_mb": 0.0,
            "first_decode_ms": 20.0, "looks_planned": 3}
    cold = [100.0, 200.0, 150.0]
    warm = [95.0, 190.0, 140.0]

    def rows(blocks: int):
        return pd.DataFrame([dict(base, cache="cold", cold_ok=True, residency=0.0, load_ms=cold[i % 3], look=1 + i // 3)
                             for i in range(3 * blocks)] +
                            [dict(base, cache="warm", cold_ok=None, residency=1.0, load_ms=warm[i % 3], look=1 + i // 3)
                             for i in range(3 * blocks)])

    _, o3 = system.loading_verdicts(rows(3), _study())
    # three looks planned: every look at 98.3 %; the last one still undecided says so, and what would decide it
    assert o3.confidence == pytest.approx(1 - 0.05 / 3) and o3.verdict == INCONCLUSIVE
    assert o3.details["looks"] == 3 and o3.details["loads_cold"] == 9 and o3.samples_to_decide > 9
    assert "3 of 3 planned blocks" in o3.summary and "last planned look (load_looks)" in o3.summary
    _, o3 = system.loading_verdicts(rows(1), _study())
    assert o3.details["looks_stop"] == "time cap" and "load_max_s" in o3.summary


def test_tables_on_synthetic_rows():
    s = _study()
    s.thread_counts = [1, 2, 4]
    df = _thread_rows({(1, "tg"): [50, 51, 49], (2, "tg"): [100, 101, 99, 100], (4, "pp"): [260, 261]})
    t = system.thread_table(df, s)
    assert list(zip(t["threads"], t["test"], t["median_ts"], t["n_samples"])) == [
        (1, "tg", 50.0, 3), (2, "tg", 100.0, 4), (4, "pp", 260.5, 2)]
    assert list(t["is_cpu_count"]) == [False, False, True] and list(t["is_physical"]) == [False, True, False]
    p = system.priority_table(_prio_rows(s, True))
    assert list(p["condition"]) == [c["condition"] for c in s.priority_conditions()]  # in the order run
    assert list(p["median_ts"][:2]) == [100.0, 40.0] and (p["n_samples"] == 4).all()
    base = {"part": "loading", "status": "ok", "use_mmap": True, "use_mlock": False, "vm_lck_mb": 0.0,
            "residency": 0.0, "first_decode_ms": 10.0}
    rows = [dict(base, cache="cold", load_ms=300.0 + i) for i in range(3)] + \
           [dict(base, cache="warm", residency=1.0, load_ms=50.0 + i) for i in range(3)]
    lt = system.loading_table(pd.DataFrame(rows)).set_index("cache")
    assert lt.loc["cold", "load_ms"] == 301.0 and lt.loc["warm", "load_to_first_ms"] == 61.0
    assert lt.loc["cold", "n_loads"] == 3 and lt.loc["warm", "residency_median"] == 1.0
    assert lt.loc["cold", "load_ms_ci"].startswith("[300.0")
