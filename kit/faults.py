"""Deliberate failures, to check on your own machine that a sweep survives what llama.cpp can do to a process.

Each is a test kind ('kit.faults:NAME') that runs inside a trial's child process after the model loaded.
"""
from __future__ import annotations

import ctypes
import time
import llama_cpp
import os
import signal


def abort_in_llama(lm, test, repetitions) -> dict:
    """A real native abort inside llama.cpp: an invalid KV cache type (ggml_type 99) reaches context creation.

    This is the crash the kit's validation keeps users from (see Settings.type_k); here it is provoked on
    purpose through the low-level API so the sweep's isolation can be tested against the real thing.
    """

    params = llama_cpp.llama_context_default_params()
    params.n_ctx = 256
    params.type_k = 99
    llama_cpp.llama_init_from_model(lm.llm._model.model, params)
    raise RuntimeError("llama.cpp accepted ggml_type 99 without aborting")


def segfault(lm, test, repetitions) -> dict:
    """Read address 0: SIGSEGV, as a native bug would."""
    ctypes.string_at(0)
    return {}


def hang(lm, test, repetitions) -> dict:
    """Never return: the sweep's timeout must end it."""
    while True:
        time.sleep(1)


def python_error(lm, test, repetitions) -> dict:
    raise ValueError("a deliberate Python error inside a test")


def exit_process(lm, test, repetitions) -> dict:
    """Die without a word, as an out-of-memory kill would look from outside (SIGKILL to itself)."""

    os.kill(os.getpid(), signal.SIGKILL)
    return {}
