"""kit.report: the first screen says what to change (decided effects beyond the band only), every label reads as
kit.verdicts gives it, the checklist ticks only tested items, rendered notebooks carry no stderr or progress bars,
and missing studies say "not run"."""
import json
from pathlib import Path

import matplotlib
import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from kit import report, verdicts

matplotlib.use("Agg")

FAST = [110, 112, 111, 113, 109]
BASE = [100, 101, 99, 100, 102]


def _figure(path: Path) -> None:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots()
    ax.plot([1, 2], [1, 2])
    fig.savefig(path)
    plt.close(fig)


def _study(out: Path) -> None:
    """One study folder: G3 supported (x1.1, beyond its +-5 % band), G2 not testable, a notebook."""
    d = out / "20_batch_flash_attn"
    _figure(d / "figures" / "pp.png")
    v = verdicts.compare("G3", FAST, BASE, metric="pp t/s ratio",
                         evidence=["outputs/20_batch_flash_attn/figures/pp.png"])
    nt = verdicts.not_testable("G2", "this llama.cpp build has no GPU offload")
    verdicts.write_verdicts(d, [v, nt])
    nb = new_notebook()
    code = new_code_cell("SECRET_SOURCE_LINE = 1\nprint('visible output')")
    code.outputs = [new_output("stream", name="stdout", text="visible output\n")]
    nb.cells = [new_markdown_cell("# 20 batch"), code]
    nbformat.write(nb, str(d / "20_batch_flash_attn.ipynb"))


def _every_label(out: Path) -> dict[str, verdicts.Verdict]:
    """Verdicts of all six labels, made through kit.verdicts as the studies make them."""
    g3 = verdicts.compare("G3", FAST, BASE, metric="pp512 t/s ratio, n_batch/n_ubatch 1024/512 over 512/512",
                          evidence=["outputs/20_batch_flash_attn/figures/pp.png"])
    g3.details = {"rss_peak_mb": 412.5}
    g2 = verdicts.combine("G2", {
        "tg at depth 0": verdicts.compare("G2", FAST, BASE, metric="tg t/s ratio, flash_attn on / off, depth 0"),
        "tg at depth 1024": verdicts.compare("G2", [92, 93, 91, 92, 94], BASE,
                                             metric="tg t/s ratio, flash_attn on / off, depth 1024"),
    }, depends_on="context depth")
    r1 = verdicts.compare("R1", [80, 120, 95, 130, 70], [100, 90, 125, 85, 110], higher_is_better=False,
                          metric="RAG search latency ms, k=5 / k=8")
    r3 = verdicts.compare("R3", [120, 121, 119, 122, 118], BASE, higher_is_better=False,
                          metric="corpus embedding time per batch ms, warm cache / cold cache")
    m1 = verdicts.compare("M1", [100.5, 101, 99.5, 100, 101.5], BASE, metric="tg t/s, n_ctx 4096 / 8192")
    g1 = verdicts.not_testable("G1", "this llama.cpp build has no GPU offload")
    c2 = verdicts.not_testable("C2", "one NUMA node: nothing to bind")
    _figure(out / "20_batch_flash_attn" / "figures" / "pp.png")
    verdicts.write_verdicts(out / "20_batch_flash_attn", [g2, g3])
    verdicts.write_verdicts(out / "10_gpu_layers", [g1])
    verdicts.write_verdicts(out / "60_rag", [r1, r3])
    verdicts.write_verdicts(out / "30_context_kv", [m1])
    verdicts.write_verdicts(out / "40_threads_system", [c2])
    prof = out / "profiles"
    prof.mkdir(parents=True)
    (prof / "balanced.env").write_text("# kit profile 'balanced' - chosen from measurements on this machine\n"
                                       "# candidates within noise of the winner: n_batch 512/512\n"
                                       "LLAMACPP_N_BATCH=1024\nLLAMACPP_N_UBATCH=512\n")
    return {"G3": g3, "G2": g2, "R1": r1, "R3": r3, "M1": m1, "G1": g1, "C2": c2}


def _section(text: str, start: str, end: str) -> str:
    return text[text.index(start):text.index(end, text.index(start))]


def test_the_synthetic_verdicts_carry_every_label(tmp_path):
    v = _every_label(tmp_path / "out")
    assert {x.verdict for x in v.values()} == set(verdicts.VERDICTS)
    assert v["R1"].verdict == verdicts.INCONCLUSIVE and v["R1"].samples_to_decide
    assert v["G2"].verdict == verdicts.MIXED and len(v["G2"].conditions) == 2
    assert v["G3"].verdict == verdicts.SUPPORTED and v["G3"].ci_low > 1.05   # beyond the +-5 % band
    assert v["R3"].verdict == verdicts.REFUTED and v["M1"].verdict == verdicts.NO_EFFECT


def test_first_screen_says_what_to_change_and_never_advises_on_undecided(tmp_path):
    out = tmp_path / "out"
    v = _every_label(out)
    text = report.render_report(out).read_text()
    first = _section(text, "id='on-this-machine'", "<h2>Claims</h2>")
    assert text.index("id='on-this-machine'") < text.index("<h2>Claims</h2>") < text.index("guide's checklist")
    recs = {r["claim"]: r for r in report.recommendations(report.collect_verdicts(out))}
    assert set(recs) == {"G3", "R3"}                       # decided and beyond the band; nothing else is advice
    assert recs["G3"]["action"] == "change" and recs["R3"]["action"] == "do not change, the guide is wrong here"
    assert recs["G3"]["cost"]["memory"] == "rss peak mb 412.5" and recs["G3"]["cost"]["recall"] == "not measured"
    assert report.cost_text(recs["G3"]["cost"]) == "memory: rss peak mb 412.5; quality, recall: not measured"
    assert report.cost_text(recs["R3"]["cost"]) == "not measured"
    table = _section(first, "<table>", "</table>")
    assert "LLAMACPP_N_BATCH=1024 LLAMACPP_N_UBATCH=512" in table and ">change<" in table
    assert table.index("G3") < table.index("R3")           # a gain ranks above a setting to leave alone
    assert "+11 % [+8 %, +13 %] better (measured x1.11 [1.08, 1.13])" in table
    assert "LLAMACPP_N_BATCH=1024 (balanced)" in table     # what the kit's profile sets
    assert "R1" not in table and "G2" not in table and "M1" not in table
    undecided = first[first.index("Undecided"):]
    assert f"about {v['R1'].samples_to_decide} samples per side would decide it" in undecided
    assert "G2" in undecided and "depends on context depth: tg at depth 0: supported x1.11; tg at depth 1024: refuted" in undecided
    assert "Not worth changing here" in first and "M1" in first[first.index("Not worth changing"):]
    assert "balanced.env" in first and "within noise of the winner" in first
    assert "no measurable effect" not in text


def test_each_claim_is_one_line_with_label_and_details_one_click_away(tmp_path):
    out = tmp_path / "out"
    _every_label(out)
    text = report.render_report(out).read_text()
    claims = _section(text, "<h2>Claims</h2>", "guide's checklist")
    assert claims.count("<details class='claim") == len(verdicts.CLAIM_IDS)
    for label in ("supported", "refuted", "no meaningful effect", "mixed", "not testable here"):
        assert f"class='lbl {label.replace(' ', '-')}'" in claims
    g2 = claims[claims.index("<b>G2</b>"):]
    g2 = g2[:g2.index("</details>")]
    assert "tg at depth 0" in g2 and "tg at depth 1024" in g2 and "Depends on context depth" in g2
    assert "x0.92 to x1.11 over 2 conditions" in g2   # no single condition speaks for a mixed claim
    g3 = claims[claims.index("<b>G3</b>"):]
    g3 = g3[:g3.index("</details>")]
    assert "<img loading='lazy' src='../20_batch_flash_attn/figures/pp.png'" in g3 and "band +-5%" in g3


def test_checklist_ticks_only_items_whose_claims_were_tested(tmp_path):
    out = tmp_path / "out"
    _every_label(out)
    by = {c["item"]: c for c in report.checklist(out)}
    assert by["Tune n_batch for your GPU"]["ticked"] and by["Tune n_batch for your GPU"]["state"] == "tested"
    gpu = by["Raise n_gpu_layers to the maximum"]
    assert not gpu["ticked"] and "not testable here: G1 (this llama.cpp build has no GPU offload)" in gpu["state"]
    rag = by["Lower rag_search_k where possible"]
    assert not rag["ticked"] and "undecided: R1 (inconclusive: about" in rag["state"] and "not run: R2" in rag["state"]
    system = by["Optimize the system settings"]
    assert not system["ticked"] and "not testable here: C2" in system["state"]
    assert by["Set the optimal n_ctx"]["ticked"]   # M1: no meaningful effect is a tested label
    page = report.checklist_html(report.checklist(out))
    assert page.count("&#9745;") == sum(c["ticked"] for c in by.values()) == 2


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
        assert f"<b>{claim}</b>" in text
    assert text.count(">not run<") >= len(verdicts.CLAIM_IDS)
    assert "nothing to change on this evidence" in text
    table = report.findings_table(tmp_path / "nothing")
    assert (table["verdict"] == "not run").all() and len(table) == len(verdicts.CLAIM_IDS)


def test_better_scale_inverts_time_ratios_and_leaves_out_non_ratios():
    speed = {"metric": "tg t/s ratio", "effect": 1.2, "ci_low": 1.1, "ci_high": 1.3}
    time_ = {"metric": "RAG search latency ms, k=5 / k=8", "effect": 0.8, "ci_low": 0.5, "ci_high": 1.0}
    assert report.better_ratio(speed) == (1.2, 1.1, 1.3)
    assert report.better_ratio(time_) == (1.25, 1.0, 2.0)
    assert report.better_ratio({**time_, "metric": "time between completed RAG requests (1/throughput)"})[0] == 1.25
    assert report.better_ratio({"metric": "Spearman rho, guide order vs measured", "effect": 0.6}) is None
    assert report.better_ratio({"metric": "share of the guide's types on the Pareto front", "effect": 0.5}) is None
    assert report.better_ratio({**speed, "details": {"higher_is_better": False}})[0] == 1 / 1.2


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
    assert "1. change: LLAMACPP_N_BATCH=1024" in md
    data = json.loads((out / "90_findings" / "findings.json").read_text())
    assert len(data["checklist"]) == 8 and data["recommendations"][0]["claim"] == "G3"


def test_rendered_notebooks_carry_no_stderr_warnings_or_progress_bars(tmp_path):
    out = tmp_path / "out"
    _study(out)
    nb_path = out / "20_batch_flash_attn" / "20_batch_flash_attn.ipynb"
    nb = nbformat.read(str(nb_path), as_version=4)
    cell = new_code_cell("run()")
    cell.outputs = [
        new_output("stream", name="stderr", text="/x/tqdm/auto.py:21: TqdmWarning: IProgress not found. Please "
                                                 "update jupyter and ipywidgets.\n"),
        new_output("stream", name="stderr", text="20_batch:  40%|####      | 2/5 [00:03<00:04,  1.5s/trial]\r"),
        new_output("display_data", data={"application/vnd.jupyter.widget-view+json": {"model_id": "abc",
                                                                                      "version_major": 2},
                                         "text/plain": "20_batch: 100%|##########| 5/5 [00:07<00:00]"}),
        new_output("stream", name="stdout", text="the table the reader needs\n"),
    ]
    nb.cells.append(cell)
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    nbformat.write(nb, str(nb_path))
    report.render_report(out)
    page = (out / "report" / "20_batch_flash_attn.html").read_text()
    assert "the table the reader needs" in page and "visible output" in page
    for noise in ("TqdmWarning", "IProgress", "trial]", "5/5", "widget-state", "output_stderr"):
        assert noise not in page, noise


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


def test_effects_figure_puts_every_ratio_on_a_better_scale(tmp_path):
    from kit.studies import findings

    out = tmp_path / "out"
    _every_label(out)
    rho = verdicts.from_interval("Q1", 0.6, 0.2, 0.9, no_change=0.0, equivalence=0.0,
                                 metric="Spearman rho, guide order vs measured median tg t/s")
    verdicts.write_verdicts(out / "50_quantization", [rho])
    f = findings.run_findings(findings.FindingsStudy(out_root=str(out), out_dir=str(out / "90_findings")))
    ratios, others = findings.effect_points(f.verdicts)
    by = {p["name"]: p for p in ratios}
    assert set(by) == {"G2: tg at depth 0", "G2: tg at depth 1024", "G3", "R1", "R3", "M1"}
    assert by["R3"]["point"] < 1 and by["R3"]["verdict"] == "refuted"      # slower embedding: left of 1
    r1 = next(v for v in f.verdicts if v["claim"] == "R1")
    assert by["R1"]["lo"] == 1 / r1["ci_high"] and by["R1"]["hi"] == 1 / r1["ci_low"]   # a latency, inverted
    assert [p["name"] for p in others] == ["Q1"]                            # rho is no ratio: its own panel
    fig = findings.plot_effects(f)
    assert len(fig.axes) == 2 and "better" in fig.axes[0].get_xlabel()


def test_costs_come_from_the_verdicts_details_or_say_not_measured():
    recall = {"k_small": 3, "k_large": 8, "recall_small": 0.8, "recall_large": 0.92, "difference": -0.12,
              "ci_low": -0.2, "ci_high": -0.05, "n_questions": 20}
    got = report.costs({"details": {"recall": recall, "kv_mib_saved": 12.0, "notes": "x", "quality_costs": [1]}})
    assert got == {"memory": "kv mib saved 12", "quality": "not measured",
                   "recall": "recall@3 0.8, recall@8 0.92: difference -0.12 [-0.2, -0.05]"}
    explicit = report.costs({"details": {"cost": {"quality": "perplexity x1.02 [1.01, 1.03]"}, "rss_peak_mb": 300}})
    assert explicit["quality"] == "perplexity x1.02 [1.01, 1.03]" and explicit["memory"] == "rss peak mb 300"
    assert report.cost_text(report.costs({})) == "not measured"


def test_served_numbers_sit_next_to_in_process_in_the_report(tmp_path):
    """Notebook 86's tables (written by kit.studies.server.summarize) become one report section; absent, none."""
    _every_label(tmp_path)
    assert "Served over HTTP" not in report.render_report(tmp_path).read_text()
    d = tmp_path / "86_server"
    d.mkdir()
    (d / "served_vs_in_process.csv").write_text(
        "profile,served_ttft_ms,in_process_ttft_ms,served_decode_ts,in_process_decode_ts,ttft_ratio,ttft_ratio_ci,"
        "decode_ts_ratio,decode_ts_ratio_ci,served_n,in_process_n\n"
        "guide_speed,412.5,380.1,61.2,66.0,1.086,1.02-1.15,0.927,0.90-0.95,5,5\n")
    (d / "served_levels.csv").write_text(
        "profile,part,load,interrupt_requests,truncation_rate\n"
        "guide_speed,concurrency,closed c=2,True,0.5\nguide_speed,concurrency,closed c=2,False,0.0\n")
    (d / "served_summary.json").write_text(json.dumps({"knee": {"knee_rps": 0.4, "saturated_from_rps": 0.7}}))
    page = report.render_report(tmp_path).read_text()
    sec = page[page.index("Served over HTTP"):]
    assert "guide_speed" in sec and "380" in sec and "412" in sec and "1.09 (1.02-1.15)" in sec
    assert "up to 0.4 requests/s" in sec and "saturated at 0.7" in sec
    assert "closed c=2 with interrupt_requests on: 50% of answers truncated" in sec
    assert "closed c=2 with interrupt_requests off: 0% of answers truncated" in sec
