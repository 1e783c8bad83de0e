"""GPU facts and measurements for the benchmarks, through NVML.

Every function takes an optional ``nvml`` argument: an object with the
``pynvml`` API (``nvmlInit``, ``nvmlDeviceGetMemoryInfo``, ``NVMLError``, ...).
The default is the real ``pynvml`` module (package ``nvidia-ml-py``); tests pass
a fake so the GPU code paths run on machines without one.

"No GPU" is a normal outcome, never an error: ``nvmlInit`` raising
``NVMLError`` (no driver), ``pynvml`` missing, or zero devices all make the
functions here report empty/None results, so a benchmark table simply has
empty GPU columns on a CPU-only machine.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any

MIB = 1024 * 1024

NOT_TESTABLE_NO_GPU = "not testable here: no GPU"

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
        import pynvml
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


# --------------------------------------------------------------------------
# "What fits" searches


def largest_fitting(candidates: Sequence[Any], fits: Callable[[Any], bool]) -> int | None:
    """Index of the largest candidate that fits, or None if none does.

    Assumes ``candidates`` is sorted so that fitting is monotone (if one fits,
    every earlier one fits). Tries the last candidate first, since "all of it
    fits" is the common answer on a big GPU and costs a single probe; otherwise
    bisects, so the search costs at most 1 + ceil(log2(len)) probes.
    """
    if not candidates:
        return None
    hi = len(candidates) - 1  # known (after this probe) not to fit
    if fits(candidates[hi]):
        return hi
    lo = -1  # index known to fit; -1 = none yet
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(candidates[mid]):
            lo = mid
        else:
            hi = mid
    return lo if lo >= 0 else None


def _resolve_vram_limit(vram_limit_mb: float | None, margin_mb: float, nvml: Any) -> float | None:
    """Explicit limit, else free VRAM of device 0 minus margin; None without a GPU."""
    if vram_limit_mb is not None:
        return float(vram_limit_mb)
    inventory = gpu_inventory(nvml)
    if not inventory or "free_mb" not in inventory[0]:
        return None
    return round(inventory[0]["free_mb"] - margin_mb, 1)


def _search(
    key: str,
    candidates: Sequence[int],
    probe: Callable[[int], dict[str, Any]],
    vram_limit_mb: float,
) -> tuple[int | None, list[dict[str, Any]]]:
    """Run the bisection with ``probe`` and record every attempt under ``key``."""
    probes: list[dict[str, Any]] = []

    def fits(value: int) -> bool:
        result = probe(value) or {}
        status = result.get("status")
        peak = result.get("vram_peak_mb")
        over = status == "ok" and peak is not None and float(peak) > vram_limit_mb
        ok = status == "ok" and not over
        probes.append(
            {key: value, "status": status, "vram_peak_mb": peak, "fits": ok, "over_limit": over}
        )
        return ok

    index = largest_fitting(candidates, fits)
    return (candidates[index] if index is not None else None), probes


def _reason(found: Any, largest: Any, probes: list[dict[str, Any]], what: str) -> str:
    """One line for the notebook: what was found and why nothing larger."""
    if found is None:
        return f"nothing fits: even {what}={probes[-1][what]} failed ({probes[-1]['status']})"
    if found == largest:
        return f"all fits: {what}={found}"
    first_fail = min((p for p in probes if p[what] > found), key=lambda p: p[what])
    cause = "over the VRAM limit" if first_fail["over_limit"] else first_fail["status"]
    return f"largest that fits: {what}={found}; {what}={first_fail[what]}: {cause}"


def find_optimal_gpu_layers(
    probe: Callable[[int], dict[str, Any]],
    n_layers: int,
    vram_limit_mb: float | None = None,
    margin_mb: float = 512,
    nvml: Any = None,
) -> dict[str, Any]:
    """Largest ``n_gpu_layers`` in [0, n_layers] for which ``probe`` succeeds.

    ``probe(n)`` runs the model with ``n_gpu_layers=n`` (in the real kit, in a
    child process, so running out of memory is just a failed probe) and
    returns at least ``{"status": "ok" | <anything else>}``, optionally
    ``vram_peak_mb``. A successful probe whose ``vram_peak_mb`` exceeds the
    limit counts as not fitting. The default limit is device 0's free VRAM
    (measured now) minus ``margin_mb``, so a probe should report the VRAM the
    attempt itself added (sampler peak minus baseline), not the device total.

    Returns ``best_n_gpu_layers`` (None if even 0 layers failed), ``n_layers``,
    ``vram_limit_mb``, every ``probes`` entry (for plotting) and ``reason``.
    Without a GPU and without an explicit limit nothing is probed and the
    answer is 0 layers, "not testable here: no GPU".
    """
    if n_layers < 0:
        raise ValueError("n_layers must be >= 0")
    limit = _resolve_vram_limit(vram_limit_mb, margin_mb, nvml)
    if limit is None:
        return {
            "best_n_gpu_layers": 0,
            "n_layers": n_layers,
            "vram_limit_mb": None,
            "probes": [],
            "reason": NOT_TESTABLE_NO_GPU,
        }
    best, probes = _search("n_gpu_layers", range(n_layers + 1), probe, limit)
    return {
        "best_n_gpu_layers": best,
        "n_layers": n_layers,
        "vram_limit_mb": limit,
        "probes": probes,
        "reason": _reason(best, n_layers, probes, "n_gpu_layers"),
    }


def find_max_context(
    probe_ctx: Callable[[int], dict[str, Any]],
    n_ctx_candidates: Sequence[int],
    vram_limit_mb: float | None = None,
    margin_mb: float = 512,
    nvml: Any = None,
) -> dict[str, Any]:
    """Largest context size in ``n_ctx_candidates`` for which ``probe_ctx`` fits.

    Same contract and search as :func:`find_optimal_gpu_layers`; the caller
    fixes the layer count inside ``probe_ctx``. Candidates are deduplicated and
    sorted (the KV cache grows with n_ctx, so fitting is monotone).

    Returns ``best_n_ctx`` (None if none fits, or without a GPU),
    ``n_ctx_candidates``, ``vram_limit_mb``, ``probes`` and ``reason``.
    """
    candidates = sorted({int(c) for c in n_ctx_candidates})
    if not candidates:
        raise ValueError("n_ctx_candidates is empty")
    limit = _resolve_vram_limit(vram_limit_mb, margin_mb, nvml)
    if limit is None:
        return {
            "best_n_ctx": None,
            "n_ctx_candidates": candidates,
            "vram_limit_mb": None,
            "probes": [],
            "reason": NOT_TESTABLE_NO_GPU,
        }
    best, probes = _search("n_ctx", candidates, probe_ctx, limit)
    return {
        "best_n_ctx": best,
        "n_ctx_candidates": candidates,
        "vram_limit_mb": limit,
        "probes": probes,
        "reason": _reason(best, candidates[-1], probes, "n_ctx"),
    }


def build_supports_gpu_offload() -> bool:
    """Whether the installed llama.cpp build can offload layers to a GPU.

    A CPU-only wheel silently ignores n_gpu_layers, so GPU sweeps check this
    first. False when llama_cpp is missing or its library fails to load.
    """
    try:
        import llama_cpp
    except Exception:  # noqa: BLE001 - ImportError, or OSError from the shared library
        return False
    try:
        return bool(llama_cpp.llama_supports_gpu_offload())
    except Exception:  # noqa: BLE001 - very old bindings lack the function
        return False
