"""Quantization study (claims Q1, Q2): build a ladder of quantized files, measure speed and quality side by side.

The ladder is built with llama.cpp's own quantizer (`llama_cpp.llama_model_quantize`), each file in a child
process whose llama.cpp log and stderr go to a log file beside the file (the quantizer prints every tensor).
Files are cached under <cache_dir>/<source sha256[:16]>/ so a second run reuses them.

F16 is the reference. When the source is itself quantized (the bundled model is Q4_1) the F16 file is a
dequantized copy: it carries the source's rounding, every other rung is a re-quantization of those weights,
and KLD measures the distance from that F16, not from the original full-precision model. `reference_note`
says so.

k-quants work on rows of 256 weights. A tensor whose rows are not a multiple of 256 (576 on the bundled model)
is stored in a fallback type (Q4_K -> Q5_0, Q6_K -> Q8_0, Q2_K/Q3_K -> Q4_0, ...); the quantizer counts these
and `ladder_table` reports the count and the share of weights really stored in the type's base k-quant.

Measured per file through `kit.sweep.run_sweep` (one child process per file, model loaded once):
pp and tg as llama-bench times them, load time, peak RSS, and `kit.quality:kld_test` against the F16
reference (perplexity, KL divergence, top-1 agreement, with their uncertainties). `run_quantization_study` runs it;
`study_table` puts speed and quality in one row per type, `write_study_table` saves that as table.csv.
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import llama_cpp
import pandas as pd

from kit import quality
from kit.config import Settings, SettingsError, StudyConfig, check_rule, param
from kit.logs import llama_log_to_file
from kit.measure import pp, tg
from kit.models import model_card, read_gguf_header, resolve_model, sha256_file
from kit.paths import DEFAULT_MODEL, REPO_ROOT, resolve as resolve_path
from kit.progress import progress_bar
from kit.results import RESULTS_FILE
from kit.sweep import Adaptive, run_sweep
from kit.verdicts import (SUPPORTED, UNSTABLE_CV, Band, Verdict, bootstrap_ratio, combine, compare, cv, decide,
                          evidence_path, median_ci, not_testable, ratio_of, rows_confidence)

# llama_ftype values (llama.h)
FTYPES = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11,
    "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18, "BF16": 32,
}
# the ggml type a file type is named after (mixes such as Q4_K_M put some tensors in a higher type on purpose)
BASE_TYPE = {
    "F32": "F32", "F16": "F16", "BF16": "BF16", "Q8_0": "Q8_0", "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0",
    "Q5_1": "Q5_1", "Q2_K": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K", "Q4_K_S": "Q4_K",
    "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K",
}
UNQUANTIZED = ("F32", "F16", "BF16")
LADDER = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_K_S", "Q4_0", "Q3_K_M", "Q2_K")
REFERENCE_TYPE = "F16"
# the guide, section 4: fastest -> best quality
GUIDE_SPEED_ORDER = ("Q2_K", "Q3_K_M", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K")
GUIDE_RECOMMENDED = {"production": ("Q4_K_M", "Q4_K_S"), "development": ("Q3_K_M",), "quality": ("Q5_K_M",)}
DEFAULT_CACHE_DIR = "outputs/cache/quantized"   # relative: to the repository root (kit.paths.resolve)
TABLE_FILE = "table.csv"
# what the notebook shows of the ladder, and of the speed-and-quality table
LADDER_COLUMNS = ("quant_type", "size_mib", "bits_per_weight", "n_fallback", "n_tensors", "base_type",
                  "base_type_share_pct", "tensor_types", "cached")
TABLE_COLUMNS = ("quant_type", "size_mib", "bits_per_weight", "n_fallback", "base_type_share_pct", "load_ms",
                 "rss_peak_mb", "pp_ts", "pp_ci_low", "pp_ci_high", "tg_ts", "tg_ci_low", "tg_ci_high", "ppl",
                 "ppl_stderr", "kld_mean", "kld_stderr", "kld_p99", "top1_agree_pct", "top1_agree_stderr_pct", "errors")

_FALLBACK_LINE = re.compile(r"warning:\s+(\S+)\s+- ncols\s+(\d+) not divisible by\s+(\d+) \(required for type\s+(\S+)\)"
                            r".*?-> falling back to\s+(\S+)")
_FALLBACK_TOTAL = re.compile(r"WARNING: (\d+) of (\d+) tensor\(s\) required fallback quantization")


# ---- the study's config ---------------------------------------------------------------------------------------
@dataclass
class QuantStudy(StudyConfig):
    """Validated parameters of the quantization study (notebook 50)."""

    model: str = param(DEFAULT_MODEL, "source GGUF: bundled name or path (ideally F16)")
    repetitions: int = param(5, "timed pp/tg runs per file, after one warm-up", ge=1)
    out_dir: str = param("outputs/50_quantization", "rows, ladder, table, figures, verdicts")
    types: list[str] = param(["F16", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_K_S", "Q4_0", "Q3_K_M", "Q2_K"],
                             "file types to build and measure (F16 is always the reference)", choices=FTYPES)
    n_prompt: int = param(128, "pp test size in tokens", ge=1)
    n_gen: int = param(32, "tg test size in tokens", ge=1)
    ppl_n_ctx: int = param(256, "perplexity / KLD chunk size in tokens (second half of each chunk is scored)", ge=16)
    ppl_chunks: int = param(4, "chunks of held-out text", ge=1)
    n_threads: int = param(0, "generation threads (0: llama-cpp-python's default)", ge=0)
    cache_dir: str = param(DEFAULT_CACHE_DIR, "quantized files and reference log-probs (relative: to the "
                                              "repository root; git-ignored)")
    timeout_s: float = param(600.0, "seconds one trial may take before its child is killed", gt=0)
    looks: int = param(3, "blocks of `repetitions` rounds at most while an adjacent Q1 pair is inconclusive (1: none "
                          "added); every look and the verdict at the Bonferroni confidence 1 - 0.05/looks", ge=1, le=10)
    looks_max_s: float = param(120.0, "seconds of added rounds at most", ge=0)

    def check(self) -> None:
        """No duplicate types; the reference first (it is always built and measured); the model exists."""
        check_rule(len(set(self.types)) == len(self.types), f"types has duplicates: {self.types}")
        self.types = [REFERENCE_TYPE] + [t for t in self.types if t != REFERENCE_TYPE]
        resolve_model(self.model)  # a bad path fails here, before anything is built

    @property
    def n_ctx(self) -> int:
        """The context every file is loaded with: holds the speed tests and one perplexity chunk."""
        need = max(self.n_prompt + self.n_gen, self.ppl_n_ctx)
        return max(512, 256 * math.ceil(need / 256))

    @property
    def cache_path(self) -> Path:
        """cache_dir as an absolute path (relative values from the repository root)."""
        return resolve_path(self.cache_dir)


# ---- building the ladder ---------------------------------------------------------------------------------------
def quantize_file(source: str | os.PathLike, out_path: str | os.PathLike, ftype: str, nthread: int | None = None,
                  allow_requantize: bool = True, log_file: str | os.PathLike | None = None,
                  timeout_s: float = 1800) -> dict:
    """Quantize `source` to `ftype` in a child process; llama.cpp's output goes to `log_file`, not the caller.

    Writes to a temporary name and renames on success, so a killed run leaves no half file in the cache.
    """
    if ftype not in FTYPES:
        raise SettingsError(f"unknown file type {ftype!r}; known: {', '.join(FTYPES)}")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = Path(log_file) if log_file else out.with_suffix(".quantize.log")
    tmp = out.with_name(out.name + f".part{os.getpid()}")
    cmd = [sys.executable, "-m", "kit.studies.quantization", str(Path(source).resolve()), str(tmp.resolve()), ftype,
           str(nthread or 0), "1" if allow_requantize else "0", str(log.resolve())]
    t0 = time.perf_counter()
    with open(log, "ab") as err:
        err.write(f"\n=== quantize {Path(source).name} -> {ftype} ({time.strftime('%Y-%m-%dT%H:%M:%S')}) ===\n".encode())
        err.flush()
        proc = subprocess.run(cmd, stdout=err, stderr=err, stdin=subprocess.DEVNULL, timeout=timeout_s,
                              cwd=str(REPO_ROOT),
                              env={**os.environ, "GGML_NO_BACKTRACE": "1"})
    seconds = time.perf_counter() - t0
    if proc.returncode != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-8:])
        raise RuntimeError(f"quantizing {source} to {ftype} failed (exit {proc.returncode}); log {log}:\n{tail}")
    os.replace(tmp, out)
    return {"path": str(out), "quantize_s": round(seconds, 3), "log": str(log)}


def _child_main(argv: list[str]) -> int:
    """python -m kit.studies.quantization SRC DST FTYPE NTHREAD ALLOW_REQUANTIZE LOG"""
    src, dst, ftype, nthread, allow, log = argv[1:7]
    llama_log_to_file(log)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.nthread = int(nthread)
    params.allow_requantize = allow == "1"
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    return 0 if rc == 0 else 1


def parse_fallbacks(log_text: str) -> dict:
    """Fallback tensors named in one quantization log: [(tensor, ncols, wanted, used)] and llama.cpp's total."""
    items = [{"tensor": m.group(1), "ncols": int(m.group(2)), "wanted": m.group(4), "used": m.group(5)}
             for m in _FALLBACK_LINE.finditer(log_text)]
    tot = _FALLBACK_TOTAL.findall(log_text)
    return {"fallbacks": items, "n_fallback": int(tot[-1][0]) if tot else len(items),
            "n_tensors": int(tot[-1][1]) if tot else None}


def _gguf_tensor_infos(path: str | os.PathLike) -> list[tuple[str, tuple, int, int]]:
    """(name, shape, ggml type id, n_elements) of every tensor, from the header alone (kit.models)."""
    return [(t["name"], t["shape"], t["type"], t["n_elements"]) for t in read_gguf_header(path)["tensors"]]


def tensor_types(path: str | os.PathLike) -> dict:
    """Histogram of tensor storage types read back from the GGUF: tensors, weights and bytes per ggml type."""
    hist: dict[str, dict] = {}
    n_el = n_bytes = 0
    for _, shape, ttype, n in _gguf_tensor_infos(path):
        qt = gguf.GGMLQuantizationType(ttype)
        block, size = gguf.GGML_QUANT_SIZES[qt]
        nb = n // block * size
        h = hist.setdefault(qt.name, {"tensors": 0, "weights": 0, "bytes": 0, "matrices": 0, "matrix_weights": 0})
        h["tensors"] += 1
        h["weights"] += n
        h["bytes"] += nb
        if len(shape) >= 2:
            h["matrices"] += 1
            h["matrix_weights"] += n
        n_el += n
        n_bytes += nb
    return {"types": hist, "n_weights": n_el, "tensor_bytes": n_bytes, "n_tensors": sum(h["tensors"] for h in hist.values()),
            "bits_per_weight": 8.0 * n_bytes / max(n_el, 1)}


def ladder_dir(source: str | os.PathLike, cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR) -> Path:
    """<cache_dir>/<source sha256[:16]>/; a relative cache_dir is taken from the repository root."""
    return resolve_path(cache_dir) / sha256_file(resolve_model(source))[:16]


def _ensure_file(folder: Path, stem: str, ftype: str, src_path: str, manifest: dict, nthread: int | None):
    """The file of one type in the cache, built unless the manifest knows it at its size: (path, log, info, cached)."""
    path = folder / f"{stem}.{ftype}.gguf"
    log = folder / f"{stem}.{ftype}.quantize.log"
    info = manifest.get(ftype)
    cached = path.exists() and info is not None and info.get("size_bytes") == path.stat().st_size
    if not cached:
        if log.exists():
            log.unlink()
        # F16 from the source (dequantizing it if needed); the rest from F16, as one quantizes from a float file
        base = src_path if ftype == REFERENCE_TYPE else str(folder / f"{stem}.{REFERENCE_TYPE}.gguf")
        q = quantize_file(base, path, ftype, nthread=nthread, allow_requantize=True, log_file=log)
        fb = parse_fallbacks(log.read_text(errors="replace"))
        info = {"quantize_s": q["quantize_s"], "from": Path(base).name, "size_bytes": path.stat().st_size, **fb}
        manifest[ftype] = info
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return path, log, info, cached


def _ladder_entry(ftype: str, path: Path, log: Path, info: dict, cached: bool, src) -> dict:
    """One rung of the ladder: the file's facts, its tensor types read back, and the source's facts."""
    th = tensor_types(path)
    mats = sum(h["matrix_weights"] for h in th["types"].values())
    base_type = BASE_TYPE.get(ftype, ftype)
    in_base = th["types"].get(base_type, {}).get("matrix_weights", 0)
    return {
        "quant_type": ftype,
        "path": str(path),
        "size_bytes": path.stat().st_size,
        "size_mib": round(path.stat().st_size / 2**20, 2),
        "bits_per_weight": round(th["bits_per_weight"], 3),
        "n_fallback": info.get("n_fallback", 0),
        "n_tensors": th["n_tensors"],
        "fallbacks": info.get("fallbacks", []),
        "base_type": base_type,
        "base_type_share_pct": round(100.0 * in_base / max(mats, 1), 1),
        "tensor_types": {k: v["tensors"] for k, v in sorted(th["types"].items())},
        "quantize_s": info.get("quantize_s"),
        "cached": cached,
        "quantized_from": info.get("from"),
        "source_file": src.file_name,
        "source_type": src.file_type,
        "source_sha256": src.sha256,
        "reference_dequantized": src.file_type.upper() not in UNQUANTIZED,
        "log": str(log),
    }


def build_ladder(source: str | os.PathLike = DEFAULT_MODEL, types=LADDER,
                 cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR, nthread: int | None = None,
                 progress: bool = True) -> list[dict]:
    """Build (or reuse from the cache) one file per type; F16 first, every other type quantized from that F16.

    Returns one dict per type: type, path, size_bytes, bits_per_weight, n_fallback, fallbacks, tensor type
    histogram, share of matrix weights in the type's base type, cached (reused) or quantize_s, and source facts.
    """
    src = model_card(source)
    folder = ladder_dir(source, cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    stem = Path(src.file_name).stem.replace(f".{src.file_type}", "")
    types = [REFERENCE_TYPE] + [t for t in types if t != REFERENCE_TYPE]
    manifest_p = folder / "manifest.json"
    manifest = json.loads(manifest_p.read_text()) if manifest_p.exists() else {}
    out = []
    with progress_bar(len(types), "quantize", unit="file", enabled=progress) as bar:
        for ftype in types:
            path, log, info, cached = _ensure_file(folder, stem, ftype, src.path, manifest, nthread)
            out.append(_ladder_entry(ftype, path, log, info, cached, src))
            bar.update(1)
    return out


def ladder_table(ladder: list[dict]):
    """The ladder as the notebook shows it: size, bits per weight, fallbacks, tensor types, cached or built."""
    return pd.DataFrame(ladder)[list(LADDER_COLUMNS)]


def reference_note(ladder: list[dict]) -> str:
    r = ladder[0]
    if r["reference_dequantized"]:
        return (f"The F16 reference was dequantized from a {r['source_type']} source ({r['source_file']}): it "
                f"carries {r['source_type']}'s rounding, so KLD is the distance from that F16, not from the "
                f"original full-precision weights, and types above {r['source_type']} cannot recover lost precision.")
    return f"The F16 reference was converted from a {r['source_type']} source ({r['source_file']})."


# ---- running the study --------------------------------------------------------------------------------------------
def run_quantization_study(study: QuantStudy, progress: bool = True):
    """Build the ladder, then one sweep trial per file (reference first): pp, tg and KLD against F16.

    Returns (ladder, rows DataFrame). Rows go to <out_dir>/results.jsonl; the ladder to <out_dir>/ladder.json.
    """
    ladder = build_ladder(study.model, study.types, study.cache_path, progress=progress)
    out = study.out_path
    out.mkdir(parents=True, exist_ok=True)
    (out / "ladder.json").write_text(json.dumps(ladder, indent=1))
    ref = ladder[0]
    ref_sha = sha256_file(ref["path"])
    # keyed by the F16 file's sha256, the held-out text and the chunking (kit.quality.reference_path)
    ref_logits = quality.reference_path(ref["path"], study.ppl_n_ctx, study.ppl_chunks,
                                        cache_dir=Path(ref["path"]).parent / "logprobs")
    base = Settings(n_ctx=study.n_ctx, n_threads=study.n_threads or None)
    configs = [base.replace(model=l["path"]) for l in ladder]
    tests = [pp(study.n_prompt), tg(study.n_gen),
             quality.kld_test_for(ref_logits, study.ppl_n_ctx, study.ppl_chunks, reference_sha256=ref_sha)]
    by_type = {l["quant_type"]: c for l, c in zip(ladder, configs)}
    order = [q for q in GUIDE_SPEED_ORDER if q in by_type]
    # Q1's adjacent pairs in the guide's order get more interleaved tg rounds while inconclusive
    adaptive = Adaptive("Q1", [(by_type[a], by_type[b]) for a, b in zip(order, order[1:])], looks=study.looks,
                        max_s=study.looks_max_s, test_kinds=("tg",))
    df = run_sweep(out.name, configs, tests, repetitions=study.repetitions, out_root=out.parent,
                   timeout_s=study.timeout_s, progress=progress, extra={"claim": "Q1"}, adaptive=adaptive)
    return ladder, df


def study_table(ladder: list[dict], df):
    """One row per type: size, bpw, fallbacks, load, pp/tg medians with 95 % CIs, peak RSS, PPL, KLD, top-1."""
    by_sha = {sha256_file(l["path"]): l for l in ladder}
    rows = []
    for sha, l in by_sha.items():
        d = df[(df["model_sha256"] == sha)] if not df.empty else df
        r = {"quant_type": l["quant_type"], "size_mib": l["size_mib"], "bits_per_weight": l["bits_per_weight"],
             "n_fallback": l["n_fallback"], "base_type_share_pct": l["base_type_share_pct"]}
        ok = d[d["status"] == "ok"] if not d.empty else d
        r["load_ms"] = round(float(ok["load_ms"].median()), 1) if not ok.empty else None
        # peak RSS up to the end of the speed tests: the KLD test afterwards holds the reference's log-probs too
        speed = ok[ok["test_kind"].isin(["pp", "tg"])] if not ok.empty else ok
        r["rss_peak_mb"] = round(float(speed["rss_peak_mb"].max()), 1) if not speed.empty else None
        for kind, name in (("pp", "pp"), ("tg", "tg")):
            t = ok[ok["test_kind"] == kind] if not ok.empty else ok
            if not t.empty:
                s = list(t.iloc[-1]["samples_ts"])
                _, lo, hi = median_ci(s)
                r[f"{name}_ts"] = round(statistics.median(s), 2)
                r[f"{name}_ci_low"], r[f"{name}_ci_high"] = round(lo, 2), round(hi, 2)
                r[f"{name}_samples"] = s
                if kind == "tg" and "looks_planned" in t and t.iloc[-1]["looks_planned"] == t.iloc[-1]["looks_planned"]:
                    r["looks_planned"] = int(t.iloc[-1]["looks_planned"])  # Q1's schedule: its verdict's confidence
            else:
                r[f"{name}_ts"] = None
        k = ok[ok["test_kind"] == "kit.quality:kld_test"] if not ok.empty else ok
        if not k.empty:
            k = k.iloc[-1]
            for c in ("ppl", "ppl_stderr", "kld_mean", "kld_stderr", "kld_p99", "top1_agree_pct",
                      "top1_agree_stderr_pct", "ln_ppl_ratio", "ln_ppl_ratio_stderr", "n_tokens_scored"):
                r[c] = k[c]
        failed = d[d["status"] != "ok"] if not d.empty else d
        r["errors"] = "; ".join(f"{a}: {b}" for a, b in zip(failed["test"], failed["error"])) if not failed.empty else ""
        rows.append(r)
    return pd.DataFrame(rows)


def write_study_table(study: QuantStudy, table) -> Path:
    """<out_dir>/table.csv: study_table without its raw sample lists (they stay in results.jsonl)."""
    path = study.out_path / TABLE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    table.drop(columns=["pp_samples", "tg_samples"], errors="ignore").to_csv(path, index=False)
    return path


def table_view(table):
    """The columns of study_table the notebook shows: speed with intervals, quality with standard errors."""
    return table[[c for c in TABLE_COLUMNS if c in table]]


def verdict_evidence(study: QuantStudy, figure_path: str | os.PathLike) -> list[str]:
    """Q1's and Q2's evidence: the figure, the rows and the table, relative to the outputs root."""
    files = [figure_path, study.out_path / RESULTS_FILE, study.out_path / TABLE_FILE]
    return [evidence_path(f, study.out_path) for f in files]


def pairs_table(q1):
    """Q1's adjacent pairs in the guide's order (each compared on raw tg samples) as a table; empty without."""
    return pd.DataFrame(q1.details.get("pairs", []))


def front_table(q2):
    """Q2's sub-verdicts, one per recommended type: the type it must outrun, the tg ratio with its interval and
    the label; empty without."""
    rows = [{"condition": c["condition"], "metric": c.get("metric"), "ratio": c.get("effect"),
             "ci": [c.get("ci_low"), c.get("ci_high")], "verdict": Verdict.from_dict(c).label()}
            for c in q2.conditions]
    return pd.DataFrame(rows, columns=["condition", "metric", "ratio", "ci", "verdict"])


# ---- Pareto front and verdicts --------------------------------------------------------------------------------------
def pareto_front(table, x: str = "tg_ts", x_higher_is_better: bool = True, y: str = "kld_mean") -> list[str]:
    """Types no other type beats on both axes (point estimates; lower y is better)."""
    t = table.dropna(subset=[x, y])
    front = []
    for _, a in t.iterrows():
        dominated = False
        for _, b in t.iterrows():
            if b["quant_type"] == a["quant_type"]:
                continue
            bx_ok = b[x] >= a[x] if x_higher_is_better else b[x] <= a[x]
            bx_better = b[x] > a[x] if x_higher_is_better else b[x] < a[x]
            if bx_ok and b[y] <= a[y] and (bx_better or b[y] < a[y]):
                dominated = True
                break
        if not dominated:
            front.append(a["quant_type"])
    return front


def clear_dominators(table, quant_type: str) -> list[dict]:
    """Types that beat `quant_type` on tg speed AND KLD beyond their uncertainty.

    Speed: the bootstrap 95 % interval of the ratio of tg medians lies above 1. KLD: the difference of means is
    more than 1.96 combined standard errors (the KLD values of two types are computed on the same tokens, so
    this is conservative).
    """
    t = table.set_index("quant_type")
    a = t.loc[quant_type]
    out = []
    for name, b in t.iterrows():
        if name == quant_type or b.get("tg_samples") is None or a.get("tg_samples") is None:
            continue
        if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in (a["kld_mean"], b["kld_mean"])):
            continue
        point, lo, hi = bootstrap_ratio(b["tg_samples"], a["tg_samples"])
        se = math.sqrt(float(a["kld_stderr"]) ** 2 + float(b["kld_stderr"]) ** 2)
        kld_better = float(a["kld_mean"]) - float(b["kld_mean"]) > 1.96 * se
        if decide(lo, hi, claimed="better") == SUPPORTED and kld_better:  # faster beyond the interval
            out.append({"by": name, "tg_ratio": round(point, 4), "tg_ci": [round(lo, 4), round(hi, 4)],
                        "kld_diff": round(float(a["kld_mean"]) - float(b["kld_mean"]), 6)})
    return out


def spearman(x, y) -> float:
    rx, ry = pd.Series(list(x)).rank(), pd.Series(list(y)).rank()
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(rx.corr(ry))


def _rank_agreement(samples: dict[str, list[float]], present: list[str], n_boot: int, seed: int):
    """Spearman rho between the guide's position and the measured median tg (+1 = the guide's order), with a
    bootstrap 95 % interval over the raw samples of every type: Q1's evidence, not its label."""
    guide_rank = list(range(len(present)))  # 0 = the guide's fastest
    med = [statistics.median(samples[q]) for q in present]
    rho = -spearman(guide_rank, med)
    rng = random.Random(seed)
    boots = []
    for _ in range(n_boot):
        m = [statistics.median(rng.choices(samples[q], k=len(samples[q]))) for q in present]
        r = -spearman(guide_rank, m)
        if not math.isnan(r):
            boots.append(r)
    boots.sort()
    if not boots:
        return rho, med, None, None
    return rho, med, boots[int(0.025 * (len(boots) - 1))], boots[int(0.975 * (len(boots) - 1))]


def speed_order_verdict(table, evidence=(), n_boot: int = 2000, seed: int = 0, confidence: float | None = None):
    """Q1: does tg speed fall along the guide's order Q2_K > Q3_K_M > Q4_0 > Q4_K_M > Q5_K_M > Q6_K?

    The claim is an order, so it is judged on adjacent pairs in the guide's order (those measured): one
    sub-verdict per pair (`kit.verdicts.compare` on the raw tg samples, "faster" claimed, Q1's band), combined
    (`kit.verdicts.combine`): the label every pair shares, else mixed with each pair's label. A rank correlation
    alone would call a half-scrambled order "supported" whenever it leans the right way; it is evidence in
    details and the summary: Spearman rho between the guide's position and the measured median tg
    (+1 = exactly the guide's order), with a bootstrap interval over the raw samples of every type.
    confidence: None takes the table's (`rows_confidence`: higher after adaptive looks).
    """
    confidence = confidence or rows_confidence(table)
    t = table.set_index("quant_type")
    present = [q for q in GUIDE_SPEED_ORDER if q in t.index and t.loc[q].get("tg_samples") is not None
               and isinstance(t.loc[q]["tg_samples"], list) and len(t.loc[q]["tg_samples"]) > 0]
    if len(present) < 3:
        return not_testable("Q1", f"only {len(present)} of the guide's types {list(GUIDE_SPEED_ORDER)} were measured "
                                  f"({present}); an order needs at least 3", evidence=evidence)
    samples = {q: [float(v) for v in t.loc[q]["tg_samples"]] for q in present}
    rho, med, lo, hi = _rank_agreement(samples, present, n_boot, seed)
    conditions, pairs = {}, []
    for faster, slower in zip(present, present[1:]):
        v = compare("Q1", samples[faster], samples[slower], claimed="better", evidence=evidence,
                    confidence=confidence, metric=f"tg t/s {faster} / {slower}")
        conditions[f"{faster} faster than {slower}"] = v
        pairs.append({"faster_per_guide": faster, "slower_per_guide": slower, "verdict": v.verdict,
                      "label": v.label(), "ratio": ratio_of(v), "ci": [v.ci_low, v.ci_high], "unstable": v.unstable})
    measured = [q for _, q in sorted(zip(med, present), reverse=True)]
    rho_text = f"rho = {rho:.2f}" + (f" (95 % CI {lo:.2f} to {hi:.2f})" if lo is not None else "")
    out = combine("Q1", conditions, depends_on="adjacent pair in the guide's order", evidence=evidence,
                  details={"pairs": pairs, "measured_order": measured, "guide_order": present,
                           "median_tg_ts": dict(zip(present, [round(m, 3) for m in med])),
                           "spearman_rho": round(rho, 4), "spearman_rho_ci": [lo, hi]})
    out.summary = (f"Measured tg order (fastest first): {' > '.join(measured)}; guide: {' > '.join(present)}. "
                   f"Rank agreement {rho_text}. Per adjacent pair: {out.summary}")
    if out.unstable:
        out.reason = "; ".join(x for x in (out.reason, "unstable tg samples (CV >= 10 %): repeat on a quieter "
                                                       "machine") if x)
    return out


Q2_BAND = Band(0.05, "the speed axis of the front, judged like a speed ratio (Q1's band): a type less than 5 % "
                     "faster than one closer to F16 buys nothing worth its quality loss")


def _competitor(t, q: str) -> str | None:
    """The fastest (median tg) type at least as close to F16 as q (lower or equal mean KLD): the type q must
    outrun to be on the tg-vs-KLD front."""
    a = t.loc[q]
    rivals = [(statistics.median(b["tg_samples"]), name) for name, b in t.iterrows()
              if name != q and isinstance(b.get("tg_samples"), list) and b["tg_samples"]
              and float(b["kld_mean"]) <= float(a["kld_mean"])]
    return max(rivals)[1] if rivals else None


def _front_condition(t, q: str, role: str, confidence: float) -> tuple[str, Verdict]:
    """Q2's sub-verdict for one recommended type: its tg against its competitor's, "faster" claimed."""
    rival = _competitor(t, q)
    if rival is None:
        return (f"{q} ({role})", not_testable("Q2", f"no measured type is as close to F16 as {q}: nothing to "
                                                    "outrun, it is on the front by construction"))
    v = compare("Q2", list(t.loc[q]["tg_samples"]), list(t.loc[rival]["tg_samples"]), claimed="better",
                equivalence=Q2_BAND.width, confidence=confidence,
                metric=f"tg t/s {q} / {rival} (the fastest type at least as close to F16)")
    v.band_why = Q2_BAND.why
    return f"{q} ({role}) against {rival}", v


def recommendation_verdict(table, evidence=(), confidence: float | None = None):
    """Q2: are the guide's recommended types (Q4_K_M, Q4_K_S, Q3_K_M, Q5_K_M) on the tg-vs-KLD Pareto front?

    A type is on the front when it is faster than every type at least as close to F16 (mean KLD), so each
    recommended type gets one sub-verdict: its tg against the fastest such type (`kit.verdicts.compare`,
    "faster" claimed, `Q2_BAND`): supported = on the front beyond noise; refuted = a type closer to F16 is
    faster (dominated); no meaningful effect = no faster than a better-quality type within the band. Combined
    (`kit.verdicts.combine`): mixed when the recommended types differ. The point-estimate fronts and the clear
    dominators (faster beyond the interval and closer to F16 beyond 1.96 standard errors) are in details.
    confidence: None takes the table's (`rows_confidence`: Q1's looks chose how many tg samples each type has).
    """
    confidence = confidence or rows_confidence(table)
    recommended = [q for qs in GUIDE_RECOMMENDED.values() for q in qs]
    t = table.dropna(subset=["tg_ts", "kld_mean"])
    present = [q for q in recommended if q in set(t["quant_type"])]
    if not present:
        return not_testable("Q2", f"none of the recommended types {recommended} was measured", evidence=evidence)
    if len(t) < 2:
        return not_testable("Q2", "a Pareto front needs at least two measured types", evidence=evidence)
    front = pareto_front(t, "tg_ts", True, "kld_mean")
    size_front = pareto_front(t, "size_mib", False, "kld_mean")
    dominated = {q: clear_dominators(t, q) for q in present}
    role = {q: r for r, qs in GUIDE_RECOMMENDED.items() for q in qs}
    ti = t.set_index("quant_type")
    conditions = dict(_front_condition(ti, q, role[q], confidence) for q in present)
    noisy = [q for q, s in zip(t["quant_type"], t["tg_samples"])
             if isinstance(s, list) and (cv(s) or 0) >= UNSTABLE_CV]
    out = combine("Q2", conditions, depends_on="recommended type", evidence=evidence,
                  details={"front_tg_kld": front, "front_size_kld": size_front, "clear_dominators": dominated,
                           "share_on_front": round(len([q for q in present if q in front]) / len(present), 4),
                           "missing": [q for q in recommended if q not in present]})
    out.summary = (f"tg-vs-KLD Pareto front (point estimates): {', '.join(front)}; size-vs-KLD front: "
                   f"{', '.join(size_front)}. Each recommended type against the fastest type at least as close to "
                   f"F16: {out.summary}")
    if noisy:
        out.reason = "; ".join(x for x in (out.reason, f"unstable tg samples (CV >= 10 %) for {', '.join(noisy)}: "
                                                       "the speed axis of the front may move on a quieter machine")
                               if x)
    return out


def _pareto_panel(ax, t, x: str, higher_is_better: bool, xlabel: str, floor: float) -> None:
    """One axis of plot_pareto: every type with error bars, the front joined, labels cycled so they do not stack."""
    front = pareto_front(t, x, higher_is_better, "kld_mean")
    xerr = None
    if x == "tg_ts":
        xerr = [(t["tg_ts"] - t["tg_ci_low"]).clip(lower=0), (t["tg_ci_high"] - t["tg_ts"]).clip(lower=0)]
    yerr = [(t["kld_stderr"] * 1.96).clip(upper=t["kld_plot"] - floor * 0.999).fillna(0), t["kld_stderr"] * 1.96]
    ax.errorbar(t[x], t["kld_plot"], xerr=xerr, yerr=yerr, fmt="o", color="0.5", ecolor="0.7", capsize=2)
    f = t[t["quant_type"].isin(front)].sort_values(x)
    ax.plot(f[x], f["kld_plot"], "-o", color="C3", label="Pareto front")
    offsets = [(4, 4), (4, -12), (-30, 8), (6, -4)]  # cycled along x, so neighbours' labels do not stack
    for i, (_, r) in enumerate(t.sort_values(x).iterrows()):
        on = r["quant_type"] in front
        label = r["quant_type"] + (" (reference)" if r["quant_type"] == REFERENCE_TYPE else "")
        ax.annotate(label, (r[x], r["kld_plot"]), textcoords="offset points", xytext=offsets[i % len(offsets)],
                    fontsize=9, fontweight="bold" if on else "normal", color="C3" if on else "0.3")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean KLD vs F16 (nats/token, 95 % CI; F16 at the floor)")
    ax.legend(loc="best")


def plot_pareto(table):
    """Two panels: tg t/s against mean KLD, size against mean KLD; error bars; the front joined and named.
    Returns the Figure (save it with kit.plots.save_figure)."""
    # kit.plots imports matplotlib: imported here, because the quantizer's child runs this module as __main__
    # and never plots
    from kit.plots import panel_figure

    t = table.dropna(subset=["tg_ts", "kld_mean"]).copy()
    # KLD of the reference is 0: a log axis needs a floor
    others = t.loc[(t["quant_type"] != REFERENCE_TYPE) & (t["kld_mean"] > 0), "kld_mean"]
    floor = float(others.min()) / 5 if len(others) else 1e-6
    t["kld_plot"] = t["kld_mean"].clip(lower=floor)
    return panel_figure([
        ("speed against quality loss (better: right, down)",
         lambda ax: _pareto_panel(ax, t, "tg_ts", True, "tg t/s (median, 95 % CI)", floor)),
        ("size against quality loss (better: left, down)",
         lambda ax: _pareto_panel(ax, t, "size_mib", False, "file size (MiB)", floor)),
    ], ncols=2, figsize=(12, 4.5))


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv))
