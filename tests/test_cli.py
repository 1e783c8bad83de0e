"""`python -m kit bench`: llama-bench's flags and defaults, every flag through the kit's checks before anything runs."""
import json

import pytest

from kit.__main__ import bench_configs, build_parser, main, resolve_flash_attn


def _bench_args(*flags: str):
    return build_parser().parse_args(["bench", *flags])


@pytest.mark.parametrize("flags, message", [
    (["-p", "-5"], "n_prompt=-5 must be an integer >= 0"),
    (["-b", "256", "-ub", "512"], "n_ubatch=512 > n_batch=256"),
    (["-r", "0"], "-r 0: repetitions must be positive"),
    (["-ctv", "q4_0", "-fa", "off"], "type_v=q4_0 (a quantized V cache) needs flash_attn=True"),
    (["--n-ctx", "64", "-p", "512"], "n_ctx=64 is smaller than the test pp512"),
])
def test_bad_flags_are_one_error_and_nothing_runs(tmp_path, capsys, flags, message):
    out = tmp_path / "bench"
    assert main(["bench", *flags, "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid bench flags, nothing was run") and message in err
    assert not out.exists()


def test_all_problems_of_a_bench_are_listed_together(capsys, tmp_path):
    assert main(["bench", "-p", "-5", "-r", "0", "-ctk", "q9", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "n_prompt=-5" in err and "-r 0" in err and "type_k='q9'" in err


def test_flash_attn_takes_llama_bench_values_and_defaults_to_auto():
    assert _bench_args().fa == ["auto"]
    assert _bench_args("-fa", "on,off,auto,1,0").fa == ["on", "off", "auto", "on", "off"]
    with pytest.raises(SystemExit):
        _bench_args("-fa", "maybe")
    assert resolve_flash_attn("auto") is True and resolve_flash_attn("off") is False
    combos = bench_configs(_bench_args("-p", "16", "-n", "0", "-fa", "auto,off"))
    assert [(s.flash_attn, fa) for s, _, fa in combos] == [(True, "auto"), (False, "off")]


def test_ubatch_defaults_to_512_capped_at_n_batch():
    (s, t, _), = bench_configs(_bench_args("-p", "16", "-n", "0", "-b", "256"))
    assert (s.n_batch, s.n_ubatch, s.n_ctx, t.name) == (256, 256, 16, "pp16")
    (s, _, _), = bench_configs(_bench_args("-p", "16", "-n", "0"))
    assert (s.n_batch, s.n_ubatch) == (2048, 512)


def test_bench_rows_say_what_auto_became_and_who_measured(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "-p", "16", "-n", "0", "-r", "1", "-t", "1", "-o", "jsonl", "--out", str(out), "-q"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert row["status"] == "ok" and row["avg_ts"] > 0 and row["test"] == "pp16"
    assert row["flash_attn"] is True and row["flash_attn_requested"] == "auto" and row["flash_attn_effective"] == "on"
    assert row["llama_cpp_python_version"] and row["build_commit"] != row["llama_cpp_python_version"]
    assert len(row["model_sha256"]) == 64
    main(["bench", "-p", "16", "-n", "0", "-r", "1", "-t", "1", "--out", str(out), "-q"])
    assert "| auto -> on |" in capsys.readouterr().out  # resumed, and the markdown says what auto became
