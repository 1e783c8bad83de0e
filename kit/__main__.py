"""Command line: `python -m kit {info,bench,fidelity,run,report,compare,serve-check}`.

`bench` takes llama-bench's flags, comma lists and defaults (including `-fa auto`), so a llama-bench user feels at
home; every flag goes through the checks of `Settings`, `Test` and the sweep's plan before anything runs, all
problems in one error. Each configuration runs in its own child process and the rows land in <out>/results.jsonl
like any sweep.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import pandas as pd
import psutil

from kit import compare, report, runner
from kit.config import Settings, SettingsError
from kit.environment import capture_environment, decode_roofline
from kit.fidelity import format_result, run_fidelity
from kit.measure import Test
from kit.models import ModelFileError, model_card
from kit.paths import DEFAULT_MODEL, resolve
from kit.results import load_results
from kit.sweep import plan_trials, planned_rows, run_sweep

# llama-bench's -fa values: on/off/auto, and 1/0 as older llama-bench versions took them
FLASH_ATTN_VALUES = {"on": "on", "1": "on", "off": "off", "0": "off", "auto": "auto"}
DEFAULT_UBATCH = 512


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


def _flash_attn(s: str) -> list[str]:
    out = []
    for x in _strs(s):
        if x.lower() not in FLASH_ATTN_VALUES:
            raise argparse.ArgumentTypeError(f"expected on, off or auto (or 1/0), got {x!r}")
        out.append(FLASH_ATTN_VALUES[x.lower()])
    return out


def resolve_flash_attn(requested: str) -> bool:
    """-fa on/off/auto -> Settings.flash_attn.

    llama-cpp-python's `flash_attn` is a bool, so "auto" is resolved here as llama.cpp resolves its
    LLAMA_FLASH_ATTN_TYPE_AUTO when it creates a context: flash attention is enabled unless a layer's attention
    would run on a device without the FLASH_ATTN_EXT op ("Flash Attention was auto, set to enabled" in llama.log).
    The CPU backend has the op for every model, so on this CPU-only build auto is on. A GPU backend implements it
    for the common head sizes, so auto is taken as on there too; rows say both (flash_attn_requested "auto",
    flash_attn_effective "on")."""
    return requested in ("auto", "on")


def cmd_info(args) -> int:
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
    print(f"GPU        {env['gpu_info'] or 'none found (NVML, llama.cpp devices)'}")
    if env.get("gpu_software_note"):
        print(f"           {env['gpu_software_note']}")
    print(f"Build      llama-cpp-python {env['llama_cpp_python']}, ggml {env['ggml_version']} "
          f"(commit {env['ggml_commit']}); GPU offload: "
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


def bench_tests(args, problems: list[str]) -> list[Test]:
    """llama-bench's tests: pp<p> and tg<n> at every depth; 0 leaves a kind out. Invalid counts go to problems."""
    tests = []
    for flag, counts in (("-p", args.p), ("-n", args.n)):
        for count in counts:
            for d in args.d:
                try:
                    if count:
                        tests.append(Test("pp", n_prompt=count, n_depth=d) if flag == "-p" else
                                     Test("tg", n_gen=count, n_depth=d))
                except SettingsError as exc:
                    problems.append(f"{flag} {count} -d {d}: {exc}")
    if not tests and not problems:
        problems.append("nothing to run: -p and -n are both 0")
    return tests


def bench_configs(args) -> list[tuple[Settings, Test, str]]:
    """llama-bench semantics: every combination of the comma lists; n_ctx sized per test unless --n-ctx.

    Returns (settings, test, the -fa value asked: on, off or auto). Every combination is checked before anything runs
    (Test, Settings, then the sweep's plan: model file, context fits, repetitions); all problems in one
    SettingsError. Without -ub, n_ubatch is llama-bench's 512 capped at n_batch (what llama.cpp would use); an
    explicit -ub larger than -b is an error, as Settings has it."""
    problems: list[str] = []
    tests = bench_tests(args, problems)
    if args.r < 1:
        problems.append(f"-r {args.r}: repetitions must be positive")
    combos = []
    for m, t, b, ub, ngl, fa, ctk, ctv, mmp in itertools.product(
            args.m, args.t, args.b, args.ub or [None], args.ngl, args.fa, args.ctk, args.ctv, args.mmp):
        for test in tests:
            n_ctx = args.n_ctx if args.n_ctx is not None else max(test.tokens_needed(), 1)
            try:
                s = Settings(model=m, n_threads=t, n_threads_batch=t, n_batch=b,
                             n_ubatch=min(DEFAULT_UBATCH, b) if ub is None else ub, n_gpu_layers=ngl,
                             flash_attn=resolve_flash_attn(fa), type_k=ctk, type_v=ctv, use_mmap=mmp, n_ctx=n_ctx)
            except SettingsError as exc:
                problems.append(str(exc))
                continue
            combos.append((s, test, fa))
    for test in dict.fromkeys(t for _, t, _ in combos):
        try:
            plan_trials([s for s, t, _ in combos if t == test], [test], max(args.r, 1))
        except (SettingsError, ModelFileError) as exc:
            problems.append(str(exc))
    if problems:
        raise SettingsError("invalid bench flags, nothing was run:\n  " + "\n  ".join(dict.fromkeys(problems)))
    return combos


def format_rows(df, fmt: str) -> str:
    if fmt == "jsonl":
        return "\n".join(json.dumps(r, default=str) for r in df.to_dict("records"))
    if fmt == "json":
        return json.dumps(df.to_dict("records"), indent=2, default=str)
    cols = ["model_type", "model_size", "model_n_params", "backends", "n_threads", "n_batch", "n_ubatch",
            "n_gpu_layers", "flash_attn", "flash_attn_requested", "flash_attn_effective", "type_k", "type_v",
            "use_mmap", "test", "avg_ts", "stddev_ts", "status"]
    if fmt == "csv":
        return df[[c for c in cols if c in df]].to_csv(index=False)
    # markdown, as llama-bench prints it: show the settings that vary, and what -fa auto became
    df = df.assign(fa=[f"auto -> {e}" if r == "auto" else r
                       for r, e in zip(df["flash_attn_requested"], df["flash_attn_effective"])])
    varying = [c for c in ("n_batch", "n_ubatch", "n_gpu_layers", "fa", "type_k", "type_v", "use_mmap")
               if c in df and (df[c].astype(str).nunique() > 1 or c == "fa" and (df[c] != "on").any())]
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
    combos = bench_configs(args)
    out = resolve(args.out)
    # one sweep call per distinct test keeps llama-bench's "context sized to the test" semantics; the -fa values
    # of a test are configurations of that one sweep, so their repetitions interleave like any other setting
    for test in dict.fromkeys(t for _, t, _ in combos):
        # "-fa on,auto" names one configuration twice: measure it once
        configs = {json.dumps(s.to_dict(), sort_keys=True): s for s, t, _ in combos if t == test}
        run_sweep(out.name, list(configs.values()), [test], repetitions=args.r,
                  out_root=out.parent, progress=not args.quiet, retry_failed=args.retry_failed,
                  interleave=False if args.no_interleave else None)
    df = load_results(out)
    # this invocation's rows, in the order of the combinations, with what -fa asked and what it resolved to
    # (results.jsonl keeps `flash_attn`, the resolved switch)
    df = pd.concat([planned_rows(df, [s], [t], args.r).assign(**_fa_columns(fa)) for s, t, fa in combos],
                   ignore_index=True)
    print(format_rows(df, args.o))
    return 0 if (df["status"] == "ok").all() else 1


def _fa_columns(fa: str) -> dict:
    return {"flash_attn_requested": fa, "flash_attn_effective": "on" if resolve_flash_attn(fa) else "off"}


def cmd_fidelity(args) -> int:
    res = run_fidelity(model=args.m, n_prompt=args.p, n_gen=args.n, reps=args.r, threads=args.t, rounds=args.rounds,
                       log=lambda s: print(s, file=sys.stderr))
    print(format_result(res))
    return 0


def cmd_compare(args) -> int:
    """Two runs' verdicts side by side (kit.compare): a markdown table on stdout, optionally an HTML page."""
    try:
        df, prov, speeds = compare.load_comparison(args.run_a, args.run_b)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(compare.format_comparison(df, prov, (args.run_a, args.run_b), args.o, speeds=speeds))
    if args.html:
        print(f"html: {report.compare_page(args.run_a, args.run_b, args.html)}", file=sys.stderr)
    return 0


def _bench_parser(sub) -> None:
    phys = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    p = sub.add_parser("bench", help="llama-bench-style engine benchmark (comma lists sweep)")
    p.add_argument("-m", type=_strs, default=[DEFAULT_MODEL], help="model(s): bundled name or GGUF path")
    p.add_argument("-p", type=_ints, default=[512], help="prompt tokens (pp test), default 512; 0 = no pp test")
    p.add_argument("-n", type=_ints, default=[128], help="generated tokens (tg test), default 128; 0 = no tg test")
    p.add_argument("-d", type=_ints, default=[0], help="context depth filled before the timed run, default 0")
    p.add_argument("-r", type=int, default=5, help="repetitions after one warm-up, default 5")
    p.add_argument("-t", type=_ints, default=[phys], help=f"threads (gen and batch), default {phys} (physical cores)")
    p.add_argument("-b", type=_ints, default=[2048], help="n_batch, default 2048")
    p.add_argument("-ub", type=_ints, default=None,
                   help=f"n_ubatch, default {DEFAULT_UBATCH} capped at n_batch; must not exceed -b")
    p.add_argument("-ngl", type=_ints, default=[99], help="n_gpu_layers, default 99 (ignored by a CPU build)")
    p.add_argument("-fa", type=_flash_attn, default=["auto"],
                   help="flash attention on|off|auto (or 1|0), default auto as llama-bench: on for the CPU backend; "
                        "rows say what auto became (flash_attn_requested, flash_attn_effective)")
    p.add_argument("-ctk", type=_strs, default=["f16"], help="K cache type, default f16")
    p.add_argument("-ctv", type=_strs, default=["f16"], help="V cache type, default f16")
    p.add_argument("-mmp", type=_bools, default=[True], help="use mmap 0/1, default 1")
    p.add_argument("--n-ctx", type=int, default=None, help="context size (default: sized to each test, as llama-bench)")
    p.add_argument("-o", choices=("md", "csv", "json", "jsonl"), default="md", help="output format")
    p.add_argument("--out", default="outputs/bench", help="study folder for results.jsonl (resumable)")
    p.add_argument("--retry-failed", action="store_true", help="run failed trials again")
    p.add_argument("--no-interleave", action="store_true",
                   help="measure each configuration's repetitions back to back, as llama-bench does (default: "
                        "alternate them between configurations, so drift of the machine's speed hits all alike)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m kit", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("info", help="hardware, build and model report")
    p.add_argument("-m", "--model", default=DEFAULT_MODEL, help="bundled model name or GGUF path")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--no-bandwidth", action="store_true", help="skip the memory bandwidth measurement")
    p.set_defaults(fn=cmd_info)

    _bench_parser(sub)

    p = sub.add_parser("fidelity", help="compare the kit's engine t/s with llama-bench built from the same source")
    p.add_argument("-m", default=DEFAULT_MODEL)
    p.add_argument("-p", type=int, default=512)
    p.add_argument("-n", type=int, default=128)
    p.add_argument("-r", type=int, default=5)
    p.add_argument("-t", type=int, default=None, help="threads (default: all logical CPUs)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of both tools")
    p.set_defaults(fn=cmd_fidelity)

    p = sub.add_parser("compare", help="two runs' labels and effects side by side, flips and provenance flagged")
    p.add_argument("run_a", help="the first run's output root (e.g. outputs)")
    p.add_argument("run_b", help="the second run's output root (e.g. outputs-run2)")
    p.add_argument("-o", choices=("md", "csv", "json"), default="md", help="output format, default md")
    p.add_argument("--html", default=None, metavar="FILE", help="also write the comparison as an HTML page")
    p.set_defaults(fn=cmd_compare)

    # run and report own their flags (kit.runner / kit.report); listed here for --help
    sub.add_parser("run", help="run every study notebook in order and render the report (see run --help)")
    sub.add_parser("report", help="render executed notebooks and the findings index to HTML (see report --help)")
    sub.add_parser("serve-check", help="the same load on llama-server (built from the vendored source) and on "
                                       "llama-cpp-python's server (see serve-check --help)")
    return ap


def _serve_check(argv):
    from kit.studies.server import main as serve_check_main  # the app layer may use a study; loaded when asked
    return serve_check_main(argv)


_DELEGATED = {"run": runner.main_run, "report": report.main, "serve-check": _serve_check}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in _DELEGATED:
        return int(_DELEGATED[argv[0]](argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (SettingsError, ModelFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
