"""Child-process entry point for one trial: `python -m kit.worker SPEC.json RESULT.json`.

Runs in its own process so that an abort, a segfault or an out-of-memory kill inside llama.cpp ends only
this trial. Each finished test is appended to RESULT (JSON lines) at once; a test missing from it at exit is the one
the child died in, or one it never reached.
"""
from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> int:
    spec_path, result_path = argv[1], argv[2]
    spec = json.loads(open(spec_path).read())
    from .config import Settings
    from .logs import llama_log_to_file
    from .measure import Test, measure_config

    llama_log_to_file(spec.get("log_file"))
    settings = Settings.from_dict(spec["settings"])
    tests = [Test.from_dict(t) for t in spec["tests"]]
    # one line per finished test, flushed at once: a crash in a later test keeps the earlier ones
    with open(result_path, "a") as fh:
        def emit(row: dict) -> None:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

        measure_config(settings, tests, repetitions=spec["repetitions"], model_path=spec["model_path"], on_row=emit)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
