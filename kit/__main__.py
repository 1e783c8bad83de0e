"""Command line: `python -m kit {info,bench,fidelity,run,report}`.

`bench` takes llama-bench's flags and comma lists, so a llama-bench user feels at home; each configuration
runs in its own child process and the rows land in <out>/results.jsonl like any sweep.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path


def _ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {s!r}") from None


def _strs(s: str) -> list[str]:
    return [x for x in s.split(",") if x]


def _bools(s: str) -> list[bool]:
    out = []
    for x in _strs(s):
        if x.lower() in ("1", "on", "true", "yes"):
            out.append(True)
        elif x.lower() in ("0", "off", "false", "no"):
            out.append(False)
        else:
            raise argparse.ArgumentTypeError(f"expected 0/1 values, got {x!r}")
    return out


def cmd_info(args) -> int:
    from kit.environment import capture_environment, decode_roofline
    from kit.models import model_card

    env = capture_environment(bandwidth=not args.no_bandwidth)
    card = model_card(args.model).to_dict()
    if "mem_read_gbs" in env:
        card["decode_roofline_ts"] = round(decode_roofline(card["size_bytes"], env["mem_read_gbs"]), 1)
    if args.json:
        print(json.dumps({"environment": env, "model": card}, indent=2, default=str))
        return 0
    print(f"CPU        {env['cpu_info']} ({env['cpu_physical_cores']} physical / {env['cpu_logical_cores']} logical cores)")
    print(f"RAM        {env['ram_total_mb']} MiB; NUMA nodes: {len(env['numa_nodes']) or 1}")
    if "mem_read_gbs" in env:
        print(f"Bandwidth  read {env['mem_read_gbs']} GB/s, copy {env['mem_copy_gbs']} GB/s (measured)")
    print(f"GPU        {env['gpu_info'] or 'none found (NVML)'}")
    print(f"Build      llama-cpp-python {env['llama_cpp_python']}; GPU offload: "
          f"{'yes' if env['gpu_offload'] else 'no (this build has no GPU offload: n_gpu_layers is ignored)'}")
    print(f"System     {env['system_info']}")
    print(f"OS/Python  {env['os']}, Python {env['python']}")
    print(f"Model      {card['file_name']}: {card['model_type']}, {card['size_bytes'] / 2**20:.1f} MiB, "
          f"{card['n_params'] / 1e6:.1f} M params, {card['bits_per_weight']:.2f} bits/weight")
    print(f"           {card['n_layers']} layers, n_ctx_train {card['n_ctx_train']}, rope_freq_base "
          f"{card['rope_freq_base']}, n_embd {card['n_embd']}, heads {card['n_head']}/{card['n_head_kv']} (kv), "
          f"chat template: {'yes' if card['has_chat_template'] else 'no'}")
    print(f"           sha256 {card['sha256']}")
    if "decode_roofline_ts" in card:
        print(f"Roofline   tg <= {card['decode_roofline_ts']} t/s (read bandwidth / model bytes)")
    return 0


def bench_configs(args) -> list[tuple]:
    """llama-bench semantics: every combination of the comma lists; n_ctx sized per test unless --n-ctx."""
    from kit.config import Settings
    from kit.measure import Test

    tests = [Test("pp", n_prompt=p, n_depth=d) for p in args.p if p for d in args.d]
    tests += [Test("tg", n_gen=n, n_depth=d) for n in args.n if n for d in args.d]
    if not tests:
        raise SystemExit("error: nothing to run: -p and -n are both 0")
    combos = []
    for m, t, b, ub, ngl, fa, ctk, ctv, mmp in itertools.product(
            args.m, args.t, args.b, args.ub, args.ngl, args.fa, args.ctk, args.ctv, args.mmp):
        for test in tests:
            n_ctx = args.n_ctx or max(test.tokens_needed(), 1)
            s = Settings(model=m, n_threads=t, n_threads_batch=t, n_batch=b, n_ubatch=min(ub, b), n_gpu_layers=ngl,
                         flash_attn=fa, type_k=ctk, type_v=ctv, use_mmap=mmp, n_ctx=n_ctx)
            combos.append((s, test))
    return combos


def format_rows(df, fmt: str) -> str:
    if fmt == "jsonl":
        return "\n".join(json.dumps(r, default=str) for r in df.to_dict("records"))
    if fmt == "json":
        return json.dumps(df.to_dict("records"), indent=2, default=str)
    cols = ["model_type", "model_size", "model_n_params", "backends", "n_threads", "n_batch", "n_ubatch",
            "n_gpu_layers", "flash_attn", "type_k", "type_v", "use_mmap", "test", "avg_ts", "stddev_ts", "status"]
    if fmt == "csv":
        return df[[c for c in cols if c in df]].to_csv(index=False)
    # markdown, as llama-bench prints it: show the settings that vary
    varying = [c for c in ("n_batch", "n_ubatch", "n_gpu_layers", "flash_attn", "type_k", "type_v", "use_mmap")
               if c in df and df[c].astype(str).nunique() > 1]
    head = ["model", "size", "params", "backend", "threads", *varying, "test", "t/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if h in ("size", "params", "t/s") else "---"
                                                           for h in head) + "|"]
    for r in df.to_dict("records"):
        ts = f"{r['avg_ts']:.2f} ± {r['stddev_ts']:.2f}" if r.get("status") == "ok" else f"{r['status']}: {str(r.get('error'))[:60]}"
        cells = [r["model_type"], f"{r['model_size'] / 2**20:.2f} MiB", f"{r['model_n_params'] / 1e6:.2f} M",
                 r["backends"], str(r["n_threads"]), *[str(r[c]) for c in varying], r["test"], ts]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cmd_bench(args) -> int:
    import pandas as pd

    from kit.results import load_results
    from kit.sweep import planned_rows, run_sweep

    combos = bench_configs(args)
    out = Path(args.out)
    # one sweep call per distinct test keeps llama-bench's "context sized to the test" semantics
    for test in dict.fromkeys(t for _, t in combos):
        run_sweep(out.name, [s for s, t in combos if t == test], [test], repetitions=args.r,
                  out_root=out.parent, progress=not args.quiet, retry_failed=args.retry_failed,
                  interleave=False if args.no_interleave else None)
    df = load_results(out)
    # this invocation's rows, in the order of the combinations
    df = pd.concat([planned_rows(df, [s], [t], args.r) for s, t in combos], ignore_index=True)
    print(format_rows(df, args.o))
    return 0 if (df["status"] == "ok").all() else 1


def cmd_fidelity(args) -> int:
    from kit.fidelity import format_result, run_fidelity

    res = run_fidelity(model=args.m, n_prompt=args.p, n_gen=args.n, reps=args.r, threads=args.t, rounds=args.rounds,
                       log=lambda s: print(s, file=sys.stderr))
    print(format_result(res))
    return 0


def main(argv: list[str] | None = None) -> int:
    import os

    import psutil

    from kit.models import DEFAULT_MODEL

    ap = argparse.ArgumentParser(prog="python -m kit", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("info", help="hardware, build and model report")
    p.add_argument("-m", "--model", default=DEFAULT_MODEL, help="bundled model name or GGUF path")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--no-bandwidth", action="store_true", help="skip the memory bandwidth measurement")
    p.set_defaults(fn=cmd_info)

    phys = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    p = sub.add_parser("bench", help="llama-bench-style engine benchmark (comma lists sweep)")
    p.add_argument("-m", type=_strs, default=[DEFAULT_MODEL], help="model(s): bundled name or GGUF path")
    p.add_argument("-p", type=_ints, default=[512], help="prompt tokens (pp test), default 512")
    p.add_argument("-n", type=_ints, default=[128], help="generated tokens (tg test), default 128")
    p.add_argument("-d", type=_ints, default=[0], help="context depth filled before the timed run, default 0")
    p.add_argument("-r", type=int, default=5, help="repetitions after one warm-up, default 5")
    p.add_argument("-t", type=_ints, default=[phys], help=f"threads (gen and batch), default {phys} (physical cores)")
    p.add_argument("-b", type=_ints, default=[2048], help="n_batch, default 2048")
    p.add_argument("-ub", type=_ints, default=[512], help="n_ubatch, default 512")
    p.add_argument("-ngl", type=_ints, default=[99], help="n_gpu_layers, default 99 (ignored by a CPU build)")
    p.add_argument("-fa", type=_bools, default=[False], help="flash attention 0/1, default 0")
    p.add_argument("-ctk", type=_strs, default=["f16"], help="K cache type, default f16")
    p.add_argument("-ctv", type=_strs, default=["f16"], help="V cache type, default f16")
    p.add_argument("-mmp", type=_bools, default=[True], help="use mmap 0/1, default 1")
    p.add_argument("--n-ctx", type=int, default=0, help="context size (default: sized to each test, as llama-bench)")
    p.add_argument("-o", choices=("md", "csv", "json", "jsonl"), default="md", help="output format")
    p.add_argument("--out", default="outputs/bench", help="study folder for results.jsonl (resumable)")
    p.add_argument("--retry-failed", action="store_true", help="run failed trials again")
    p.add_argument("--no-interleave", action="store_true",
                   help="measure each configuration's repetitions back to back, as llama-bench does (default: "
                        "alternate them between configurations, so drift of the machine's speed hits all alike)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("fidelity", help="compare the kit's engine t/s with llama-bench built from the same source")
    p.add_argument("-m", default=DEFAULT_MODEL)
    p.add_argument("-p", type=int, default=512)
    p.add_argument("-n", type=int, default=128)
    p.add_argument("-r", type=int, default=5)
    p.add_argument("-t", type=int, default=None, help="threads (default: all logical CPUs)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of both tools")
    p.set_defaults(fn=cmd_fidelity)

    # run and report own their flags (kit.runner / kit.report); listed here for --help
    sub.add_parser("run", help="run every study notebook in order and render the report (see run --help)")
    sub.add_parser("report", help="render executed notebooks and the findings index to HTML (see report --help)")

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in _DELEGATED:
        return _delegate(*_DELEGATED[argv[0]], argv[1:])
    args = ap.parse_args(argv)
    from kit.config import SettingsError
    from kit.models import ModelFileError

    try:
        return args.fn(args)
    except (SettingsError, ModelFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


_DELEGATED = {"run": ("kit.runner", "main_run"), "report": ("kit.report", "main_report")}


def _delegate(module: str, fn: str, rest: list[str]) -> int:
    import importlib

    return int(getattr(importlib.import_module(module), fn)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
