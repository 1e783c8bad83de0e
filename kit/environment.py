"""The machine, the build and the model, captured by every run so every number can be traced to them.

`capture_environment()` is the whole picture (a sweep writes it to <study>/environment.json at its start,
replacing the previous run's); `process_provenance()` is the part every row carries, taken in the process that
measured the row (the trial's child), so a row measured after an upgrade names the new build and machine.
"""
from __future__ import annotations

import ctypes
import functools
import json
import os
import re
import platform
import resource
import sys
import time
from pathlib import Path

import llama_cpp
import numpy as np
import psutil

from kit import gpu
from kit.paths import resolve as resolve_path

ENVIRONMENT_FILE = "environment.json"
# file names of ggml's base library, which exports ggml_version() and ggml_commit()
_GGML_BASE_LIBS = ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def numa_nodes() -> list[dict]:
    """NUMA nodes from sysfs: id and CPU list. One node (or none listed) means NUMA tuning cannot matter."""
    base = Path("/sys/devices/system/node")
    nodes = []
    for d in sorted(base.glob("node[0-9]*")):
        cpulist = (d / "cpulist").read_text().strip() if (d / "cpulist").exists() else ""
        nodes.append({"node": int(d.name[4:]), "cpus": cpulist})
    return nodes


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def memory_settings() -> dict:
    """What the guide's section 7 would change: huge pages, transparent huge pages, swappiness."""
    return {
        "nr_hugepages": _read("/proc/sys/vm/nr_hugepages"),
        "transparent_hugepage": _read("/sys/kernel/mm/transparent_hugepage/enabled"),
        "swappiness": _read("/proc/sys/vm/swappiness"),
        "memlock_limit": _memlock_limit(),
    }


def _memlock_limit() -> str | None:
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        return "unlimited" if soft == resource.RLIM_INFINITY else f"{soft // 1024} KiB"
    except Exception:
        return None


def memory_bandwidth_gbs(size_mb: int = 256, repeats: int = 5) -> dict:
    """Measured RAM bandwidth (best of `repeats`): read (sum) and copy (read + write) in GB/s.

    Decode of a dense model reads every weight once per token, so read bandwidth / model bytes bounds
    tokens/s from above (the roofline). The buffer is much larger than any CPU cache.
    """
    n = size_mb * (1 << 20) // 8
    a = np.ones(n, dtype=np.float64)
    b = np.empty_like(a)
    read, copy = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        a.sum()
        read.append(time.perf_counter() - t)
        t = time.perf_counter()
        np.copyto(b, a)
        copy.append(time.perf_counter() - t)
    nbytes = a.nbytes
    return {
        "mem_read_gbs": round(nbytes / min(read) / 1e9, 2),
        "mem_copy_gbs": round(2 * nbytes / min(copy) / 1e9, 2),
        "mem_bw_buffer_mb": size_mb,
    }


def ggml_build() -> dict:
    """ggml's version and the commit its CMake stamped in at build time (the vendored llama.cpp's ggml).

    llama-cpp-python exposes no llama.cpp build number; ggml_commit() is the closest: the commit of the source
    tree the library was built from, "-dirty" when that tree had local changes. None where the library is not
    found (another packaging) or predates these functions."""
    lib_dir = Path(llama_cpp.__file__).resolve().parent / "lib"
    for name in _GGML_BASE_LIBS:
        if not (lib_dir / name).exists():
            continue
        try:
            lib = ctypes.CDLL(str(lib_dir / name))
            out = {}
            for key, fn in (("ggml_version", "ggml_version"), ("ggml_commit", "ggml_commit")):
                f = getattr(lib, fn)
                f.restype = ctypes.c_char_p
                out[key] = f().decode("utf-8", "replace")
            return out
        except (OSError, AttributeError):
            break
    return {"ggml_version": None, "ggml_commit": None}


def llama_build_info() -> dict:
    info = {
        "llama_cpp_python": getattr(llama_cpp, "__version__", "unknown"),
        "llama_version": llama_cpp.llama_version().decode("utf-8", "replace"),
        **ggml_build(),
        "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
        "mmap_supported": bool(llama_cpp.llama_supports_mmap()),
        "mlock_supported": bool(llama_cpp.llama_supports_mlock()),
        "system_info": llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip(),
    }
    # llama.cpp's devices where NVML sees no GPU (on CUDA, asking the backend creates a context in this process)
    devices = gpu.backend_devices() if info["gpu_offload"] and not gpu.nvml_available() else []
    names = sorted({re.sub(r"\d+$", "", d["name"]) for d in devices if d.get("name")})
    # llama-bench's column: the GPU backend's name (Vulkan, CUDA, Metal ...), else CPU
    info["backends"] = ",".join(names) if names else ("GPU" if info["gpu_offload"] else "CPU")
    info["devices"] = devices
    return info


def device_info(gpus: list[dict], devices: list[dict]) -> str:
    """NVML's GPU names, else llama.cpp's devices ("Vulkan0: llvmpipe (...) [software device]"), else ""."""
    if gpus:
        return ", ".join(g["name"] for g in gpus if "name" in g)
    return ", ".join(f"{d['name']}: {d['description']}" + (" [software device]" if d.get("software") else "")
                     for d in devices if d.get("name"))


def capture_environment(bandwidth: bool = True) -> dict:
    """Hardware, OS, Python, llama.cpp build and GPU inventory (empty without a GPU)."""
    env = {
        "captured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "hostname": platform.node(),
        "os": f"{platform.system()} {platform.release()}",
        "python": sys.version.split()[0],
        "cpu_info": cpu_model(),
        "cpu_physical_cores": psutil.cpu_count(logical=False),
        "cpu_logical_cores": psutil.cpu_count(logical=True),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_total_mb": round(psutil.virtual_memory().total / 2**20),
        "ram_available_mb": round(psutil.virtual_memory().available / 2**20),
        "numa_nodes": numa_nodes(),
        **memory_settings(),
    }
    env.update(llama_build_info())
    gpus = gpu.gpu_inventory()
    env["gpus"] = gpus
    env["gpu_info"] = device_info(gpus, env.get("devices") or [])
    env["gpu_software_note"] = (gpu.SOFTWARE_NOTE if not gpus and any(d.get("software") for d in env.get("devices")
                                                                         or []) else "")
    env["gpu_driver"] = gpus[0].get("driver_version") if gpus else None
    if bandwidth:
        env.update(memory_bandwidth_gbs())
    return env


def save_environment(study_dir: str | os.PathLike, env: dict | None = None, bandwidth: bool = False) -> dict:
    """Capture the environment now (or take `env`) and write it to <study_dir>/environment.json, replacing the
    file of an earlier run: the file describes the latest run; each row carries its own (`process_provenance`).

    bandwidth: also measure the RAM bandwidth (about a second; notebook 00 reports it, sweeps skip it)."""
    env = env or capture_environment(bandwidth=bandwidth)
    path = resolve_path(study_dir) / ENVIRONMENT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(env, indent=2, default=str))
    os.replace(tmp, path)
    return env


@functools.lru_cache(maxsize=1)
def process_provenance() -> dict:
    """The build and the machine of this process, as row columns (cached: they do not change while it runs).

    build_commit is ggml's build commit (`ggml_build`), not a llama.cpp release tag; llama_cpp_python_version
    names the Python binding."""
    build = llama_build_info()
    gpus = gpu.gpu_inventory()
    return {
        "build_commit": build["ggml_commit"],
        "ggml_version": build["ggml_version"],
        "llama_cpp_python_version": build["llama_cpp_python"],
        "cpu_info": cpu_model(),
        "gpu_info": device_info(gpus, build.get("devices") or []),
        "backends": build["backends"],
        "hostname": platform.node(),
    }


def decode_roofline(model_bytes: int, mem_read_gbs: float) -> float:
    """Upper bound on tg tokens/s when every weight byte is read once per generated token."""
    return mem_read_gbs * 1e9 / model_bytes
