"""kit.report: the findings page and the HTML report render from verdict files alone; missing studies say "not run"."""
import json
from pathlib import Path

import matplotlib
import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from kit import report, verdicts

matplotlib.use("Agg")


def _study(out: Path) -> None:
    d = out / "20_batch_flash_attn"
    d.mkdir(parents=True)
    fig_dir = d / "figures"
    fig_dir.mkdir()
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([1, 2], [1, 2])
    fig.savefig(fig_dir / "pp.png")
    v = verdicts.compare("G3", [110, 112, 111, 113, 109], [100, 101, 99, 100, 102], metric="pp t/s ratio",
                         evidence=["outputs/20_batch_flash_attn/figures/pp.png"])
    nt = verdicts.not_testable("G2", "this llama.cpp build has no GPU offload")
    verdicts.write_verdicts(d, [v, nt])
    nb = new_notebook()
    code = new_code_cell("SECRET_SOURCE_LINE = 1\nprint('visible output')")
    code.outputs = [new_output("stream", name="stdout", text="visible output\n")]
    nb.cells = [new_markdown_cell("# 20 batch"), code]
    nbformat.write(nb, str(d / "20_batch_flash_attn.ipynb"))


def test_collect_verdicts_marks_missing_claims_not_run(tmp_path):
    out = tmp_path / "out"
    _study(out)
    vs = report.collect_verdicts(out)
    by = {v["claim"]: v for v in vs}
    assert set(by) == set(verdicts.CLAIM_IDS)
    assert by["G3"]["verdict"] == "supported" and by["G3"]["study"] == "20_batch_flash_attn"
    assert by["G3"]["ci_low"] > 1
    assert by["G2"]["verdict"] == "not testable here"
    assert by["X3"]["verdict"] == report.NOT_RUN and by["C1"]["verdict"] == report.NOT_RUN


def test_empty_out_root_renders_everything_not_run(tmp_path):
    index = report.render_report(tmp_path / "nothing")
    text = index.read_text()
    for claim in verdicts.CLAIM_IDS:
        assert f"<td>{claim}</td>" in text
    assert text.count(">not run<") >= len(verdicts.CLAIM_IDS)
    table = report.findings_table(tmp_path / "nothing")
    assert (table["verdict"] == "not run").all() and len(table) == len(verdicts.CLAIM_IDS)


def test_checklist_ticks_items_with_measured_verdicts(tmp_path):
    out = tmp_path / "out"
    _study(out)
    items = report.checklist(out)
    assert len(items) == 8
    by = {c["item"]: c for c in items}
    assert by["Tune n_batch for your GPU"]["ticked"] and "G3 supported" in by["Tune n_batch for your GPU"]["evidence"]
    assert not by["Test different quantizations"]["ticked"]
    assert by["Test different quantizations"]["state"] == report.NOT_RUN


def test_render_report_pages_links_and_hidden_inputs(tmp_path):
    out = tmp_path / "out"
    _study(out)
    status = {"20_batch_flash_attn": {"status": "ok", "duration_s": 12.0},
              "30_context_kv": {"status": "failed", "cell_index": 5, "exec_count": 4, "ename": "RuntimeError",
                                "evalue": "boom"}}
    index = report.render_report(out, status=status)
    text = index.read_text()
    assert "href='20_batch_flash_attn.html'" in text
    assert "30_context_kv" in text and "cell 5" in text and "RuntimeError: boom" in text
    # the evidence written as outputs/... resolves against this out root
    assert "href='../20_batch_flash_attn/figures/pp.png'" in text
    page = (out / "report" / "20_batch_flash_attn.html").read_text()
    assert "visible output" in page and "SECRET_SOURCE_LINE" not in page
    md = report.write_findings(out)["md"].read_text()
    assert "| G3 | supported |" in md and "| X1 | not run |" in md
    data = json.loads((out / "90_findings" / "findings.json").read_text())
    assert len(data["checklist"]) == 8


def test_report_reads_the_status_file_kit_run_writes(tmp_path):
    out = tmp_path / "out"
    _study(out)
    assert report.read_status(out) == {}
    status = {"20_batch_flash_attn": {"status": "failed", "cell_index": 3, "exec_count": 2, "ename": "ValueError",
                                      "evalue": "bad"}}
    report.status_path(out).write_text(json.dumps({"schema": 1, "notebooks": status}))
    assert report.read_status(out) == status
    text = report.render_report(out).read_text()  # no status passed: the file is read
    assert "cell 3 (execution count 2): ValueError: bad" in text
    report.status_path(out).write_text("{torn")
    assert report.read_status(out) == {}
