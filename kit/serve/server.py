"""A real server the kit starts and stops: llama-cpp-python's OpenAI-compatible server on 127.0.0.1.

`LlamaCppServer(settings, log_dir)` writes the profile's server config (`kit.serve.deploy.server_config`), starts
`python -m llama_cpp.server --config_file` on a free port (or the one asked for, refused at once if taken) in its
own session, with PR_SET_PDEATHSIG so that it dies with the kit, waits until `/v1/models` answers (or raises
ServerError with its log's last lines), and stops it (SIGTERM to its process group, then SIGKILL) on exit, on
error and on Ctrl-C. An `atexit` hook stops any server still running when the interpreter ends.

`Endpoint` is what the load generator talks to: a base URL (`http://HOST:PORT/v1`), and where the kit started
the server, its process (for peak RSS and CPU time). `check_endpoint` refuses a URL that is not an
OpenAI-compatible server (no `/v1/models` list) with one clear error.
"""
from __future__ import annotations

import atexit
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

from kit.config import Settings
from kit.measure import proc_memory
from kit.models import ModelFileError, resolve_model
from kit.serve.deploy import server_config

READY_TIMEOUT_S = 120.0
STOP_GRACE_S = 10.0
LOG_TAIL_LINES = 20
_RUNNING: set["CommandServer"] = set()


class ServerError(RuntimeError):
    """A server that could not start, did not become ready, or is not an OpenAI-compatible endpoint."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def log_tail(path: str | os.PathLike, n: int = LOG_TAIL_LINES) -> str:
    """The log's last n lines; where the server ended by printing its usage (a config it refused), the n lines
    before that, which say why."""
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    usage = [i for i, line in enumerate(lines) if line.startswith("usage: ")]
    if usage:
        lines = lines[:usage[-1]]
    return "\n".join(lines[-n:])


def _die_with_parent() -> None:
    try:  # the server must never outlive the kit: a killed sweep takes its server with it
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class Endpoint:
    """An OpenAI-compatible base URL, and the server's pid where the kit started it (None: someone else's)."""

    base_url: str
    kind: str = "external"          # "llama-cpp-python" (started by the kit) or "external"
    pid: int | None = None
    model: str = "kit"              # the model name requests carry
    settings: dict = field(default_factory=dict)  # what the kit knows of the server's settings (row columns)

    @property
    def origin(self) -> str:
        u = urlparse(self.base_url)
        return f"{u.scheme}://{u.netloc}"

    def alive(self) -> bool:
        if self.pid is None:
            return True
        try:
            os.kill(self.pid, 0)
        except OSError:
            return False
        try:  # a zombie (killed, not yet reaped) is not alive
            return Path(f"/proc/{self.pid}/stat").read_text().split(") ")[1][0] != "Z"
        except (OSError, IndexError):
            return True

    def reset_peak_rss(self) -> None:
        """Reset the server's VmHWM (Linux clear_refs 5) so the next peak is this load level's own."""
        if self.pid is not None:
            try:
                Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            except OSError:
                pass

    def peak_rss_mb(self) -> float | None:
        return proc_memory(self.pid).get("vm_hwm_mb") if self.pid is not None else None

    def cpu_s(self) -> float | None:
        """The server process's user + system CPU seconds so far (None for an external server)."""
        if self.pid is None:
            return None
        try:
            parts = Path(f"/proc/{self.pid}/stat").read_text().rsplit(") ", 1)[1].split()
            return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return None


def check_endpoint(base_url: str, timeout_s: float = 10.0) -> str:
    """The first model id an OpenAI-compatible server lists at `<base_url>/models`; ServerError otherwise."""
    url = base_url.rstrip("/") + "/models"
    try:
        r = httpx.get(url, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise ServerError(f"{url}: no answer ({type(exc).__name__}: {exc})") from None
    try:
        data = r.json()
        ids = [m["id"] for m in data["data"]]
    except (ValueError, KeyError, TypeError):
        raise ServerError(f"{url} answered HTTP {r.status_code} without an OpenAI model list: not an "
                          f"OpenAI-compatible endpoint (first bytes: {r.text[:120]!r})") from None
    if r.status_code != 200 or not ids:
        raise ServerError(f"{url} answered HTTP {r.status_code} with no model")
    return ids[0]


class CommandServer:
    """Any OpenAI-compatible server started from a command line (llama.cpp's `llama-server`, or llama-cpp-python's
    through LlamaCppServer): in its own session, dying with the kit, its log kept, ready when `<base_url>/models`
    lists a model (or one ServerError quoting the log), stopped on exit, on error and on Ctrl-C."""

    def __init__(self, cmd: list[str], base_url: str, log_path: str | os.PathLike,
                 ready_timeout_s: float = READY_TIMEOUT_S, kind: str = "llama-server", name: str | None = None,
                 env: dict | None = None):
        self.cmd, self.base_url, self.log_path = list(cmd), base_url, Path(log_path)
        self.ready_timeout_s, self.kind, self.name, self.env = ready_timeout_s, kind, name or kind, env
        self.proc: subprocess.Popen | None = None

    def _spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n==== {time.strftime('%Y-%m-%dT%H:%M:%S%z')} {self.name}: {' '.join(self.cmd)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, start_new_session=True, preexec_fn=_die_with_parent)
        _RUNNING.add(self)

    def _wait_ready(self) -> str:
        """The model id the server lists once it answers; ServerError (the server stopped) otherwise."""
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            rc = self.proc.poll()
            if rc is not None:
                self.stop()
                raise ServerError(f"{self.name} exited with code {rc} before it was ready; its log "
                                  f"({self.log_path}) ends:\n{log_tail(self.log_path)}")
            try:
                return check_endpoint(self.base_url, timeout_s=2.0)
            except ServerError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"{self.name} did not answer {self.base_url}/models within {self.ready_timeout_s:g} "
                                  f"s; its log ({self.log_path}) ends:\n{log_tail(self.log_path)}")
            time.sleep(0.2)

    def start(self) -> Endpoint:
        self._spawn()
        model = self._wait_ready()
        return Endpoint(self.base_url, kind=self.kind, pid=self.proc.pid, model=model,
                        settings={"server_command": " ".join(self.cmd)})

    def stop(self) -> int | None:
        """SIGTERM to the server's process group, SIGKILL after STOP_GRACE_S; returns its exit code."""
        p, self.proc = self.proc, None
        _RUNNING.discard(self)
        if p is None:
            return None
        if p.poll() is None:
            for sig, wait in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    p.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        return p.poll()

    def __enter__(self) -> Endpoint:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __hash__(self) -> int:
        return id(self)


class LlamaCppServer(CommandServer):
    """llama-cpp-python's OpenAI server for one profile, as a context manager yielding its Endpoint: the profile's
    config file (`kit.serve.deploy.server_config`) written under log_dir, then `python -m llama_cpp.server`."""

    def __init__(self, settings: Settings, log_dir: str | os.PathLike, *, port: int | None = None,
                 interrupt_requests: bool = True, ready_timeout_s: float = READY_TIMEOUT_S, name: str = "server",
                 model_path: str | None = None, logits_all: bool = False):
        if port is not None and port_in_use(port):
            raise ServerError(f"port {port} on 127.0.0.1 is already in use: choose another or leave it to the kit")
        try:
            path = model_path or str(resolve_model(settings.model))
        except ModelFileError as exc:
            raise ServerError(f"the profile's model file: {exc}") from None
        if not Path(path).is_file():
            raise ServerError(f"the profile's model file does not exist: {path}")
        self.settings, self.log_dir, self.model_path, self.port = settings, Path(log_dir), path, port
        self.interrupt_requests, self.logits_all = interrupt_requests, logits_all
        env = dict(os.environ, GGML_NO_BACKTRACE="1")
        for k in ("CONFIG_FILE", "HOST", "PORT"):  # the server reads these over its config: never the kit's
            env.pop(k, None)
        super().__init__([], "", self.log_dir / f"{name}.log", ready_timeout_s, kind="llama-cpp-python", name=name,
                         env=env)
        self.endpoint: Endpoint | None = None
        self.started_s: float | None = None

    @property
    def config_path(self) -> Path:
        return self.log_dir / f"{self.name}.server.json"

    def config(self, port: int) -> dict:
        return server_config(self.settings, port=port, interrupt_requests=self.interrupt_requests,
                             model_path=self.model_path, logits_all=self.logits_all)

    def start(self) -> Endpoint:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        port = self.port or free_port()
        cfg = self.config(port)
        self.config_path.write_text(json.dumps(cfg, indent=2) + "\n")
        self.cmd = [sys.executable, "-m", "llama_cpp.server", "--config_file", str(self.config_path)]
        self.base_url = f"http://127.0.0.1:{port}/v1"
        t0 = time.perf_counter()
        self._spawn()
        model = self._wait_ready()
        self.started_s = time.perf_counter() - t0
        model_cfg = cfg["models"][0]
        cols = {f"server_{k}": v for k, v in model_cfg.items() if k not in ("model", "verbose")}
        cols.update(server_interrupt_requests=self.interrupt_requests, server_host="127.0.0.1",
                    server_ready_s=round(self.started_s, 3))
        self.endpoint = Endpoint(self.base_url, kind=self.kind, pid=self.proc.pid, model=model, settings=cols)
        return self.endpoint


@atexit.register
def _stop_all() -> None:
    for s in list(_RUNNING):
        s.stop()
