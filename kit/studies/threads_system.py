"""Threads, NUMA, priority and loading: the guide's CPU and system claims (C1, C2, O1, O2, O3).

Parts of one study (`SystemStudy`), each a set of sweeps through `kit.sweep.run_sweep` (one child process per
configuration):
- threads (C1): n_threads = n_threads_batch = t for t from 1 to the logical CPU count. llama.cpp decodes a
  single token with n_threads and a batch of tokens with n_threads_batch, so tg measures the first and pp the
  second inside one trial.
- numa (C2): llama.cpp's NUMA strategies, where the machine has more than one NUMA node.
- priority (O1): tg with busy-loop processes competing for every core, at normal and raised priority
  (test kind `niced_bench`: the trial's child starts the load, applies the niceness to all its threads, then runs
  a time-boxed tg). The load runs in the bench's own session, where niceness orders the two, and in other sessions:
  with the kernel's autogroup on, CPU time is shared between sessions first and niceness only counts inside one.
- loading (O2, O3): use_mmap x use_mlock, with the model file evicted from the page cache (cold) or fully
  cached (warm): load time, time to the first token after loading, resident and locked memory. O3's pair (mmap on,
  mlock off, cold against warm) gets more blocks of loads while its comparison is inconclusive (a fixed schedule of
  `load_looks` looks, each at kit.verdicts.looks_confidence, capped by `load_max_s` seconds).

Verdicts follow kit.verdicts' one rule with each claim's stated band (kit.verdicts.BANDS). A claim measured under
several conditions is one verdict per condition, combined (kit.verdicts.combine: "mixed" when they disagree): C1 per
test (generation, prompt processing), O1 per place of the competing load and way of making the priority gap.

Test kinds defined here run inside a trial's child process (see `kit.measure.Test`):
  Test("kit.studies.threads_system:niced_bench", params={"nice": -10, "inner": "tg", "n_gen": 64, "max_s": 1.5,
                                         "load_procs": 2, "load_nice": 0, "load_session": "same"})
  Test("kit.studies.threads_system:load_probe", params={"cache": "cold", "rep": 0, "n_prompt": 32})
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import mmap as _mmap
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import psutil

from kit.config import NUMA_STRATEGIES, Settings, SettingsError, StudyConfig, StudyConfigError, check_rule, param
from kit.environment import memory_settings, numa_nodes
from kit.measure import Test, bench_engine, pp, proc_memory, tg
from kit.models import model_card
from kit.paths import DEFAULT_MODEL
from kit.results import ci_label, load_results, median_table, ok_rows, pooled_samples
from kit.sweep import Adaptive, run_sweep
from kit.verdicts import DECIDED, NOT_TESTABLE, combine, compare, looks_confidence, not_testable, rows_confidence

CACHE_STATES = ("cold", "warm")
# A cold trial whose file is still more than this fraction in the page cache is not cold: flagged in the row.
COLD_RESIDENCY_MAX = 0.05
PARTS = ("threads", "numa", "priority", "loading")
NICED_BENCH = "kit.studies.threads_system:niced_bench"
LOAD_PROBE = "kit.studies.threads_system:load_probe"


# ---- the machine ----------------------------------------------------------------------------------------------
def cpu_topology() -> dict:
    """Logical CPUs, physical cores, the CPUs this process may run on, and what os.cpu_count() says (the guide's value)."""
    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or logical
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    return {"os_cpu_count": os.cpu_count(), "logical": logical, "physical": physical, "affinity": affinity,
            "smt": logical > physical}


def default_thread_counts(topology: dict | None = None) -> list[int]:
    """1, 2, 4, ... up to the logical count, plus the physical and logical counts themselves."""
    topo = topology or cpu_topology()
    top = topo["logical"]
    counts = {1, topo["physical"], top, topo["affinity"]}
    k = 2
    while k < top:
        counts.add(k)
        k *= 2
    return sorted(c for c in counts if 1 <= c <= top)


def priority_permitted(nice: int) -> tuple[bool, str]:
    """Can this process set its niceness `nice` lower than now (raise priority)? Checked in a throwaway child."""
    if nice >= 0:
        return True, "lowering priority needs no privilege"
    code = f"import os\ntry:\n os.nice({int(nice)})\n print('ok')\nexcept PermissionError as e:\n print('denied', e)"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"could not check: {exc}"
    if out.startswith("ok"):
        return True, "permitted (root or CAP_SYS_NICE, or RLIMIT_NICE allows it)"
    return False, ("raising priority (negative nice) needs root or CAP_SYS_NICE (or a raised RLIMIT_NICE); "
                   f"this user may not: {out}")


# ---- memory of this process, and page-cache residency of a file ---------------------------------------------
def autogroup_enabled() -> bool | None:
    """Linux's scheduler autogroup (sched_autogroup_enabled): CPU time shared between sessions before niceness."""
    try:
        return Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    except OSError:
        return None


def autogroup_of(pid: int | str = "self") -> str | None:
    try:
        return Path(f"/proc/{pid}/autogroup").read_text().split()[0]
    except (OSError, IndexError):
        return None


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def page_cache_residency(path: str | os.PathLike) -> float | None:
    """Fraction of the file's pages in the page cache (mincore on a fresh read-only mapping; touches nothing)."""
    size = os.path.getsize(path)
    if size == 0:
        return None
    libc = _libc()
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, _mmap.PROT_READ, _mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            n_pages = (size + _mmap.PAGESIZE - 1) // _mmap.PAGESIZE
            vec = (ctypes.c_ubyte * n_pages)()
            if libc.mincore(addr, size, vec) != 0:
                return None
            return sum(b & 1 for b in vec) / n_pages
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def evict_from_page_cache(path: str | os.PathLike) -> dict:
    """Ask the kernel to drop the file's clean pages (posix_fadvise DONTNEED): no root needed, touches no other file.

    Pages that another process has mapped stay resident; the residency before and after says whether it worked.
    (/proc/sys/vm/drop_caches would work for any file but needs root and empties the cache of every process on
    the machine, disturbing whatever else runs: not used.)
    """
    before = page_cache_residency(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    after = page_cache_residency(path)
    return {"evict_method": "posix_fadvise(DONTNEED)", "residency_before_evict": before, "residency": after}


def warm_page_cache(path: str | os.PathLike) -> dict:
    """Read the whole file once so every page is cached."""
    with open(path, "rb") as fh:
        while fh.read(1 << 22):
            pass
    return {"evict_method": None, "residency_before_evict": None, "residency": page_cache_residency(path)}


def private_model_copy(model_path: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """A copy of the model that only this study maps, so eviction is not defeated by other processes mapping the
    original (a server, a notebook). Kept if already there with the same size."""
    src = Path(model_path)
    dst = Path(folder) / src.name
    if not (dst.exists() and dst.stat().st_size == src.stat().st_size):
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".part")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    return dst


# ---- niceness of every thread ---------------------------------------------------------------------------------
def _thread_ids() -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir("/proc/self/task"))
    except OSError:
        return [0]


def _thread_nice(tid: int) -> int | None:
    try:
        fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[16])  # field 19 of stat; fields[0] is field 3 (state)
    except (OSError, IndexError, ValueError):
        return None


def set_process_niceness(increment: int) -> dict:
    """Add `increment` to the niceness of every thread of this process (as `nice -n` would at start).

    On Linux niceness belongs to a thread: os.nice() alone would leave llama.cpp's worker threads, created at
    load time, at their old priority. Threads created afterwards inherit from the main thread.
    """
    before = os.getpriority(os.PRIO_PROCESS, 0)
    target = max(-20, min(19, before + increment))
    errors = []
    for tid in _thread_ids():
        try:
            os.setpriority(os.PRIO_PROCESS, tid, target)
        except PermissionError as exc:
            errors.append(str(exc))
        except ProcessLookupError:
            pass
    nices = [n for n in (_thread_nice(t) for t in _thread_ids()) if n is not None]
    return {"nice_requested": increment, "nice_before": before, "nice_target": target,
            "nice_applied": not errors and all(n == target for n in nices),
            "thread_nice": sorted(set(nices)), "n_threads_in_process": len(nices),
            "nice_error": errors[0] if errors else None}


# ---- a competing CPU load -------------------------------------------------------------------------------------
class CompetingLoad:
    """`n_procs` busy-loop processes (one per core by default) at niceness `nice`, for at most `max_s` seconds.

    Each child ends on its own after max_s even if this process dies; on leaving the `with` block every child
    started here is killed by its pid.
    """

    def __init__(self, n_procs: int | None = None, nice: int = 0, max_s: float = 600.0, new_session: bool = False):
        self.n_procs = n_procs or os.cpu_count() or 1
        self.nice = nice
        self.max_s = max_s
        self.new_session = new_session  # each load process in a session of its own (its own autogroup)
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> "CompetingLoad":
        code = ("import ctypes, os, time\ntry:\n    ctypes.CDLL('libc.so.6').prctl(1, 9)\nexcept OSError:\n    pass\n"
                f"os.nice({int(self.nice)})\nend = time.monotonic() + {float(self.max_s)}\n"
                "x = 0\nwhile time.monotonic() < end:\n    x += 1\n")
        for _ in range(self.n_procs):
            self.procs.append(subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                               start_new_session=self.new_session))
        time.sleep(0.3)  # let them reach the loop
        return self

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            p.wait(timeout=10)
        self.procs = []


# ---- test kinds (run inside a trial's child) ------------------------------------------------------------------
def niced_bench(lm, test: Test, repetitions: int = 5) -> dict:
    """Test kind: change this process's niceness by params['nice'] (all threads), then the engine bench.

    params: nice (int increment, e.g. -10), inner ("tg" or "pp"), n_gen / n_prompt, n_depth, and max_s: with
    inner "tg", each timed run stops after n_gen tokens or once max_s seconds have passed, whichever comes first
    (see `timeboxed_tg`). If raising priority is not permitted the bench still runs at the old niceness and the row says so
    (nice_applied False, nice_error).
    """
    p = dict(test.params or {})
    unknown = set(p) - {"nice", "inner", "n_gen", "n_prompt", "n_depth", "condition", "max_s", "load_procs",
                        "load_nice", "load_session"}
    if unknown:
        raise ValueError(f"unknown niced_bench parameter(s): {sorted(unknown)}")
    inner = p.get("inner", "tg")
    if inner not in ("tg", "pp"):
        raise ValueError(f"niced_bench inner={inner!r}: use 'tg' or 'pp'")
    n = int(p.get("n_gen" if inner == "tg" else "n_prompt", 64 if inner == "tg" else 256))
    inner_test = Test(inner, n_gen=n if inner == "tg" else 0, n_prompt=n if inner == "pp" else 0,
                      n_depth=int(p.get("n_depth", 0)))
    max_s = p.get("max_s")
    if max_s is not None and (isinstance(max_s, bool) or not isinstance(max_s, (int, float)) or max_s <= 0):
        raise ValueError(f"niced_bench max_s={max_s!r} must be a positive number of seconds")
    if max_s is not None and (inner != "tg" or inner_test.n_depth):
        raise ValueError("niced_bench max_s applies to a tg test at depth 0 only")
    load_procs = int(p.get("load_procs", 0))
    session = p.get("load_session", "same")
    if session not in ("same", "other"):
        raise ValueError(f"niced_bench load_session={session!r}: use 'same' or 'other'")
    budget = (repetitions + 1) * ((float(max_s) if max_s else 60.0) + 10.0) + 60.0
    competing = (CompetingLoad(load_procs, nice=int(p.get("load_nice", 0)), max_s=budget,
                               new_session=session == "other") if load_procs > 0 else contextlib.nullcontext())
    with competing as load:
        info = set_process_niceness(int(p.get("nice", 0)))
        if load is not None:
            mine = autogroup_of()
            info["load_same_autogroup"] = all(autogroup_of(pid) == mine for pid in load.pids) if mine else None
        row = timeboxed_tg(lm, n, float(max_s), repetitions) if max_s else bench_engine(lm, inner_test, repetitions)
    info["thread_nice_after"] = sorted({n for n in (_thread_nice(t) for t in _thread_ids()) if n is not None})
    row.update(info, inner=inner, inner_test=inner_test.name, autogroup=autogroup_enabled())
    row["timed_region"] = f"after setting niceness: {row['timed_region']}"
    return row


def timeboxed_tg(lm, n_gen: int, max_s: float, repetitions: int = 5, warmup: bool = True, seed: int = 0) -> dict:
    """tg from an empty cache, each timed run stopped after n_gen tokens or max_s seconds (`bench_engine` max_s)."""
    return bench_engine(lm, tg(n_gen), repetitions, warmup=warmup, seed=seed, max_s=max_s)


def load_probe(lm, test: Test, repetitions: int = 1) -> dict:
    """Test kind: right after loading, memory, then the first prompt + token (where mmap'ed pages fault in).

    The load itself is timed by the trial (row column load_ms); this adds first_decode_ms, and memory before and
    after it. One sample per trial: repeat with params['rep'].
    """
    p = dict(test.params or {})
    n_prompt = int(p.get("n_prompt", 32))
    after_load = {f"{k}_after_load": v for k, v in proc_memory().items()}
    path = getattr(lm.llm, "model_path", None)
    after_load["residency_after_load"] = page_cache_residency(path) if path else None
    t0 = time.perf_counter()
    bench_engine(lm, Test("pg", n_prompt=n_prompt, n_gen=1), repetitions=1, warmup=False)
    first_ms = (time.perf_counter() - t0) * 1e3
    return {"n_prompt": n_prompt, "n_gen": 1, "n_depth": 0, "repetitions": 1,
            "first_decode_ms": round(first_ms, 3), **after_load, **proc_memory(),
            "timed_region": "first_decode_ms: the first prompt of n_prompt random tokens + 1 generated token after "
                            "loading, including the page faults mmap defers; load_ms: llama_cpp.Llama() construction"}




# ---- the study ------------------------------------------------------------------------------------------------
# Seen on a 2-core machine: under a busy loop per core, the bench at nice -10 with n_threads = 2 decoded 0.28
# tokens/s (16 t/s at nice 0, 80 with no load): a fixed token count per run could take minutes per condition, so
# the priority part's runs are time-boxed (`timeboxed_tg`, SystemStudy.priority_max_s).


@dataclass
class SystemStudy(StudyConfig):
    """Threads (C1), NUMA (C2), priority under load (O1), loading (O2, O3). Validated on construction."""

    model: str = param(DEFAULT_MODEL, "bundled model name or a path to any GGUF")
    repetitions: int = param(5, "timed runs per test after one warm-up", ge=1)
    out_dir: str = param("outputs/40_threads_system", "rows, figures and verdicts go here")
    n_ctx: int = param(1024, "context of every configuration", ge=1)
    n_gen: int = param(64, "generated tokens per tg test", ge=1)
    n_prompt: int = param(256, "prompt tokens per pp test", ge=1)
    thread_counts: list[int] = param([], "thread counts to sweep, empty means 1, 2, 4, ..., physical, logical", ge=1)
    numa_modes: list[str] = param(["disabled", "distribute", "isolate"], "NUMA strategies (multi-node machines only)",
                                  choices=NUMA_STRATEGIES)
    nice: int = param(-10, "niceness change of the bench process (the guide's nice -n -10)", ge=-20, le=19)
    load_nice_proxy: int = param(10, "niceness of the competing load in the no-root condition (the same priority "
                                     "gap)", ge=0, le=19)
    load_procs: int = param(0, "busy-loop processes, 0 means one per logical CPU", ge=0)
    priority_threads: int = param(0, "n_threads in the priority part, 0 means os.cpu_count() as in the guide", ge=0)
    priority_max_s: float = param(1.5, "a priority run stops after n_gen tokens or this many seconds (time-boxed)",
                                  gt=0, le=60)
    load_repetitions: int = param(5, "loads (trials) per loading condition and block (at least 5, like every "
                                                "timed comparison: 3 loads a side decided O3 both ways)", ge=1)
    load_looks: int = param(3, "O3's looks: while cold against warm (mmap on, mlock off) is inconclusive, another "
                               "block of load_repetitions loads of each runs, up to this many blocks (each look at "
                               "confidence 1 - 0.05/looks)", ge=1)
    load_max_s: float = param(60.0, "seconds O3's extra blocks may take in all; no block starts after", ge=0)
    mmap_values: list[bool] = param([True, False], "use_mmap values", nonempty=True)
    mlock_values: list[bool] = param([False, True], "use_mlock values", nonempty=True)
    first_prompt: int = param(32, "tokens of the first request after loading", ge=1)
    timeout_s: float = param(600.0, "seconds one trial may take before its child is killed", gt=0)
    looks: int = param(3, "C1's looks: blocks of `repetitions` interleaved rounds at most while os.cpu_count() "
                          "threads against another count is inconclusive; every look and the verdict at the "
                          "Bonferroni confidence 1 - 0.05/looks", ge=1, le=10)
    looks_max_s: float = param(60.0, "seconds of C1's added rounds at most", ge=0)

    def check(self) -> None:
        """Cross-field rules; reads the model card and the CPU topology, fills in the default thread counts."""
        check_rule("numactl" not in self.numa_modes,
                   "numa_modes: 'numactl' means the process was started under numactl; the sweep starts its own "
                   "children, so that mode is not reachable here (use 'isolate')")
        check_rule(self.n_prompt + self.n_gen <= self.n_ctx and self.first_prompt + 1 <= self.n_ctx,
                   f"n_ctx={self.n_ctx} must hold n_prompt + n_gen = {self.n_prompt + self.n_gen} and "
                   f"first_prompt + 1 = {self.first_prompt + 1}")
        check_rule(bool(str(self.out_dir).strip()), "out_dir must be a folder")
        try:
            self.base()  # model + context validated the settings' way
        except SettingsError as exc:
            raise StudyConfigError(f"{type(self).__name__}: {exc}") from None
        self.card = model_card(self.model)
        self.topology = cpu_topology()
        self.thread_counts = sorted(set(self.thread_counts or default_thread_counts(self.topology)))

    def base(self) -> Settings:
        return Settings(model=self.model, n_ctx=self.n_ctx)

    # -- threads
    def thread_configs(self) -> list[Settings]:
        return [self.base().replace(n_threads=t, n_threads_batch=t) for t in self.thread_counts]

    def thread_tests(self) -> list[Test]:
        return [tg(self.n_gen), pp(self.n_prompt)]

    # -- numa
    def numa_nodes(self) -> list[dict]:
        return numa_nodes()

    def numa_testable(self) -> tuple[bool, str]:
        nodes = self.numa_nodes()
        if len(nodes) > 1:
            return True, f"{len(nodes)} NUMA nodes"
        return False, (f"this machine has {len(nodes) or 1} NUMA node: every core reaches all memory at the same "
                       "cost, so binding threads and memory to a node (numactl, --numa) cannot change anything")

    def numa_configs(self) -> list[Settings]:
        n = self.topology["logical"]
        return [self.base().replace(numa=m, n_threads=n, n_threads_batch=n) for m in self.numa_modes]

    # -- priority
    def priority_settings(self) -> Settings:
        n = self.priority_threads or self.topology["os_cpu_count"] or 1
        return self.base().replace(n_threads=n, n_threads_batch=n)

    def priority_conditions(self) -> list[dict]:
        """role, label, competing load niceness (None: no load), niceness change of the bench, and where the load
        runs: in the bench's session ("same") or each process in a session of its own ("other")."""
        n, proxy = self.nice, self.load_nice_proxy
        return [
            {"role": "free", "condition": "no load", "load_nice": None, "nice": 0, "load_session": None},
            {"role": "load", "condition": "load", "load_nice": 0, "nice": 0, "load_session": "same"},
            {"role": "raised", "condition": f"load, bench nice {n:+d}", "load_nice": 0, "nice": n,
             "load_session": "same"},
            {"role": "proxy", "condition": f"load at nice {proxy:+d}", "load_nice": proxy, "nice": 0,
             "load_session": "same"},
            {"role": "other_load", "condition": "load in other sessions", "load_nice": 0, "nice": 0,
             "load_session": "other"},
            {"role": "other_raised", "condition": f"load in other sessions, bench nice {n:+d}", "load_nice": 0,
             "nice": n, "load_session": "other"},
        ]

    def load_processes(self) -> int:
        return self.load_procs or self.topology["logical"]

    def priority_test(self, cond: dict) -> Test:
        # time-boxed: with every core busy, llama.cpp's threads wait on each other at every barrier and a decode
        # can be 10-100x slower, so n_gen tokens x repetitions could run for many minutes per condition
        params = {"nice": cond["nice"], "inner": "tg", "n_gen": self.n_gen, "max_s": float(self.priority_max_s),
                  "condition": cond["condition"]}
        if cond["load_nice"] is not None:
            params.update(load_procs=self.load_processes(), load_nice=cond["load_nice"],
                          load_session=cond["load_session"])
        return Test(NICED_BENCH, params=params)

    # -- loading
    def loading_conditions(self) -> list[tuple[Settings, str]]:
        out = []
        for mm in self.mmap_values:
            for ml in self.mlock_values:
                for cache in CACHE_STATES:
                    out.append((self.base().replace(use_mmap=mm, use_mlock=ml, n_threads=None), cache))
        return out

    def load_test(self, cache: str, rep: int) -> Test:
        return Test(LOAD_PROBE, params={"cache": cache, "rep": rep, "n_prompt": self.first_prompt})

    def o3_settings(self) -> Settings:
        """The load settings O3 compares cold and warm: mmap on, mlock off (the defaults), else the first swept."""
        mm = True if True in self.mmap_values else self.mmap_values[0]
        ml = False if False in self.mlock_values else self.mlock_values[0]
        return self.base().replace(use_mmap=mm, use_mlock=ml, n_threads=None)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["topology"] = self.topology
        return d


# ---- running ----------------------------------------------------------------------------------------------------
def _sweep(study: SystemStudy, configs, tests, repetitions: int, part: str, extra: dict | None = None,
           progress: bool = True, adaptive: Adaptive | None = None):
    out = study.out_path
    return run_sweep(out.name, configs, tests, repetitions=repetitions, out_root=out.parent,
                     timeout_s=study.timeout_s, progress=progress, extra={"part": part, **(extra or {})},
                     adaptive=adaptive)


def run_threads(study: SystemStudy, progress: bool = True):
    """C1's thread counts, interleaved; os.cpu_count() threads against each other count gets more rounds while
    inconclusive (`looks`)."""
    configs = study.thread_configs()
    n_all = study.topology["os_cpu_count"]
    cand = [c for c in configs if c.n_threads == n_all]
    adaptive = Adaptive("C1", [(cand[0], c) for c in configs if c.n_threads != n_all], looks=study.looks,
                        max_s=study.looks_max_s) if cand else None
    return _sweep(study, configs, study.thread_tests(), study.repetitions, "threads", progress=progress,
                  adaptive=adaptive)


def run_numa(study: SystemStudy, progress: bool = True):
    """Runs only where there is more than one NUMA node; returns the study's rows either way."""
    ok, _ = study.numa_testable()
    if ok:
        _sweep(study, study.numa_configs(), study.thread_tests(), study.repetitions, "numa", progress=progress)
    return load_results(study.out_path)


def run_priority(study: SystemStudy, progress: bool = True):
    """Each condition is one trial; its child starts the competing load after loading the model and kills it at
    the end (so the load shares the bench's session, or not, exactly as the condition says)."""
    permitted, why = priority_permitted(study.nice)
    s = study.priority_settings()
    for cond in study.priority_conditions():
        extra = {"condition": cond["condition"], "priority_role": cond["role"], "load_nice": cond["load_nice"],
                 "load_session": cond["load_session"],
                 "load_procs": study.load_processes() if cond["load_nice"] is not None else 0,
                 "priority_permitted": permitted, "priority_check": why}
        _sweep(study, [s], [study.priority_test(cond)], study.repetitions, "priority", extra, progress)
    return load_results(study.out_path)


def run_loading(study: SystemStudy, progress: bool = True):
    """Cold and warm loads of a private copy of the model; page-cache residency recorded before every trial.

    One trial per load (a load happens once per trial); conditions are interleaved per repetition so a slow
    phase of a shared machine does not land on one condition only. Then O3's extra blocks (`o3_extra_blocks`).
    """
    copy = private_model_copy(study.card.path, study.out_path / "model_copy")
    model_card(copy)  # hashes the copy now (memoised): the sweep's own check must not re-read, and so re-cache, it
    try:
        for rep in range(study.load_repetitions):
            for s, cache in study.loading_conditions():
                _load_trial(study, s.replace(model=str(copy)), cache, rep, look=1)
        o3_extra_blocks(study, copy)
    finally:
        shutil.rmtree(copy.parent, ignore_errors=True)
    return load_results(study.out_path)


def _load_trial(study: SystemStudy, s: Settings, cache: str, rep: int, look: int) -> None:
    state = evict_from_page_cache(s.model) if cache == "cold" else warm_page_cache(s.model)
    state["cold_ok"] = (state["residency"] is not None and state["residency"] <= COLD_RESIDENCY_MAX) \
        if cache == "cold" else None
    _sweep(study, [s], [study.load_test(cache, rep)], 1, "loading",
           {"cache": cache, **state, "look": look, "looks_planned": study.load_looks}, progress=False)


def o3_extra_blocks(study: SystemStudy, copy: Path) -> int:
    """O3 on a fixed schedule of looks: after each block of load_repetitions cold and warm loads of its pair, the
    comparison at looks_confidence(load_looks); while inconclusive another block (cold and warm alternated), up to
    load_looks blocks and load_max_s seconds of extra blocks. Stopping at the first decided look keeps the error
    rate at 5 %. Returns the looks taken; rows carry their `look` and `looks_planned`."""
    s = study.o3_settings().replace(model=str(copy))
    look, spent = 1, 0.0
    while look < study.load_looks and spent < study.load_max_s:
        v = _o3_verdict(load_results(study.out_path), planned=study.load_looks)
        if v.verdict in DECIDED or (v.verdict == NOT_TESTABLE and "n_candidate" not in v.details):
            break  # decided, or not testable for a reason more loads cannot change (not too few of them)
        t0 = time.perf_counter()
        look += 1
        for rep in range((look - 1) * study.load_repetitions, look * study.load_repetitions):
            for cache in CACHE_STATES:
                _load_trial(study, s, cache, rep, look)
        spent += time.perf_counter() - t0
    return look


def run_system_study(study: SystemStudy, parts: tuple = PARTS, progress: bool = True):
    """Every part in turn; returns all rows of the study folder as a DataFrame."""
    runners = {"threads": run_threads, "numa": run_numa, "priority": run_priority, "loading": run_loading}
    for p in parts:
        if p not in runners:
            raise SettingsError(f"unknown part {p!r}; parts: {', '.join(runners)}")
        runners[p](study, progress=progress)
    return load_results(study.out_path)


# ---- analysis ---------------------------------------------------------------------------------------------------
def thread_table(df, study: SystemStudy):
    """Median t/s with its 95 % interval per thread count, for tg (n_threads) and pp (n_threads_batch)."""
    d = ok_rows(df, "threads")
    d = d[d["n_threads"].isin(study.thread_counts)] if not d.empty else d
    t = median_table(d, ["n_threads", "test_kind"], "samples_ts")
    return pd.DataFrame([{"threads": int(r["n_threads"]), "test": r["test_kind"], "median_ts": r["samples_ts"],
                          "ci_low": r["samples_ts_lo"], "ci_high": r["samples_ts_hi"], "n_samples": int(r["n"]),
                          "is_cpu_count": int(r["n_threads"]) == study.topology["os_cpu_count"],
                          "is_physical": int(r["n_threads"]) == study.topology["physical"]} for _, r in t.iterrows()])


def _thread_verdict(df, study: SystemStudy, kind: str, evidence):
    d = ok_rows(df, "threads")
    d = d[d["test_kind"] == kind] if not d.empty else d
    n_all = study.topology["os_cpu_count"]
    by_t = {int(t): pooled_samples(g) for t, g in d.groupby("n_threads")} if not d.empty else {}
    cand = by_t.get(n_all)
    others = {t: xs for t, xs in by_t.items() if t != n_all and xs}
    if not cand or not others:
        return not_testable("C1", f"{kind}: need rows at os.cpu_count()={n_all} threads and at another count "
                                  f"(have {sorted(by_t)})", evidence)
    best_t = max(others, key=lambda t: statistics.median(others[t]))
    phys = study.topology["physical"]
    base_t = phys if phys != n_all and phys in others else best_t
    what = "n_threads (generation)" if kind == "tg" else "n_threads_batch (prompt processing)"
    conf = rows_confidence(d)  # higher after C1's adaptive looks
    v = compare("C1", cand, others[base_t], claimed="better", evidence=evidence, confidence=conf,
                metric=f"{kind} t/s, {n_all} threads (os.cpu_count) / {base_t} threads "
                       f"({'physical cores' if base_t == phys else 'best other count'}), {what}")
    if base_t != best_t:
        v.details["vs_best"] = compare("C1", cand, others[best_t], claimed="better", confidence=conf,
                                       metric=f"{kind} t/s, {n_all} / {best_t} threads (best other)").to_dict()
    v.details.update(kind=kind, baseline_threads=base_t, best_other_threads=best_t, candidate_threads=n_all)
    return v


def thread_verdict(df, study: SystemStudy, evidence=()):
    """C1: one sub-verdict for generation (tg: n_threads) and one for prompt processing (pp: n_threads_batch),
    combined: "mixed" when they disagree. The effect shown is generation's."""
    tg_v = _thread_verdict(df, study, "tg", list(evidence))
    pp_v = _thread_verdict(df, study, "pp", list(evidence))
    topo = study.topology
    v = combine("C1", {"generation (tg, n_threads)": tg_v, "prompt processing (pp, n_threads_batch)": pp_v},
                depends_on="the test: generation (n_threads) or prompt processing (n_threads_batch)",
                evidence=list(evidence), details={**tg_v.details, "topology": topo})
    v.summary = (f"{v.summary} Machine: {topo['physical']} physical / {topo['logical']} logical cores, "
                 f"os.cpu_count()={topo['os_cpu_count']}.")
    return v


def numa_verdict(df, study: SystemStudy, evidence=()):
    """C2: numa=isolate (or another mode) against disabled, tg t/s; not testable on a single NUMA node."""
    ok, why = study.numa_testable()
    if not ok:
        return not_testable("C2", why, list(evidence), numa_nodes=study.numa_nodes())
    d = ok_rows(df, "numa")
    d = d[d["test_kind"] == "tg"] if not d.empty else d
    by = {m: pooled_samples(g) for m, g in d.groupby("numa")} if not d.empty else {}
    cand_mode = "isolate" if "isolate" in by else next((m for m in by if m != "disabled"), None)
    if "disabled" not in by or cand_mode is None:
        return not_testable("C2", f"NUMA rows missing (have {sorted(by)})", list(evidence))
    return compare("C2", by[cand_mode], by["disabled"], claimed="better", evidence=list(evidence),
                   metric=f"tg t/s, numa={cand_mode} (threads kept on one node, as numactl --cpunodebind) / disabled")


def priority_table(df):
    """Per priority condition, in the order run: median tg t/s with its interval, and how the niceness was set."""
    d = ok_rows(df, "priority")
    if d.empty:
        return pd.DataFrame()
    med = median_table(d, "condition", "samples_ts").set_index("condition")
    rows = []
    for cond, g in d.groupby("condition", sort=False):
        m, last = med.loc[cond], g.iloc[-1]
        rows.append({"condition": cond, "median_ts": m["samples_ts"], "ci_low": m["samples_ts_lo"],
                     "ci_high": m["samples_ts_hi"], "n_samples": int(m["n"]),
                     "nice_applied": last.get("nice_applied"), "bench_nice": last.get("nice_target"),
                     "load_nice": last.get("load_nice"), "load_session": last.get("load_session"),
                     "n_threads": last.get("n_threads")})
    return pd.DataFrame(rows)


def priority_verdict(df, study: SystemStudy, evidence=()):
    """O1: tg under a competing load, raised priority against normal, as one verdict per condition, combined
    ("mixed" when they disagree): the bench raised with the load in its own session; the no-root equivalent (the
    load lowered by the same amount: CFS shares CPU by the niceness *difference*); the bench raised with the load in
    other sessions, where the kernel's autogroup (if on) shares CPU time between sessions before niceness counts.
    A condition this machine cannot run (raising priority needs root or CAP_SYS_NICE) is not testable, with why."""
    d = ok_rows(df, "priority")
    conds = {c: g for c, g in d.groupby("condition")} if not d.empty else {}
    by_role = {c["role"]: conds.get(c["condition"]) for c in study.priority_conditions()}
    free, load, raised, proxy = (by_role.get(r) for r in ("free", "load", "raised", "proxy"))
    other_load, other_raised = by_role.get("other_load"), by_role.get("other_raised")
    if load is None:
        return not_testable("O1", "no rows under competing load", list(evidence))
    n, gap = study.nice, study.load_nice_proxy

    def raised_vs(cand, base, metric: str, where: str):
        if cand is None or base is None:
            return not_testable("O1", f"the {where} conditions did not run")
        if not bool(cand["nice_applied"].all()):
            why = cand["nice_error"].dropna().iloc[-1] if cand["nice_error"].notna().any() else "not applied"
            return not_testable("O1", f"raising priority is not permitted here ({why})")
        return compare("O1", pooled_samples(cand), pooled_samples(base), claimed="better", metric=metric)

    same = f"load in the bench's session, bench at nice {n:+d}"
    parts = {
        same: raised_vs(raised, load, f"tg t/s under load, bench at nice {n:+d} / nice 0", "same-session"),
        f"load in the bench's session at nice {gap:+d} (the same gap without root)":
            compare("O1", pooled_samples(proxy), pooled_samples(load), claimed="better",
                    metric=f"tg t/s under load, load at nice {gap:+d} / load at nice 0 (the priority gap of the bench "
                           f"at {-gap:+d})") if proxy is not None
            else not_testable("O1", "the no-root condition did not run"),
        f"load in other sessions, bench at nice {n:+d}":
            raised_vs(other_raised, other_load, f"tg t/s under load in other sessions, bench at nice {n:+d} / nice 0",
                      "other-session"),
    }
    details = {}
    if free is not None:
        details["load_slowdown"] = compare("O1", pooled_samples(load), pooled_samples(free), claimed="worse",
                                           metric="tg t/s, competing load / no load").to_dict()
    v = combine("O1", parts, depends_on="where the competing load runs (the bench's session or other sessions) and "
                "how the priority gap is made (bench raised, or load lowered)", headline=same,
                evidence=list(evidence), details=details)
    autogroup = next((bool(g["autogroup"].iloc[-1]) for g in (other_raised, raised, load)
                      if g is not None and "autogroup" in g and g["autogroup"].notna().any()), None)
    if autogroup:
        v.summary += (" This kernel shares CPU time between sessions before it looks at niceness (autogroup on), so "
                      "`nice` only orders processes of one session. A server competing with other sessions or "
                      "services needs its group's weight instead (the autogroup's nice in /proc/<pid>/autogroup, "
                      "systemd's CPUWeight=).")
    return v


def loading_table(df):
    """Per use_mmap x use_mlock x cache: load_ms, first_decode_ms, load + first, memory, residency (medians + CI)."""
    d = ok_rows(df, "loading")
    if d.empty:
        return pd.DataFrame()
    d = d.assign(load_to_first_ms=d["load_ms"] + d["first_decode_ms"])
    keys, timed = ["use_mmap", "use_mlock", "cache"], ["load_ms", "first_decode_ms", "load_to_first_ms"]
    med = median_table(d, keys, timed, samples=False).set_index(keys)
    rows = []
    for (mm, ml, cache), g in d.groupby(keys):
        m = med.loc[(mm, ml, cache)]
        r = {"use_mmap": mm, "use_mlock": ml, "cache": cache, "n_loads": len(g)}
        for col in timed:
            r[col] = m[col]
            r[f"{col}_ci"] = ci_label(m[f"{col}_lo"], m[f"{col}_hi"])
        for col in ("proc_rss_mb", "rss_anon_mb", "rss_file_mb", "vm_lck_mb", "rss_file_mb_after_load"):
            if col in g:
                r[col] = round(float(g[col].astype(float).median()), 1)
        r["residency_median"] = round(float(g["residency"].astype(float).median()), 3)
        if "residency_after_load" in g and g["residency_after_load"].notna().any():
            r["residency_after_load"] = round(float(g["residency_after_load"].astype(float).median()), 3)
        rows.append(r)
    return pd.DataFrame(rows)


def _o2_verdict(df, study: SystemStudy, evidence):
    """O2: huge pages and swappiness are kernel settings: reported, not changed; mlock's effect in details."""
    mem = memory_settings()
    o2 = not_testable(
        "O2",
        f"huge pages (nr_hugepages={mem['nr_hugepages']}, transparent_hugepage='{mem['transparent_hugepage']}') and "
        f"vm.swappiness={mem['swappiness']} are kernel settings shared by every process on the machine; changing "
        f"them needs root and would disturb everything else running, and swappiness only matters under memory "
        f"pressure, which a {study.card.size_bytes / 2**20:.0f} MiB model does not create. Measured instead: "
        f"use_mmap / use_mlock load time and resident memory (table).",
        list(evidence), memory_settings=mem, loading=loading_table(df).to_dict("records"))
    d = ok_rows(df, "loading")
    locked = d[d["use_mlock"] == True] if not d.empty else d  # noqa: E712
    if not locked.empty:
        o2.details["mlock_locked_mb_median"] = float(locked["vm_lck_mb"].astype(float).median())
        o2.details["memlock_limit"] = mem["memlock_limit"]
    return o2


def _o3_verdict(df, evidence=(), planned: int | None = None):
    """O3: warm (page cache) against cold (evicted) load time with use_mmap=True, use_mlock=False (the pair the extra
    blocks add loads to), at looks_confidence of the schedule of looks the rows were measured under (`planned`, else
    the rows' looks_planned); the first decode in details."""
    d = ok_rows(df, "loading")
    mm = d[(d["use_mmap"] == True) & (d["use_mlock"] == False)] if not d.empty else d  # noqa: E712
    if mm.empty:
        mm = d
    cold = mm[mm["cache"] == "cold"] if not mm.empty else mm
    warm = mm[mm["cache"] == "warm"] if not mm.empty else mm
    if cold.empty or warm.empty:
        return not_testable("O3", "no cold and warm loads to compare", list(evidence))
    cold_ok = cold[cold["cold_ok"] == True]  # noqa: E712
    if cold_ok.empty:
        res = float(cold["residency"].astype(float).median())
        return not_testable("O3", f"could not evict the model file from the page cache (still {res:.0%} resident "
                                  f"after posix_fadvise): a cold load cannot be produced here", list(evidence))
    if planned is None:
        planned = int(mm["looks_planned"].max()) if "looks_planned" in mm and mm["looks_planned"].notna().any() else 1
    looks = int(mm["look"].max()) if "look" in mm and mm["look"].notna().any() else 1
    # load_ms is where storage is read: llama.cpp maps the file with MAP_POPULATE (read ahead at load) or reads it
    # (use_mmap=False); the first decode is compute and, on a busy machine, mostly scheduling noise
    c, w = list(cold_ok["load_ms"].astype(float)), list(warm["load_ms"].astype(float))
    o3 = compare("O3", w, c, higher_is_better=False, claimed="better", evidence=list(evidence),
                 confidence=looks_confidence(planned), hint="load_repetitions",
                 metric="load ms, page cache (warm: the fastest storage there is) / cold read from this machine's "
                        "disk; use_mmap=True")
    first = compare("O3", list(warm["first_decode_ms"].astype(float)), list(cold_ok["first_decode_ms"].astype(float)),
                    higher_is_better=False, claimed="better", metric="first prompt + token after load ms, warm / cold",
                    confidence=looks_confidence(planned))
    if o3.verdict == NOT_TESTABLE:
        return o3
    o3.details["first_decode"] = first.to_dict()
    if "residency_after_load" in cold_ok:
        o3.details["residency_after_cold_load"] = float(cold_ok["residency_after_load"].astype(float).median())
    o3.details["cold_loads_excluded_not_evicted"] = int(len(cold) - len(cold_ok))
    o3.details["median_cold_ms"] = round(float(sorted(c)[len(c) // 2]), 1)
    o3.details["median_warm_ms"] = round(float(sorted(w)[len(w) // 2]), 1)
    stop = "decided" if o3.verdict in DECIDED else ("schedule" if looks >= planned else "time cap")
    o3.details.update(looks=looks, looks_planned=planned, looks_stop=stop, loads_cold=len(c), loads_warm=len(w))
    saved = o3.details["median_cold_ms"] - o3.details["median_warm_ms"]
    took = f"It took {looks} of {planned} planned blocks of loads ({len(c)} cold, {len(w)} warm)"
    if stop != "decided":
        took += (f"; {'the last planned look (load_looks)' if stop == 'schedule' else 'the time cap (load_max_s)'} "
                 "stopped it undecided")
    o3.summary = (f"{o3.summary}. {took}. A cold load from this disk took {o3.details['median_cold_ms']:.0f} ms, a "
                  f"warm one {o3.details['median_warm_ms']:.0f} ms: faster storage can save at most about "
                  f"{max(saved, 0):.0f} ms, once per cold start; generation speed after loading does not depend on "
                  f"storage.")
    return o3


def loading_verdicts(df, study: SystemStudy, evidence=()):
    """O2 (huge pages, swappiness: kernel settings, reported; not changed) and O3 (cold vs warm load)."""
    return _o2_verdict(df, study, evidence), _o3_verdict(df, evidence)


# ---- figure -----------------------------------------------------------------------------------------------------
def plot_system(df, study: SystemStudy):
    """Three panels: t/s against threads (tg, pp), tg under competing load by priority, load time cold / warm.
    Returns the Figure (save it with kit.plots.save_figure)."""
    # kit.plots imports matplotlib and seaborn: imported here, not at the top, because every trial child of
    # this study imports this module for its test kinds (niced_bench, load_probe) and must stay lean
    from kit.plots import median_plot, panel_figure, samples_long

    def threads(ax):
        d = ok_rows(df, "threads")
        if not d.empty:
            median_plot(samples_long(d), "n_threads", "samples_ts", ax, hue="test_kind")
            ax.set_xlabel("n_threads (tg) = n_threads_batch (pp)")
            ax.set_ylabel("tokens/s")

    def priority(ax):
        p = ok_rows(df, "priority")
        if not p.empty:
            median_plot(samples_long(p), "samples_ts", "condition", ax, kind="bar", color="C0")
            ax.set_xlabel("tg tokens/s")
            ax.set_ylabel("")

    def loading(ax):
        lo = ok_rows(df, "loading")
        if not lo.empty:
            lo = lo.assign(config=[f"mmap={'on' if a else 'off'}, mlock={'on' if b else 'off'}"
                                   for a, b in zip(lo["use_mmap"], lo["use_mlock"])])
            median_plot(lo, "load_ms", "config", ax, kind="bar", hue="cache")
            ax.set_xlabel("load time, ms")
            ax.set_ylabel("")

    topo = study.topology
    return panel_figure([(f"Threads ({topo['physical']} physical / {topo['logical']} logical cores)", threads),
                         ("Generation under a competing CPU load", priority),
                         ("Loading: cold (evicted) vs warm (page cache)", loading)], ncols=3, figsize=(16, 4.5))
