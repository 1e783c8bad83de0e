"""Child-process entry points for one trial.

`python -m kit.worker SPEC.json RESULT.json`: run the configuration's tests back to back. Runs in its own process
so that an abort, a segfault or an out-of-memory kill inside llama.cpp ends only this trial. Each finished test is
appended to RESULT (JSON lines) at once; a test missing from it at exit is the one the child died in, or one it
never reached.

`python -m kit.worker --serve SPEC.json`: the same configuration, held open for an interleaved sweep
(`kit.sweep`). The model is loaded once; the parent then sends one JSON command per line on stdin and reads one
JSON reply per line: {"op": "prepare", "test": i} (depth fill and warm-up), {"op": "rep", "test": i} (one timed
repetition; the reply carries its t/s as "ts"), {"op": "finish", "test": i} (the test's row), {"op": "quit"}. Replies go to the process's original
stdout; anything else that writes to stdout (a library's print) is sent to stderr, so it cannot corrupt them.
"""
from __future__ import annotations

import json
import os
import sys
import time

import psutil

from kit.config import Settings
from kit.logs import llama_log_to_file
from kit.measure import ENGINE_KINDS, EngineRun, ResourceMonitor, Test, load_model, measure_config, with_trial_columns


def main(argv: list[str]) -> int:
    if len(argv) > 1 and argv[1] == "--serve":
        return serve(argv[2])
    spec_path, result_path = argv[1], argv[2]
    spec = json.loads(open(spec_path).read())

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


def serve(spec_path: str) -> int:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # fd 1 now goes to stderr: only `reply` writes to the protocol stream
    spec = json.loads(open(spec_path).read())

    def reply(obj: dict) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    llama_log_to_file(spec.get("log_file"))
    settings = Settings.from_dict(spec["settings"])
    tests = [Test.from_dict(t) for t in spec["tests"]]
    origin = float(spec.get("t_origin", 0.0))
    proc = psutil.Process()
    with ResourceMonitor() as mon:
        try:
            lm = load_model(settings, model_path=spec["model_path"])
        except Exception as exc:  # noqa: BLE001 - reported to the parent as this configuration's failure
            reply({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
            return 1
        reply({"ok": True, "load_ms": lm.load_ms})
        runs: dict[int, EngineRun] = {}
        busy: dict[int, list[float]] = {}  # test -> [cpu seconds, wall seconds] spent in its own commands
        try:
            for line in sys.stdin:
                cmd = json.loads(line)
                op, i = cmd.get("op"), cmd.get("test")
                if op == "quit":
                    break
                c0, w0 = sum(proc.cpu_times()[:2]), time.perf_counter()
                try:
                    test = tests[i]
                    if op == "prepare":
                        if test.kind not in ENGINE_KINDS:
                            raise ValueError(f"test kind {test.kind!r} cannot be interleaved (engine kinds only)")
                        runs[i] = EngineRun(lm, test)
                        runs[i].warmup()
                        out = {"ok": True}
                    elif op == "rep":
                        run = runs[i]
                        run.once()
                        # the sample's t/s, for a parent deciding whether to add rounds (kit.sweep.Adaptive)
                        out = {"ok": True, "ts": run.samples_n[-1] / (run.samples_ns[-1] / 1e9)}
                    elif op == "finish":
                        run = runs.pop(i)
                        cpu_s, wall_s = busy.get(i, [0.0, 0.0])
                        row = with_trial_columns({"status": "ok", "error": None, **run.row()}, lm, test, mon)
                        # CPU use while this test's own commands ran, not while the other configurations ran
                        row.update(cpu_util_pct=round(100 * cpu_s / wall_s, 1) if wall_s > 0 else None,
                                   samples_at_s=[round(a - origin, 3) for a in run.at_s])
                        out = {"ok": True, "row": row}
                    else:
                        raise ValueError(f"unknown command {op!r}")
                except Exception as exc:  # noqa: BLE001 - one failing test must not end the others
                    runs.pop(i, None)
                    out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                acc = busy.setdefault(i, [0.0, 0.0])
                acc[0] += sum(proc.cpu_times()[:2]) - c0
                acc[1] += time.perf_counter() - w0
                reply(out)
        finally:
            lm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
