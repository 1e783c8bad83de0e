"""Interleaved sweeps: one live child per configuration, repetitions alternated in random order, failures isolated."""
import os
import signal

import pandas as pd
import psutil
import pytest

from kit.config import Settings
from kit.measure import Test, pp, tg
from kit.models import model_card
from kit.results import compared_samples, interleaved_pairs
from kit.sweep import _Plan, grid, interleave_group_size, run_interleaved, run_sweep

BASE = Settings(n_ctx=512, n_batch=256, n_ubatch=128, n_threads=2, n_threads_batch=2)


def _plans(configs):
    card = model_card(configs[0].model).to_dict()
    return [_Plan(s, card["path"], card, [], []) for s in configs]


def test_group_size_rules():
    configs = grid(BASE, n_batch=[128, 256, 512])
    plans = _plans(configs)
    engine = [pp(64), tg(8)]
    big = 64 * 2**30
    assert interleave_group_size(plans, engine, available_bytes=big) == 3
    assert interleave_group_size(plans, engine, interleave=False, available_bytes=big) == 1
    assert interleave_group_size(plans[:1], engine, available_bytes=big) == 1  # nothing to alternate with
    # e2e and custom tests keep their own timing: back to back
    assert interleave_group_size(plans, [tg(8), Test("e2e", n_gen=4)], available_bytes=big) == 1
    assert interleave_group_size(plans, [Test("kit.faults:hang")], available_bytes=big) == 1
    # GPU offload: children would compete for VRAM
    gpu = _plans(grid(BASE, n_gpu_layers=[0, 10]))
    assert interleave_group_size(gpu, engine, available_bytes=big, gpu_offload=True) == 1
    assert interleave_group_size(gpu, engine, available_bytes=big, gpu_offload=False) == 2
    # memory: as many children as fit in half the available RAM, at least two or none
    from kit.sweep import _child_bytes

    one = _child_bytes(plans[0])
    assert one > plans[0].card["size_bytes"]
    assert interleave_group_size(plans, engine, available_bytes=int(one * 4.5)) == 2
    assert interleave_group_size(plans, engine, available_bytes=int(one * 3)) == 1
    # a per-child memory limit counts as that child's size
    assert interleave_group_size(plans, engine, available_bytes=big, mem_limit_mb=big // 2**20 // 4) == 2


def test_interleaved_sweep_alternates_repetitions_and_resumes(tmp_path):
    configs = grid(BASE, n_batch=[128, 256])
    tests = [pp(64), tg(8, depth=64)]
    df = run_sweep("il", configs, tests, repetitions=3, out_root=tmp_path, progress=False, timeout_s=300)
    assert len(df) == 4 and (df["status"] == "ok").all(), df[["test", "status", "error"]]
    assert df["interleaved"].all() and (df["interleave_group"] == 2).all()
    for test, part in df.groupby("test"):
        at = part["samples_at_s"].tolist()
        assert all(len(a) == 3 for a in at)
        # round r of every configuration ends before round r+1 of any starts: the repetitions alternate
        for r in range(2):
            assert max(a[r] for a in at) < min(a[r + 1] for a in at), (test, at)
    for r in df.to_dict("records"):
        assert len(r["samples_ts"]) == 3 and r["repetitions"] == 3 and 1 < r["median_ts"] < 100_000
        assert 0.7 < r["perf_wall_ratio"] < 1.3  # llama.cpp's own counters agree over the same region
        assert 0 < r["cpu_util_pct"] < 100 * (os.cpu_count() or 2) + 50
    # the rows pair by round (kit.results.interleaved_pairs): each side's samples in time order
    one = df[df["test"] == df["test"].iloc[0]]
    a, b = one.iloc[[0]], one.iloc[[1]]
    pa, pb, paired = compared_samples(a, b)
    assert paired and sorted(pa) == sorted(a.iloc[0]["samples_ts"]) and sorted(pb) == sorted(b.iloc[0]["samples_ts"])
    order = sorted(range(3), key=lambda i: a.iloc[0]["samples_at_s"][i])
    assert pa == [a.iloc[0]["samples_ts"][i] for i in order]
    # rows of different tests, or a side with two rows, are not pairs: every sample pooled instead
    other = df[df["test"] != one["test"].iloc[0]].iloc[[0]]
    later = b.assign(samples_at_s=[[t + 1000 for t in b.iloc[0]["samples_at_s"]]])
    assert interleaved_pairs(later, a) is None      # measured after the other side, not round by round
    assert compared_samples(a, pd.concat([b, other]))[2] is False
    assert len(compared_samples(a, pd.concat([b, other]))[1]) == 6
    d = df[df["test"] == tests[1].name]
    # the pp64 before it left 64 tokens in each child's cache: the depth is reused there, as back to back
    assert len(d) == 2 and d["depth_reused"].astype(bool).all() and (d["depth_fill_ms"] == 0).all()
    # the same trials, back to back: same columns, interleaved False; a rerun measures nothing again
    seq = run_sweep("seq", configs, tests, repetitions=3, out_root=tmp_path, progress=False, interleave=False)
    assert (~seq["interleaved"].astype(bool)).all() and set(df.columns) - set(seq.columns) <= {"samples_at_s",
                                                                                            "interleave_group"}
    again = run_sweep("il", configs, tests, repetitions=3, out_root=tmp_path, progress=False)
    assert sorted(again["test_time"]) == sorted(df["test_time"]) and len(again) == 4


def test_a_mixed_sweep_interleaves_its_engine_tests_and_runs_the_rest_back_to_back(tmp_path):
    configs = grid(BASE, n_batch=[128, 256])
    e2e = Test("e2e", n_gen=4, params={"prompts": ["Say hi."]})
    df = run_sweep("mixed", configs, [tg(8), e2e], repetitions=2, out_root=tmp_path, progress=False)
    assert len(df) == 4 and (df["status"] == "ok").all(), df[["test", "status", "error"]]
    by_kind = df.groupby("test_kind")["interleaved"].apply(lambda x: set(x.astype(bool)))
    assert by_kind["tg"] == {True} and by_kind["e2e"] == {False}
    assert (df[df["test_kind"] == "e2e"]["ttft_ms"] > 0).all()


def _serve_children():
    kids = [p for p in psutil.Process().children(recursive=True) if "--serve" in " ".join(p.cmdline())]
    return sorted(kids, key=lambda p: p.create_time())


def test_a_killed_and_a_hung_child_cost_only_their_configuration(tmp_path):
    configs = grid(BASE, n_batch=[128, 256, 512])
    card = model_card(BASE.model).to_dict()
    tests = [tg(4), pp(32), tg(4, depth=16)]
    plans = [_Plan(s, card["path"], card, tests, [f"{s.n_batch}-{t.name}" for t in tests]) for s in configs]
    got = []

    def record(plan, pairs, rows):
        got.append((plan.settings.n_batch, pairs[0][0].name, rows[0]))
        if len(got) == 3:  # the first test is done everywhere: kill one child, freeze another
            kids = _serve_children()
            assert len(kids) == 3
            os.kill(kids[0].pid, signal.SIGKILL)
            os.kill(kids[1].pid, signal.SIGSTOP)

    run_interleaved(plans, [list(zip(tests, p.keys)) for p in plans], 2, record, timeout_s=12)
    by = {(nb, name): row for nb, name, row in got}
    assert len(by) == 9
    assert all(by[(nb, "tg4")]["status"] == "ok" for nb in (128, 256, 512))
    assert by[(128, "pp32")]["status"] == "killed" and "SIGKILL" in by[(128, "pp32")]["error"]
    assert by[(256, "pp32")]["status"] == "timeout"
    for nb in (128, 256):
        assert by[(nb, tests[2].name)]["status"] == "skipped"
    assert by[(512, "pp32")]["status"] == "ok" and by[(512, tests[2].name)]["status"] == "ok"
    assert not _serve_children()  # every child was ended


def test_a_model_that_fails_to_load_is_reported_for_its_configuration_only(tmp_path):
    card = model_card(BASE.model).to_dict()
    broken = tmp_path / "truncated.gguf"
    with open(card["path"], "rb") as src:
        broken.write_bytes(src.read(2 * 2**20))  # a valid header, then the file ends inside the tensors
    tests = [tg(4), pp(16)]
    plans = [_Plan(BASE, card["path"], card, tests, ["a", "b"]),
             _Plan(BASE.replace(n_batch=128), str(broken), card, tests, ["c", "d"])]
    got = []
    run_interleaved(plans, [list(zip(tests, p.keys)) for p in plans], 2,
                    lambda plan, pairs, rows: got.append((plan.model_path, pairs[0][0].name, rows[0])), timeout_s=120)
    good = [r for path, _, r in got if path == card["path"]]
    bad = {name: r for path, name, r in got if path == str(broken)}
    assert [r["status"] for r in good] == ["ok", "ok"]
    assert bad["tg4"]["status"] == "error" and bad["tg4"]["error"]
    assert bad["pp16"]["status"] == "skipped"


def test_adaptive_rounds_follow_the_schedule_of_looks(tmp_path):
    # n_batch does not touch single-token decoding: tg at 128 vs 256 is the same work, so with no band
    # (equivalence 0) the comparison rarely decides and the schedule of looks has to run
    from kit.sweep import Adaptive
    from kit.verdicts import INCONCLUSIVE, compare, rows_confidence

    a, b = BASE.replace(n_batch=128), BASE.replace(n_batch=256)
    adaptive = Adaptive.against("G3", b, [a, b], looks=3, max_s=120, equivalence=0.0)
    assert adaptive.pairs == [(a, b)]
    df = run_sweep("adapt", [a, b], [tg(4)], repetitions=3, out_root=tmp_path, progress=False, timeout_s=300,
                   adaptive=adaptive)
    assert list(df["status"]) == ["ok", "ok"] and set(df["looks_planned"]) == {3}
    assert df["looks"].nunique() == 1                       # a pair's two sides run the same blocks
    looks = int(df["looks"].iloc[0])
    assert all(len(s) == 3 * looks for s in df["samples_ts"])
    conf = rows_confidence(df)
    assert conf == pytest.approx(1 - 0.05 / 3)
    final = compare("G3", df["samples_ts"].iloc[0], df["samples_ts"].iloc[1], equivalence=0.0, confidence=conf)
    # the sweep stopped either because the pair was decided, or at the end of the schedule, and says which
    assert bool(df["looks_capped"].iloc[0]) == (final.verdict == INCONCLUSIVE)
    if final.verdict == INCONCLUSIVE:
        assert looks == 3
    assert adaptive.spent_s > 0 or looks == 1
    # a resumed sweep keeps the longer rows: the trial key is the plan's, not the number of looks taken
    again = run_sweep("adapt", [a, b], [tg(4)], repetitions=3, out_root=tmp_path, progress=False, adaptive=adaptive)
    assert len(again) == 2


def test_adaptive_time_cap_stops_extra_rounds(tmp_path):
    from kit.sweep import Adaptive

    a, b = BASE.replace(n_batch=128), BASE.replace(n_batch=256)
    capped = Adaptive.against("G3", b, [a], looks=4, max_s=0, equivalence=0.0)
    df = run_sweep("capped", [a, b], [tg(4)], repetitions=3, out_root=tmp_path, progress=False, adaptive=capped)
    assert set(df["looks"]) == {1} and all(len(s) == 3 for s in df["samples_ts"])
    assert capped.spent_s == 0
    with pytest.raises(Exception, match="looks"):
        Adaptive("G3", [(a, b)], looks=0)
