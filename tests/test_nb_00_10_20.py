"""Smoke runs of notebooks 00, 10 and 20 on the real bundled model, through conftest's `run_notebook` with
notebooks/quick.json's parameters. Each asserts the rows, the figures and the labels the rows imply: on a build
without GPU offload G1 is exactly "not testable here" with that reason; G2 and G3 are measured on the CPU and
say that the GPU part is not testable. The GPU-only checks need an offloading build and an NVIDIA GPU."""
from __future__ import annotations

import json
import shutil

import pytest

from kit.gpu import build_supports_gpu_offload
from kit.paths import NOTEBOOKS_DIR, QUICK_FILE, REPO_ROOT
from kit.results import load_results
from kit.search import NOT_TESTABLE_NO_OFFLOAD, offload_support
from kit.verdicts import MIXED, NOT_TESTABLE, decide, read_verdicts

OFFLOAD = offload_support()["testable"]   # an offloading build and a device (NVML's or llama.cpp's: Vulkan's llvmpipe)
cpu_only = pytest.mark.skipif(OFFLOAD, reason="checks the CPU-only path; this build offloads to a GPU")
gpu_only = pytest.mark.skipif(not OFFLOAD, reason="needs a llama.cpp build with GPU offload and a device (make "
                                                  "vulkan; make gpu-test)")


def quick_params(stem: str) -> dict:
    """The smoke parameters run_notebook uses (notebooks/quick.json), to assert against."""
    return json.loads(QUICK_FILE.read_text())[stem]


@pytest.mark.notebook
def test_notebook_00_environment(run_notebook) -> None:
    run = run_notebook("00_environment")
    quick = quick_params("00_environment")
    out = run.out
    env = json.loads((out / "environment.json").read_text())
    card = json.loads((out / "model_card.json").read_text())
    assert card["n_layers"] == 30 and card["n_ctx_train"] == 8192 and len(card["sha256"]) == 64
    assert card["read_per_token_bytes"] > 50 * 2**20
    roof = env["decode_roofline"]
    assert env["mem_read_gbs"] > 0 and env["mem_bw_buffer_mb"] == quick["bandwidth_mb"]
    assert roof["tg_upper_bound_ts"] == pytest.approx(env["mem_read_gbs"] * 1e9 / card["read_per_token_bytes"], rel=1e-3)
    assert 1 < roof["tg_measured_ts"] < 10_000 and roof["tg_ci"][0] <= roof["tg_measured_ts"] <= roof["tg_ci"][1]
    assert roof["tg_fraction_of_bound"] == pytest.approx(roof["tg_measured_ts"] / roof["tg_upper_bound_ts"], rel=1e-2)
    assert f"Measured tg{quick['n_gen']}: " in run.text and "% of the bound" in run.text
    if not env["gpu_offload"]:
        assert "This build has no GPU offload" in env["gpu_offload_statement"]
        assert "This build has no GPU offload" in run.text
    rows = load_results(out)
    assert set(rows.test) == {f"pp{quick['n_prompt']}", f"tg{quick['n_gen']}"}
    assert (rows.status == "ok").all() and (rows.median_ts > 1).all()
    assert (out / "figures" / "decode_roofline.png").stat().st_size > 1000
    assert not (out / "verdicts.json").exists()


@pytest.mark.notebook
@cpu_only
def test_notebook_10_gpu_layers_on_a_cpu_build(run_notebook) -> None:
    run = run_notebook("10_gpu_layers")
    out = run.out
    (g1,) = read_verdicts(out)
    assert g1["claim"] == "G1" and g1["verdict"] == NOT_TESTABLE
    if not build_supports_gpu_offload():
        assert g1["reason"] == NOT_TESTABLE_NO_OFFLOAD
    rows = load_results(out)
    assert set(rows.n_gpu_layers) == {0} and (rows.status == "ok").all()  # the CPU baseline, measured
    d = g1["details"]
    tg0 = rows[rows.test_kind == "tg"].median_ts.median()
    assert d["cpu_baseline_tg_ts"] == pytest.approx(tg0, rel=0.05) and d["cpu_baseline_pp_ts"] > 1
    assert d["cpu_baseline_rss_mb"] > 50 and d["cpu_baseline_ttft_ms"] > 0
    search = json.loads((out / "gpu_search.json").read_text())
    assert search["layers"]["probes"] == [] and search["layers"]["testable"] is False
    assert search["layers"]["best_n_gpu_layers"] == 0 and search["context"]["best_n_ctx"] is None
    assert "CPU baseline (n_gpu_layers=0)" in run.text and "install a GPU build" in run.text
    assert (out / "figures" / "gpu_layers.png").stat().st_size > 1000


@pytest.mark.notebook
@pytest.mark.gpu
@gpu_only
def test_notebook_10_gpu_layers_on_a_gpu(run_notebook) -> None:
    run = run_notebook("10_gpu_layers")
    out = run.out
    (g1,) = read_verdicts(out)
    search = json.loads((out / "gpu_search.json").read_text())
    assert search["support"]["testable"] is True
    best = search["layers"]["best_n_gpu_layers"]
    assert best == 31  # the bundled 92 MiB model fits on any GPU: every layer, the output layer included
    assert search["context"]["best_n_ctx"] == 8192
    rows = load_results(out)
    assert set(rows.n_gpu_layers) == {0, 16, 30, 31} and (rows.status == "ok").all()
    offloaded = rows[rows.n_gpu_layers >= 16]
    # the layers went to the device: llama.cpp allocated their weights there (and NVML saw it, where it can look)
    assert (offloaded.vram_llama_model_mb > 0).all() and (offloaded.vram_llama_kv_mb > 0).all()
    assert rows[rows.n_gpu_layers == 0].vram_llama_model_mb.fillna(0).max() < offloaded.vram_llama_model_mb.min()
    if offloaded.vram_peak_mb.notna().any():
        assert (offloaded.vram_peak_mb > offloaded.vram_baseline_mb).all()
    assert (out / "figures" / "gpu_layers.png").stat().st_size > 1000
    assert g1["verdict"] != NOT_TESTABLE and g1["details"]["candidate_layers"] == 31
    assert g1["details"]["baseline_layers"] == 30 and g1["ci_low"] <= g1["effect"] <= g1["ci_high"]
    assert f"n_gpu_layers={best} (the most that fit" in run.text
    assert [c["condition"] for c in g1["conditions"]] == ["tg", "pp"]


@pytest.mark.notebook
def test_notebook_20_batch_flash_attn(run_notebook) -> None:
    quick = quick_params("20_batch_flash_attn")
    assert quick["repetitions"] >= 3  # fewer give no interval, and the verdicts would (rightly) be "not testable"
    run = run_notebook("20_batch_flash_attn")
    out = run.out
    verdicts = {v["claim"]: v for v in read_verdicts(out)}
    assert set(verdicts) == {"G2", "G3"}
    g3, g2 = verdicts["G3"], verdicts["G2"]
    assert g3["verdict"] != NOT_TESTABLE and 0.25 < g3["effect"] < 4 and g3["ci_low"] <= g3["effect"] <= g3["ci_high"]
    assert [p["n_prompt"] for p in g3["details"]["per_prompt"]] == quick["prompt_lengths"]
    # G2: one sub-verdict per test and depth, each the one rule's label on its own interval and band; the claim's
    # label is the one they share, else mixed
    conds = {c["condition"]: c for c in g2["conditions"]}
    assert set(conds) == {f"{m} at depth {d}" for m in ("pp", "tg") for d in quick["depths"]}
    assert g2["depends_on"] == "test and context depth"
    for c in conds.values():
        assert c["verdict"] == decide(c["ci_low"], c["ci_high"], equivalence=c["band"]) and c["band"] == 0.05
    labels = {c["verdict"] for c in conds.values()}
    assert g2["verdict"] == (labels.pop() if len(labels) == 1 else MIXED)
    assert 0.25 < g2["effect"] < 4 and g2["details"]["test"] == "tg" and g2["details"]["n_depth"] == 64
    assert g2["effect"] == conds["tg at depth 64"]["effect"]
    assert [c["condition"] for c in g3["conditions"]] == [f"{n}-token prompt" for n in quick["prompt_lengths"]]
    assert g3["verdict"] == decide(g3["ci_low"], g3["ci_high"], equivalence=g3["band"])
    if not OFFLOAD:
        assert "not testable here" in g3["reason"] and "not testable here" in g2["reason"]
        assert g3["details"]["scope"] == g2["details"]["scope"] == "cpu"
    rows = load_results(out)
    assert (rows.status == "ok").all() and (rows.median_ts > 1).all()
    batch = rows[rows.part == "batch_grid"]
    # 3 x 2 grid less 32/64 (n_ubatch > n_batch is skipped)
    assert set(zip(batch.n_batch, batch.n_ubatch)) == {(32, 32), (64, 32), (64, 64), (128, 32), (128, 64)}
    assert (batch[batch.n_batch == 128].n_batch_effective == 96).all()  # clamped to n_ctx (the longest prompt)
    flash = rows[rows.part == "flash_attn"]
    assert set(zip(flash.flash_attn, flash.n_depth)) == {(False, 0), (False, 64), (True, 0), (True, 64)}
    for fig in ("batch_heatmaps", "flash_attn_depth"):
        assert (out / "figures" / f"{fig}.png").stat().st_size > 1000
    assert "G3: " in run.text and "G2: " in run.text
    assert "2 cells were clamped by llama.cpp" in run.text  # 128/32 and 128/64 ran as 96


@pytest.mark.notebook
def test_notebook_00_run_from_the_notebooks_folder_writes_under_the_repo_outputs(run_notebook, tmp_path) -> None:
    """As JupyterLab runs it: the kernel starts in notebooks/, and a relative out_dir still means the repo's
    outputs/ folder (here a throwaway name under it), never notebooks/outputs/."""
    rel = f"outputs/cwd-check-{tmp_path.name}"
    target = REPO_ROOT / rel
    try:
        run_notebook("00_environment", cwd=NOTEBOOKS_DIR, out_dir=rel, repetitions=1, bandwidth_mb=16)
        assert (target / "environment.json").exists() and (target / "figures" / "decode_roofline.png").exists()
        assert not (NOTEBOOKS_DIR / rel).exists()
    finally:
        shutil.rmtree(target, ignore_errors=True)
