"""The load generator: streamed chat completions over HTTP (asyncio + httpx), as the serving benchmarks do it.

Per request, on the client's clock (`time.perf_counter`): sent -> first content chunk (TTFT) -> each next chunk
(inter-token latencies) -> the stream's end (e2e); output tokens = content chunks (llama-cpp-python's server and
llama-server stream one token per chunk); TPOT = (e2e - TTFT) / (tokens - 1); the finish reason (a stream that
ends, `[DONE]` or not, without one is *truncated*: llama-cpp-python's `interrupt_requests` does that); HTTP status;
the error. A malformed line, a cut connection, a timeout or an HTTP error is an error record, never an exception.

Loads (`run_load`): a closed loop of N clients, each sending its next request when its answer is complete; or an
open loop with Poisson arrivals at a given rate (seeded, so a rerun offers the same schedule). The client's own
CPU time over the level (`time.process_time`) is kept: on a small machine the client competes with the server.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import random
import statistics
import time
from dataclasses import dataclass
from typing import Sequence

import httpx

from kit.measure import percentile

CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Load:
    """One load level: mode "closed" (clients, requests per client) or "poisson" (rate_rps, n_requests)."""

    mode: str
    clients: int = 1
    requests_per_client: int = 1
    rate_rps: float | None = None
    n_requests: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.mode not in ("closed", "poisson"):
            raise ValueError(f"load mode {self.mode!r}: 'closed' or 'poisson'")
        if self.mode == "closed" and (self.clients < 1 or self.requests_per_client < 1):
            raise ValueError("a closed loop needs clients >= 1 and requests_per_client >= 1")
        if self.mode == "poisson" and (not self.rate_rps or self.rate_rps <= 0 or self.n_requests < 1):
            raise ValueError("a Poisson load needs rate_rps > 0 and n_requests >= 1")

    @property
    def total(self) -> int:
        return self.clients * self.requests_per_client if self.mode == "closed" else self.n_requests

    def label(self) -> str:
        return (f"closed c={self.clients}" if self.mode == "closed" else f"poisson {self.rate_rps:.3g} rps")

    def to_dict(self) -> dict:
        return {"mode": self.mode, "clients": self.clients, "requests_per_client": self.requests_per_client,
                "rate_rps": self.rate_rps, "n_requests": self.n_requests, "seed": self.seed}


def _record(index: int, prompt_id: str) -> dict:
    return {"index": index, "prompt_id": prompt_id, "http_status": None, "error": None, "finish_reason": None,
            "truncated": False, "ttft_ms": None, "e2e_ms": None, "itl_ms": [], "n_gen_tokens": 0, "text": "",
            "send_s": None, "done_s": None}


async def stream_request(client: httpx.AsyncClient, base_url: str, model: str, messages: list[dict], fields: dict,
                         index: int = 0, prompt_id: str = "", t_origin: float = 0.0,
                         timeout_s: float = 300.0) -> dict:
    """One streamed chat completion; a record (see the module docstring), never an exception."""
    rec = _record(index, prompt_id)
    body = {"model": model, "messages": messages, "stream": True, **fields}
    times: list[float] = []
    pieces: list[str] = []
    done_marker = False
    t0 = time.perf_counter()
    rec["send_s"] = round(t0 - t_origin, 4)
    async def go() -> None:
        nonlocal done_marker
        async with client.stream("POST", base_url.rstrip("/") + "/chat/completions", json=body) as r:
            rec["http_status"] = r.status_code
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                rec["error"] = f"HTTP {r.status_code}: {text[:200]}"
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # SSE comments, pings and blank separators
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done_marker = True
                        break
                    try:
                        chunk = json.loads(data)
                        choice = chunk["choices"][0] if chunk.get("choices") else {}
                    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                        rec["error"] = f"malformed stream: {data[:120]!r}"
                        break
                    if isinstance(chunk.get("timings"), dict):  # llama-server's own timing of the request
                        rec["server_timings"] = chunk["timings"]
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        times.append(time.perf_counter())
                        pieces.append(content)
                    if choice.get("finish_reason"):
                        rec["finish_reason"] = choice["finish_reason"]
    try:
        await asyncio.wait_for(go(), timeout_s)
    except asyncio.TimeoutError:
        rec["error"] = f"client timeout after {timeout_s:g} s"
    except httpx.HTTPError as exc:
        rec["error"] = f"{type(exc).__name__}: {exc}" or type(exc).__name__
    t_end = time.perf_counter()
    rec["done_s"] = round(t_end - t_origin, 4)
    rec["e2e_ms"] = (t_end - t0) * 1e3
    if times:
        rec["ttft_ms"] = (times[0] - t0) * 1e3
        rec["itl_ms"] = [(b - a) * 1e3 for a, b in zip(times, times[1:])]
    rec["n_gen_tokens"] = len(times)
    rec["text"] = "".join(pieces)
    if rec["error"] is None and rec["finish_reason"] is None:
        rec["truncated"] = True
        rec["stream_end"] = "[DONE] without a finish reason" if done_marker else "the stream ended without [DONE]"
    return rec


async def _run(base_url: str, model: str, requests: Sequence[tuple[str, list[dict]]], fields: dict, load: Load,
               timeout_s: float) -> list[dict]:
    limits = httpx.Limits(max_connections=max(load.clients, 64), max_keepalive_connections=max(load.clients, 64))
    timeout = httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S)
    t_origin = time.perf_counter()
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        def send(i: int):
            pid, messages = requests[i % len(requests)]
            return stream_request(client, base_url, model, messages, fields, i, pid, t_origin, timeout_s)

        if load.mode == "closed":
            async def one_client(c: int) -> list[dict]:
                return [await send(c * load.requests_per_client + j) for j in range(load.requests_per_client)]
            per = await asyncio.gather(*(one_client(c) for c in range(load.clients)))
            out = [r for rs in per for r in rs]
            for r in out:
                r["client"] = r["index"] // load.requests_per_client
        else:
            rng = random.Random(load.seed)
            tasks, t = [], 0.0
            for i in range(load.n_requests):
                delay = t - (time.perf_counter() - t_origin)
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.ensure_future(send(i)))
                t += rng.expovariate(load.rate_rps)
            out = list(await asyncio.gather(*tasks))
    return sorted(out, key=lambda r: r["index"])


def _run_sync(coro):
    """asyncio.run, also from inside a running event loop (a Jupyter kernel's): then on a thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def run_load(base_url: str, model: str, requests: Sequence[tuple[str, list[dict]]], fields: dict, load: Load,
             timeout_s: float = 300.0) -> tuple[list[dict], dict]:
    """Send `load` to the endpoint; (records, level) where level has the wall time and the client's CPU time."""
    if not requests:
        raise ValueError("no requests to send")
    c0, w0 = time.process_time(), time.perf_counter()
    recs = _run_sync(_run(base_url, model, requests, fields, load, timeout_s))
    wall = time.perf_counter() - w0
    cpu = time.process_time() - c0
    return recs, {"wall_s": round(wall, 4), "client_cpu_s": round(cpu, 4),
                  "client_cpu_ms_per_request": round(cpu * 1e3 / max(len(recs), 1), 3)}


def tpot_ms(rec: dict) -> float | None:
    """Time per output token after the first: (e2e - TTFT) / (tokens - 1)."""
    if rec.get("ttft_ms") is None or rec.get("n_gen_tokens", 0) < 2:
        return None
    return (rec["e2e_ms"] - rec["ttft_ms"]) / (rec["n_gen_tokens"] - 1)


def bootstrap_quantile(values: Sequence[float], q: float, n_boot: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float | None, float | None, float | None]:
    """The q-quantile and its percentile-bootstrap interval; (None, None, None) for no values."""
    xs = list(values)
    if not xs:
        return None, None, None
    point = percentile(xs, q)
    if len(xs) < 2:
        return point, None, None
    rng = random.Random(seed)
    boots = sorted(percentile([rng.choice(xs) for _ in xs], q) for _ in range(n_boot))
    a = (1 - level) / 2
    return point, boots[int(a * (n_boot - 1))], boots[int((1 - a) * (n_boot - 1))]


def mean_or_none(xs: Sequence[float]) -> float | None:
    return statistics.fmean(xs) if xs else None
