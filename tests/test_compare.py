"""kit.compare and `kit compare`: two runs side by side, exactly the flipped labels flagged with what the first run
said about them, provenance differences named; the report shows the same section."""
import json
from pathlib import Path

from kit import compare, report, verdicts
from kit.__main__ import main
from kit.results import append_rows

FAST = [110, 112, 111, 113, 109]
BASE = [100, 101, 99, 100, 102]


def _run(root: Path, r1_candidate, commit: str, deep=(92, 93, 91, 92, 94)) -> None:
    """A run's folders: G3 supported, G2 mixed, M1 no meaningful effect, R1 from the given samples, G1 not
    testable; one result row and an environment.json with the given build commit."""
    g2 = verdicts.combine("G2", {
        "tg at depth 0": verdicts.compare("G2", FAST, BASE, metric="tg t/s ratio, depth 0"),
        "tg at depth 1024": verdicts.compare("G2", list(deep), BASE, metric="tg t/s ratio, depth 1024"),
    }, depends_on="context depth")
    verdicts.write_verdicts(root / "20_batch_flash_attn", [
        g2, verdicts.compare("G3", FAST, BASE, metric="pp t/s ratio")])
    verdicts.write_verdicts(root / "30_context_kv", [
        verdicts.compare("M1", [100.5, 101, 99.5, 100, 101.5], BASE, metric="tg t/s ratio")])
    verdicts.write_verdicts(root / "60_rag", [
        verdicts.compare("R1", r1_candidate, [100, 90, 125, 85, 110], higher_is_better=False,
                         metric="RAG search latency ms")])
    verdicts.write_verdicts(root / "10_gpu_layers", [verdicts.not_testable("G1", "no GPU offload")])
    append_rows(root / "20_batch_flash_attn" / "results.jsonl", [
        {"study": "20_batch_flash_attn", "status": "ok", "build_commit": commit, "cpu_info": "Test CPU",
         "model_sha256": "ab" * 32, "llama_cpp_python_version": "0.3.36", "model_filename": "m.gguf"}])
    (root / "20_batch_flash_attn" / "environment.json").write_text(json.dumps(
        {"ggml_commit": commit, "cpu_info": "Test CPU", "llama_cpp_python": "0.3.36", "hostname": "h"}))


def _two_runs(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "outputs", tmp_path / "outputs-run2"
    _run(a, [80, 120, 95, 130, 70], "abc1234")          # R1 inconclusive in the first run
    _run(b, [50, 52, 49, 51, 50], "def5678")            # decided (supported) in the second
    return a, b


def test_compare_runs_flags_exactly_the_flipped_label(tmp_path):
    a, b = _two_runs(tmp_path)
    df = compare.compare_runs(a, b)
    assert set(df["claim"]) == {"G1", "G2", "G3", "M1", "R1"}
    flips = df[df["flip"]]
    assert list(flips["claim"]) == ["R1"]
    r1 = flips.iloc[0]
    assert (r1["verdict_a"], r1["verdict_b"], r1["first_run"]) == ("inconclusive", "supported", "inconclusive")
    assert r1["label_a"].startswith("inconclusive: about") and r1["ci_low_a"] < 1 < r1["ci_high_a"]
    assert r1["ci_high_b"] < 1 and r1["b_over_a"] < 1
    g2 = df[df["claim"] == "G2"].iloc[0]
    assert g2["verdict_a"] == g2["verdict_b"] == "mixed" and not g2["flip"] and g2["conditions_changed"] == ""
    lines = compare.summary_lines(df)
    assert lines[0] == "same label in both runs: 4 of 5 claims measured in both"
    assert "R1 inconclusive -> supported (inconclusive in A)" in lines[1]
    assert lines[2] == "every flip was inconclusive or borderline in A: yes"


def test_provenance_names_what_differs(tmp_path):
    a, b = _two_runs(tmp_path)
    prov = compare.provenance_diff(a, b).set_index("field")
    assert prov.loc["build_commit", "differs"] and prov.loc["build_commit", "run_a"] == "abc1234"
    assert not prov.loc["cpu_info", "differs"] and not prov.loc["model_sha256", "differs"]
    assert list(prov.index[prov["differs"]]) == ["build_commit"]


def test_cli_compare_prints_a_table_with_intervals_and_writes_html(tmp_path, capsys):
    a, b = _two_runs(tmp_path)
    page = tmp_path / "cmp.html"
    assert main(["compare", str(a), str(b), "--html", str(page)]) == 0
    out = capsys.readouterr().out
    r1 = next(line for line in out.splitlines() if line.startswith("| R1 |"))
    assert "FLIP (inconclusive in A)" in r1 and "| supported |" in r1 and "[" in r1
    g3 = next(line for line in out.splitlines() if line.startswith("| G3 |"))
    assert "FLIP" not in g3 and "1.11 [1.08, 1.13]" in g3
    assert "- build_commit: A abc1234 | B def5678" in out
    html = page.read_text()
    assert "<tr class='flip'><td>R1</td>" in html and "build_commit" in html
    assert main(["compare", str(a), str(tmp_path / "missing")]) == 2


def test_report_shows_the_second_run_when_asked(tmp_path):
    a, b = _two_runs(tmp_path)
    text = report.render_report(a, compare_to=b).read_text()
    section = text[text.index("id='compare'"):]
    assert "<tr class='flip'><td>R1</td>" in section and "every flip was inconclusive or borderline in A: yes" in section
    assert "id='compare'" not in report.render_report(a).read_text()


def test_a_condition_that_changes_inside_a_mixed_claim_is_named(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _run(a, BASE, "c")
    _run(b, BASE, "c", deep=[80, 120, 95, 130, 70])      # depth 1024: refuted -> inconclusive; still mixed
    g2 = compare.compare_runs(a, b).set_index("claim").loc["G2"]
    assert not g2["flip"] and g2["conditions_changed"] == "tg at depth 1024: refuted -> inconclusive"
    assert list(compare.provenance_diff(a, b)["differs"]) == [False] * len(compare.PROVENANCE_FIELDS)


def test_a_flip_says_whether_the_effect_moved_or_only_the_interval_widened(tmp_path):
    """G3 decided on quiet samples in A, inconclusive on noisy ones in B at the same ratio: the same effect, B's
    interval several times as wide with the same samples per side. M1 moves from x1.11 to x1.00: the effect moved."""
    a, b = tmp_path / "a", tmp_path / "b"
    verdicts.write_verdicts(a / "20_batch_flash_attn", [verdicts.compare(
        "G3", [100, 100.5, 99.5, 100.2, 99.8], [100, 100.3, 99.7, 100.1, 99.9], metric="pp t/s ratio")])
    verdicts.write_verdicts(b / "20_batch_flash_attn", [verdicts.compare(
        "G3", [90, 110, 100, 95, 105], [92, 108, 100, 97, 103], metric="pp t/s ratio")])
    verdicts.write_verdicts(a / "30_context_kv", [verdicts.compare("M1", FAST, BASE, metric="tg t/s ratio")])
    verdicts.write_verdicts(b / "30_context_kv", [verdicts.compare(
        "M1", [100.5, 101, 99.5, 100, 101.5], BASE, metric="tg t/s ratio")])
    df = compare.compare_runs(a, b).set_index("claim")
    g3, m1 = df.loc["G3"], df.loc["M1"]
    assert (g3["verdict_a"], g3["verdict_b"]) == ("no meaningful effect", "inconclusive") and g3["flip"]
    assert g3["n_a"] == g3["n_b"] == 5
    assert g3["cause"].startswith("each run's effect lies inside the other's interval")
    assert "as wide as A's with the same samples per side: a noisier run" in g3["cause"]
    assert m1["flip"] and m1["cause"].startswith("the effect moved")
    lines = compare.summary_lines(compare.compare_runs(a, b))
    assert "a noisier run" in lines[1] and lines[2] == "every flip was inconclusive or borderline in A: no: G3, M1"


def test_machine_speed_reads_each_runs_probe(tmp_path):
    a, b = _two_runs(tmp_path)
    (a / "speed_probe").mkdir()
    (a / "speed_probe" / "drift.json").write_text(json.dumps({"tests": [
        {"test": "tg64", "start_ts": 87.02, "end_ts": 80.89}, {"test": "pp128", "start_ts": 280.8, "end_ts": 247.0}]}))
    assert compare.machine_speed(a) == "tg64 87 -> 80.9, pp128 281 -> 247 t/s (start -> end of the run)"
    assert compare.machine_speed(b) == "not probed"
    out = compare.format_comparison(compare.compare_runs(a, b), speeds=(compare.machine_speed(a),
                                                                       compare.machine_speed(b)))
    assert out.endswith("machine speed (speed probe): A tg64 87 -> 80.9, pp128 281 -> 247 t/s (start -> end of the "
                        "run); B not probed")
