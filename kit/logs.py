"""Keep llama.cpp's log out of notebooks and terminals: route it to a file.

llama-cpp-python installs one process-wide log callback at import; we replace it with ours. The ctypes
callback object must stay referenced for the life of the process, or llama.cpp calls freed memory and
the process segfaults, so it lives in a module global and is never replaced once installed.
"""
from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

import llama_cpp

from kit.paths import OUTPUTS_DIR, resolve

_state: dict = {"callback": None, "fh": None, "path": None}
_lock = threading.Lock()

DEFAULT_LOG = OUTPUTS_DIR / "llama.log"


def llama_log_to_file(path: str | os.PathLike | None = None) -> Path:
    """Send every llama.cpp/ggml log line of this process to `path` (appending; relative: from the repository
    root). Idempotent."""
    target = resolve(path or os.environ.get("KIT_LLAMA_LOG") or DEFAULT_LOG).resolve()
    with _lock:
        if _state["path"] != target:
            target.parent.mkdir(parents=True, exist_ok=True)
            old = _state["fh"]
            _state["fh"] = open(target, "a", buffering=1, encoding="utf-8", errors="replace")
            _state["path"] = target
            if old is not None:
                old.close()
        if _state["callback"] is None:

            @llama_cpp.llama_log_callback
            def _callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
                fh = _state["fh"]
                if fh is not None:
                    fh.write(text.decode("utf-8", errors="replace"))

            _state["callback"] = _callback  # the reference that keeps the callback alive
            llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))
    return target
