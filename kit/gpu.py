"""GPU facts and measurements for the benchmarks, through NVML.

Every function takes an optional ``nvml`` argument: an object with the
``pynvml`` API (``nvmlInit``, ``nvmlDeviceGetMemoryInfo``, ``NVMLError``, ...).
The default is the real ``pynvml`` module (package ``nvidia-ml-py``); tests pass
a fake so the GPU code paths run on machines without one.

"No GPU" is a normal outcome, never an error: ``nvmlInit`` raising
``NVMLError`` (no driver), ``pynvml`` missing, or zero devices all make the
functions here report empty/None results, so a benchmark table simply has
empty GPU columns on a CPU-only machine.

The "what fits" searches (n_gpu_layers, context size) that use these readings live in kit.search.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any

MIB = 1024 * 1024

SUMMARY_KEYS = (
    "gpu_util_pct",
    "gpu_util_max_pct",
    "vram_peak_mb",
    "vram_baseline_mb",
    "gpu_power_w",
    "gpu_samples",
    "gpu_error",
)


def load_nvml(nvml: Any = None) -> Any:
    """Return the NVML API to use: ``nvml`` if given, else ``pynvml``, else None.

    Importing ``pynvml`` does not touch the driver (that happens in
    ``nvmlInit``), so a missing package is the only import failure we expect.
    """
    if nvml is not None:
        return nvml
    try:
        import pynvml  # optional (nvidia-ml-py): a missing package means no GPU, not an error
    except ImportError:
        return None
    return pynvml


def _nvml_errors(nvml: Any) -> tuple[type[BaseException], ...]:
    """Exceptions that mean "NVML cannot answer": its own error, plus OSError.

    OSError covers a driver library that exists but cannot be loaded.
    """
    err = getattr(nvml, "NVMLError", None)
    if isinstance(err, type) and issubclass(err, BaseException):
        return (err, OSError)
    return (OSError,)


@contextlib.contextmanager
def _nvml_session(nvml: Any = None) -> Iterator[Any]:
    """Yield an initialised NVML API, or None if there is no usable GPU driver.

    nvmlInit/nvmlShutdown are reference counted by NVML, so nesting sessions
    (e.g. an inventory taken inside a sampler) is safe.
    """
    api = load_nvml(nvml)
    if api is None:
        yield None
        return
    try:
        api.nvmlInit()
    except _nvml_errors(api):
        yield None
        return
    try:
        yield api
    finally:
        with contextlib.suppress(Exception):
            api.nvmlShutdown()


def _text(value: Any) -> str:
    """NVML strings are bytes in old pynvml releases and str in new ones."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _mib(n_bytes: float) -> float:
    return round(n_bytes / MIB, 1)


def nvml_available(nvml: Any = None) -> bool:
    """True if NVML initialises and reports at least one GPU."""
    with _nvml_session(nvml) as api:
        if api is None:
            return False
        try:
            return int(api.nvmlDeviceGetCount()) > 0
        except _nvml_errors(api):
            return False


def gpu_inventory(nvml: Any = None) -> list[dict[str, Any]]:
    """One dict per GPU: index, name, total/free/used MiB, driver version.

    Empty without a GPU. A device that fails to answer gets an ``error`` entry
    instead of failing the whole inventory, since the inventory is recorded
    alongside results and must not abort a run.
    """
    with _nvml_session(nvml) as api:
        if api is None:
            return []
        errors = _nvml_errors(api)
        try:
            count = int(api.nvmlDeviceGetCount())
        except errors:
            return []
        try:
            driver: str | None = _text(api.nvmlSystemGetDriverVersion())
        except errors:
            driver = None
        devices: list[dict[str, Any]] = []
        for index in range(count):
            try:
                handle = api.nvmlDeviceGetHandleByIndex(index)
                mem = api.nvmlDeviceGetMemoryInfo(handle)
                devices.append(
                    {
                        "index": index,
                        "name": _text(api.nvmlDeviceGetName(handle)),
                        "total_mb": _mib(mem.total),
                        "free_mb": _mib(mem.free),
                        "used_mb": _mib(mem.used),
                        "driver_version": driver,
                    }
                )
            except errors as exc:
                devices.append({"index": index, "error": f"{type(exc).__name__}: {exc}"})
        return devices


def _mean(values: Sequence[float]) -> float | None:
    return round(sum(values) / len(values), 2) if values else None


class GpuSampler:
    """Sample GPU utilisation, VRAM and power in a background thread.

    Use as ``with GpuSampler() as s: work()``; afterwards ``s.summary`` holds
    ``gpu_util_pct`` (mean), ``gpu_util_max_pct``, ``vram_peak_mb``,
    ``vram_baseline_mb`` (first sample, taken on entry before the work
    starts), ``gpu_power_w`` (mean), ``gpu_samples`` and ``gpu_error``.
    ``s.samples`` keeps the time series (``t_s`` since entry) for plots.

    With several devices one sample aggregates them: utilisation is the mean
    over devices, memory and power are sums (what the run costs in total).

    Without a GPU the sampler does nothing and every summary value is None.
    NVML failures while sampling are recorded in ``gpu_error`` and never
    raised, because losing a measurement must not kill the measured work.
    """

    def __init__(
        self,
        interval_s: float = 0.1,
        devices: Sequence[int] | None = None,
        nvml: Any = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self.interval_s = interval_s
        self.devices = list(devices) if devices is not None else None
        self._nvml_arg = nvml
        self._api: Any = None
        self._session: contextlib.AbstractContextManager[Any] | None = None
        self._handles: list[Any] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self.samples: list[dict[str, float | None]] = []
        self.error_count = 0  # a count, not a list: a lost GPU fails every read
        self.last_error: str | None = None
        self.summary: dict[str, Any] = dict.fromkeys(SUMMARY_KEYS)

    def __enter__(self) -> GpuSampler:
        self.samples, self.error_count, self.last_error = [], 0, None
        self.summary = dict.fromkeys(SUMMARY_KEYS)
        self._stop.clear()
        session = _nvml_session(self._nvml_arg)
        api = session.__enter__()
        if api is None:
            session.__exit__(None, None, None)
            return self
        try:
            count = int(api.nvmlDeviceGetCount())
            indices = self.devices if self.devices is not None else list(range(count))
            self._handles = [api.nvmlDeviceGetHandleByIndex(i) for i in indices]
        except Exception as exc:  # noqa: BLE001 - a broken GPU must not stop the work
            self._record_error(exc)
            self._handles = []
        if not self._handles:
            session.__exit__(None, None, None)
            return self
        self._api, self._session = api, session
        self._t0 = time.monotonic()
        self._sample()  # baseline, before the measured work starts
        self._thread = threading.Thread(target=self._run, name="GpuSampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._thread is not None:
            self._stop.set()
            # An NVML call can block; never let that hold up the caller for long.
            self._thread.join(timeout=max(1.0, 5 * self.interval_s))
            self._thread = None
        if self._session is not None:
            self._session.__exit__(None, None, None)
            self._session, self._api, self._handles = None, None, []
        self.summary = self._summarise()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _read(self, fn: Callable[[], float]) -> float | None:
        """One NVML read; a failure is recorded and yields None for that value."""
        try:
            return float(fn())
        except Exception as exc:  # noqa: BLE001 - any failure must spare the work
            self._record_error(exc)
            return None

    def _record_error(self, exc: BaseException) -> None:
        self.error_count += 1
        self.last_error = f"{type(exc).__name__}: {exc}"

    def _read_device(self, handle: Any) -> tuple[float | None, float | None, float | None]:
        """Utilisation %, used MiB and power W of one device; None where a read failed."""
        api = self._api
        return (
            self._read(lambda: api.nvmlDeviceGetUtilizationRates(handle).gpu),
            self._read(lambda: api.nvmlDeviceGetMemoryInfo(handle).used / MIB),
            self._read(lambda: api.nvmlDeviceGetPowerUsage(handle) / 1000.0),
        )

    def _sample(self) -> None:
        reads = [self._read_device(h) for h in self._handles]
        utils = [r[0] for r in reads if r[0] is not None]
        mems = [r[1] for r in reads if r[1] is not None]
        powers = [r[2] for r in reads if r[2] is not None]
        # A partial sample (one device failed) would understate sums; drop it.
        n = len(self._handles)
        sample = {
            "t_s": round(time.monotonic() - self._t0, 4),
            "util_pct": sum(utils) / n if len(utils) == n else None,
            "vram_used_mb": sum(mems) if len(mems) == n else None,
            "power_w": sum(powers) if len(powers) == n else None,
        }
        if any(sample[k] is not None for k in ("util_pct", "vram_used_mb", "power_w")):
            self.samples.append(sample)

    def snapshot(self) -> dict[str, Any]:
        """The summary so far, while sampling continues (a trial reports one row per test)."""
        return self._summarise()

    def _summarise(self) -> dict[str, Any]:
        summary: dict[str, Any] = dict.fromkeys(SUMMARY_KEYS)
        if self.last_error is not None:
            summary["gpu_error"] = self.last_error
            if self.error_count > 1:
                summary["gpu_error"] += f" ({self.error_count} errors)"
        if not self.samples:
            return summary
        utils = [s["util_pct"] for s in self.samples if s["util_pct"] is not None]
        mems = [s["vram_used_mb"] for s in self.samples if s["vram_used_mb"] is not None]
        powers = [s["power_w"] for s in self.samples if s["power_w"] is not None]
        summary.update(
            gpu_util_pct=_mean(utils),
            gpu_util_max_pct=max(utils) if utils else None,
            vram_peak_mb=round(max(mems), 1) if mems else None,
            vram_baseline_mb=round(mems[0], 1) if mems else None,
            gpu_power_w=_mean(powers),
            gpu_samples=len(self.samples),
        )
        return summary


def build_supports_gpu_offload() -> bool:
    """Whether the installed llama.cpp build can offload layers to a GPU.

    A CPU-only wheel silently ignores n_gpu_layers, so GPU sweeps check this
    first. False when llama_cpp is missing or its library fails to load.
    """
    try:
        import llama_cpp  # here, not on top: a broken shared library must give False, not fail kit.gpu
    except Exception:  # noqa: BLE001 - ImportError, or OSError from the shared library
        return False
    try:
        return bool(llama_cpp.llama_supports_gpu_offload())
    except Exception:  # noqa: BLE001 - very old bindings lack the function
        return False


# ---- devices through llama.cpp's own backend API (any vendor: CUDA, Vulkan, Metal, ROCm, SYCL) ------------------
# NVML answers only for NVIDIA. ggml's backend device API answers for every backend a build has: its name,
# description, type and free/total memory (ggml_backend_dev_memory). What a model and its context took on a device,
# llama.cpp states as it allocates ("Vulkan0 model buffer size = ... MiB", KV and compute buffers likewise): the
# kit reads those lines back from the trial's llama.log (`device_buffers`).
DEVICE_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}
SOFTWARE_DEVICES = ("llvmpipe", "lavapipe", "swiftshader", "softpipe")
SOFTWARE_NOTE = ("a software device (Mesa's llvmpipe: the GPU backend's code path running on the CPU); its memory "
                 "accounting is real, its speed says nothing about real GPUs")
_BUFFER_LINE = re.compile(r"^\s*\S+:\s+(?P<dev>\S+)\s+(?:(?P<what>model|KV|compute|output|RS)\s+)?buffer size\s+=\s+"
                          r"(?P<mib>[0-9.]+) MiB", re.M)
HOST_BUFFERS = re.compile(r"^(CPU|CPU_Mapped|CPU_REPACK|AMX|.*_Host)$")


@functools.lru_cache(maxsize=1)
def _ggml() -> Any:
    """llama-cpp-python's handle on libggml with the device functions typed (once per process), or None (no llama_cpp, or a build
    without the backend device API)."""
    try:
        import llama_cpp  # noqa: F401 - loads and registers the build's backends
        from llama_cpp import _ggml as g
        lib = g.libggml
        lib.ggml_backend_dev_count.restype = ctypes.c_size_t
        lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
        lib.ggml_backend_dev_get.restype = ctypes.c_void_p
        for fn in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
            getattr(lib, fn).argtypes = [ctypes.c_void_p]
            getattr(lib, fn).restype = ctypes.c_char_p
        lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
        lib.ggml_backend_dev_type.restype = ctypes.c_int
        lib.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                                ctypes.POINTER(ctypes.c_size_t)]
        lib.ggml_backend_dev_memory.restype = None
        return lib
    except Exception:  # noqa: BLE001 - ImportError, OSError, AttributeError: no device API is "no devices"
        return None


def is_software_device(description: str | None) -> bool:
    return any(s in (description or "").lower() for s in SOFTWARE_DEVICES)


def backend_devices(include_cpu: bool = False) -> list[dict[str, Any]]:
    """The devices llama.cpp's backends registered (GPU, integrated GPU, accelerator; the CPU too with include_cpu):
    index, name (e.g. "Vulkan0", "CUDA0"), description, type, free_mb, total_mb, software (llvmpipe and the like).
    Empty without the API. Vulkan skips CPU-type Vulkan devices unless GGML_VK_VISIBLE_DEVICES names them."""
    lib = _ggml()
    if lib is None:
        return []
    out = []
    try:
        for i in range(int(lib.ggml_backend_dev_count())):
            dev = lib.ggml_backend_dev_get(i)
            kind = DEVICE_TYPES.get(int(lib.ggml_backend_dev_type(dev)), "other")
            if kind == "cpu" and not include_cpu:
                continue
            free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
            lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
            desc = (lib.ggml_backend_dev_description(dev) or b"").decode(errors="replace")
            out.append({"index": i, "name": (lib.ggml_backend_dev_name(dev) or b"").decode(errors="replace"),
                        "description": desc, "type": kind, "free_mb": _mib(free.value),
                        "total_mb": _mib(total.value), "software": is_software_device(desc)})
    except Exception as exc:  # noqa: BLE001 - a device that cannot answer must not abort a run
        out.append({"error": f"{type(exc).__name__}: {exc}"})
    return out


def device_buffers(log_text: str) -> dict[str, Any]:
    """What llama.cpp says it allocated on devices while loading a model and creating its context, from the log
    lines it wrote meanwhile: MiB of model weights, KV cache and compute buffers on non-host devices, their sum
    (`vram_llama_mb`), and the devices named (`vram_llama_devices`). Host buffers (CPU, CPU_Mapped, *_Host) are left
    out. All None when no device buffer was allocated (a CPU build, or n_gpu_layers=0 with nothing offloaded)."""
    parts = {"model": 0.0, "KV": 0.0, "compute": 0.0, "other": 0.0}
    devices: list[str] = []
    for m in _BUFFER_LINE.finditer(log_text or ""):
        dev = m.group("dev")
        if HOST_BUFFERS.match(dev):
            continue
        parts[m.group("what") if m.group("what") in parts else "other"] += float(m.group("mib"))
        if dev not in devices:
            devices.append(dev)
    if not devices:
        return dict.fromkeys(("vram_llama_mb", "vram_llama_model_mb", "vram_llama_kv_mb", "vram_llama_compute_mb",
                              "vram_llama_devices"))
    return {"vram_llama_mb": round(sum(parts.values()), 2), "vram_llama_model_mb": round(parts["model"], 2),
            "vram_llama_kv_mb": round(parts["KV"], 2), "vram_llama_compute_mb": round(parts["compute"], 2),
            "vram_llama_devices": ",".join(devices)}


def device_memory_columns(before: list[dict], after: list[dict]) -> dict[str, Any]:
    """Row columns from two `backend_devices()` readings around a load: the first device's name, free and total
    MiB after, and the drop in free memory (`vram_ggml_used_mb`: what the backend reports taken; 0 where a
    backend cannot tell, as llvmpipe)."""
    if not after or "error" in after[0]:
        return {"vram_device": None, "vram_device_software": None, "vram_ggml_free_mb": None,
                "vram_ggml_total_mb": None, "vram_ggml_used_mb": None}
    a = after[0]
    b = next((d for d in before if d.get("index") == a.get("index") and "free_mb" in d), None)
    return {"vram_device": f"{a['name']}: {a['description']}", "vram_device_software": a["software"],
            "vram_ggml_free_mb": a["free_mb"], "vram_ggml_total_mb": a["total_mb"],
            "vram_ggml_used_mb": round(b["free_mb"] - a["free_mb"], 1) if b else None}
