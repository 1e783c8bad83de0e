"""Fidelity benchmark: the kit's engine numbers against `llama-bench` built from the same llama.cpp source.

llama-cpp-python's sdist vendors llama.cpp; we build its `llama-bench` with the same compiler and the same
default flags (GGML_NATIVE on) into the cache folder, run both on the same model and settings, and report
the ratio kit / llama-bench for pp and tg. Target: within 5 % (pp) and 3 % (tg). This is a benchmark that
prints numbers, not a test: on a busy machine it can miss, and the report says how noisy each side was.

    python -m kit fidelity [-m MODEL] [-p 512] [-n 128] [-r 5] [-t THREADS]
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

from kit.config import Settings
from kit.measure import pp, tg
from kit.models import resolve_model
from kit.paths import DEFAULT_MODEL, OUTPUTS, OUTPUTS_DIR, resolve
from kit.sweep import run_trial
from kit.verdicts import bootstrap_ratio, cv

CACHE = OUTPUTS_DIR / "cache" / "llama-bench"


def llama_cpp_python_version() -> str:
    return metadata.version("llama-cpp-python")


def build_llama_bench(cache: Path = CACHE, jobs: int | None = None, log=print) -> Path:
    """Download the sdist of the installed llama-cpp-python version from the package index and build llama-bench."""
    return build_llama_tool("llama-bench", cache, jobs, log)


def build_llama_tool(target: str, cache: Path = CACHE, jobs: int | None = None, log=print) -> Path:
    """llama.cpp's `target` (llama-bench, llama-server) built from the llama.cpp that the installed
    llama-cpp-python vendors (its sdist, from the package index), with the same compiler and default flags, into
    the cache folder; one build tree serves every target."""
    version = llama_cpp_python_version()
    root = cache / version
    exe = root / "build" / "bin" / target
    if exe.exists():
        return exe
    root.mkdir(parents=True, exist_ok=True)
    src = root / "src"
    if not src.exists():
        with tempfile.TemporaryDirectory() as tmp:
            log(f"fetching the llama-cpp-python {version} sdist (it vendors llama.cpp)")
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            "-d", tmp, f"llama-cpp-python=={version}"], check=True, capture_output=True)
            sdist = next(Path(tmp).glob("*.tar.gz"))
            with tarfile.open(sdist) as tf:
                tf.extractall(tmp, filter="data")
            vendor = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
            shutil.copytree(vendor, src)
    log(f"building {target} (a few minutes) in {root / 'build'}")
    build = root / "build"
    with open(root / "build.log", "a") as logf:
        subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=ON",
                        "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_OPENSSL=OFF"], check=True, stdout=logf,
                       stderr=subprocess.STDOUT)
        subprocess.run(["cmake", "--build", str(build), "--target", target, "-j",
                        str(jobs or os.cpu_count() or 2)], check=True, stdout=logf, stderr=subprocess.STDOUT)
    return exe


def run_llama_bench(exe: Path, model: str, n_prompt: int, n_gen: int, reps: int, threads: int,
                    n_batch: int = 512, n_ubatch: int = 512) -> list[dict]:
    out = subprocess.run([str(exe), "-m", model, "-p", str(n_prompt), "-n", str(n_gen), "-r", str(reps),
                          "-t", str(threads), "-b", str(n_batch), "-ub", str(n_ubatch), "-fa", "0", "-o", "json"],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def run_fidelity(model: str = DEFAULT_MODEL, n_prompt: int = 512, n_gen: int = 128, reps: int = 5,
                 threads: int | None = None, rounds: int = 3, out_root: str = OUTPUTS, log=print) -> dict:
    """Alternate llama-bench and the kit `rounds` times (so drift hits both), then compare medians."""
    threads = threads or (os.cpu_count() or 1)
    path = str(resolve_model(model))
    exe = build_llama_bench(log=log)
    ref = {"pp": [], "tg": []}
    kit_ = {"pp": [], "tg": []}
    for r in range(rounds):
        log(f"round {r + 1}/{rounds}: llama-bench")
        for row in run_llama_bench(exe, path, n_prompt, n_gen, reps, threads):
            kind = "pp" if row["n_prompt"] else "tg"
            ref[kind] += row["samples_ts"]
        log(f"round {r + 1}/{rounds}: kit")
        # llama-bench sizes the context to the test (n_prompt + n_gen); do the same
        for kind, test, n_ctx in (("pp", pp(n_prompt), n_prompt), ("tg", tg(n_gen), n_gen)):
            s = Settings(model=path, n_ctx=max(n_ctx, 64), n_batch=512, n_ubatch=512, n_threads=threads,
                         n_threads_batch=threads)
            rows = run_trial(s, [test], reps, path)
            if rows[0]["status"] != "ok":
                raise RuntimeError(f"kit trial failed: {rows[0]['error']}")
            kit_[kind] += rows[0]["samples_ts"]
    result = {"model": path, "threads": threads, "n_prompt": n_prompt, "n_gen": n_gen, "reps": reps,
              "rounds": rounds, "llama_cpp_python": llama_cpp_python_version(), "tests": {}}
    for kind, target in (("pp", 0.05), ("tg", 0.03)):
        ratio, lo, hi = bootstrap_ratio(kit_[kind], ref[kind])
        result["tests"][kind] = {
            "llama_bench_median_ts": round(statistics.median(ref[kind]), 2),
            "kit_median_ts": round(statistics.median(kit_[kind]), 2),
            "ratio": round(ratio, 4), "ci_low": round(lo, 4), "ci_high": round(hi, 4),
            "llama_bench_cv": round(cv(ref[kind]) or 0, 4), "kit_cv": round(cv(kit_[kind]) or 0, 4),
            "target": f"within {target:.0%}", "within_target": abs(ratio - 1) <= target,
            "llama_bench_samples_ts": ref[kind], "kit_samples_ts": kit_[kind],
        }
    out = resolve(out_root) / "fidelity"
    out.mkdir(parents=True, exist_ok=True)
    (out / "fidelity.json").write_text(json.dumps(result, indent=2))
    return result


def format_result(res: dict) -> str:
    lines = ["| test | llama-bench t/s | kit t/s | kit / llama-bench (95 % CI) | CV lb / kit | target |",
             "|---|---:|---:|---|---|---|"]
    for kind, t in res["tests"].items():
        n = res["n_prompt"] if kind == "pp" else res["n_gen"]
        lines.append(f"| {kind}{n} | {t['llama_bench_median_ts']:.1f} | {t['kit_median_ts']:.1f} | "
                     f"{t['ratio']:.3f} ({t['ci_low']:.3f}-{t['ci_high']:.3f}) | "
                     f"{t['llama_bench_cv']:.1%} / {t['kit_cv']:.1%} | {t['target']}: "
                     f"{'yes' if t['within_target'] else 'NO'} |")
    return "\n".join(lines)
