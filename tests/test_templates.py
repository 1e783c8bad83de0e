"""Chat templates on the real model: copies of the bundled GGUF without a template, with one that llama-cpp-python's
sandbox refuses, and with no turn marker in its vocabulary (written with the gguf package). Each either measures
with a chosen format, or ends in rows and verdicts that name the cause; none ends in a traceback."""
from __future__ import annotations

import subprocess
import sys

import pytest

from kit.config import ChatFormatError, Settings
from kit.data import load_prompts
from kit.measure import ChatTemplateError, load_model, stream_chat
from kit.models import chat_format_for, model_card, write_model_copy
from kit.paths import REPO_ROOT
from kit.report import read_status
from kit.results import failure_cause, failures, load_results, trial_status
from kit.studies import generation as gen, serving_queue as sq
from kit.verdicts import NOT_TESTABLE, verdicts_by_claim

# jinja2's ImmutableSandboxedEnvironment refuses to call a list's append: SecurityError at the first render
HOSTILE_TEMPLATE = "{{ messages.append(messages[0]) }}{% for m in messages %}{{ m['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def copies(tmp_path_factory, model_path):
    d = tmp_path_factory.mktemp("models")
    tokens = list(model_card(model_path).chat_markers)
    assert tokens == ["<|im_start|>"]
    no_marker = [t.replace("<|im_start|>", "<|turn_start|>") for t in _vocabulary(model_path)]
    return {
        "no template": write_model_copy(model_path, d / "no-template.gguf"),
        "hostile": write_model_copy(model_path, d / "hostile.gguf", chat_template=HOSTILE_TEMPLATE),
        "no marker": write_model_copy(model_path, d / "no-marker.gguf",
                                      metadata={"tokenizer.ggml.tokens": no_marker}),
    }


def _vocabulary(path) -> list[str]:
    import gguf  # the test's own reader of the token list (the kit's header reader skips arrays)

    return gguf.GGUFReader(path).get_field("tokenizer.ggml.tokens").contents()


def test_the_card_says_whether_the_gguf_has_a_template(copies, model_path):
    assert model_card(model_path).has_chat_template
    bare = model_card(copies["no template"])
    assert not bare.has_chat_template and bare.chat_markers == ("<|im_start|>",)
    assert bare.to_dict()["has_chat_template"] is False
    assert model_card(copies["hostile"]).has_chat_template
    assert model_card(copies["no marker"]).chat_markers == ()


def test_the_format_comes_from_the_setting_the_gguf_or_the_vocabulary(copies, model_path):
    assert chat_format_for(model_path).source == "gguf" and chat_format_for(model_path).name is None
    chosen = chat_format_for(copies["no template"])
    assert chosen.name == "chatml" and chosen.source.startswith("chosen: the vocabulary has <|im_start|>")
    assert chat_format_for(copies["no template"], "llama-3").source == "setting"
    with pytest.raises(ChatFormatError, match="LLAMACPP_CHAT_FORMAT") as exc:
        chat_format_for(copies["no marker"])
    assert "no-marker.gguf has no chat template" in str(exc.value) and "chatml" in str(exc.value)


def test_a_template_less_model_streams_with_the_chosen_format(copies):
    lm = load_model(Settings(model=str(copies["no template"]), n_ctx=256, temperature=0.0))
    try:
        assert lm.effective["chat_format_effective"] == "chatml"
        assert lm.effective["chat_format_source"].startswith("chosen:")
        out = stream_chat(lm, load_prompts(n=1)[0]["prompt"], max_tokens=8)
        assert out["n_chunks"] > 0 and out["text"].strip()
    finally:
        lm.close()


def test_a_model_with_no_format_stops_every_chat_study_before_measuring(copies, tmp_path):
    for cls in (gen.GenerationStudy, sq.ServingStudy):
        with pytest.raises(ChatFormatError, match="LLAMACPP_CHAT_FORMAT"):
            cls(model=str(copies["no marker"]), out_dir=str(tmp_path / cls.__name__))
        cls(model=str(copies["no marker"]), chat_format="chatml", out_dir=str(tmp_path / cls.__name__))
    r = subprocess.run([sys.executable, "-m", "kit", "run", "--only", "70,75", "--model", str(copies["no marker"]),
                        "--out", str(tmp_path / "run"), "--no-probe"], cwd=REPO_ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "LLAMACPP_CHAT_FORMAT" in r.stdout and "Traceback" not in r.stdout + r.stderr
    assert not (tmp_path / "run" / "70_generation").exists()  # nothing was measured


def test_a_hostile_template_is_an_error_row_and_not_testable_here(copies, tmp_path):
    lm = load_model(Settings(model=str(copies["hostile"]), n_ctx=256))
    try:
        with pytest.raises(ChatTemplateError, match="SecurityError"):
            stream_chat(lm, "hello", max_tokens=4)
    finally:
        lm.close()
    st = gen.GenerationStudy(model=str(copies["hostile"]), n_ctx=256, n_prompts=1, sweep_max_tokens=8,
                             temperatures=[], repeat_penalties=[], caps=[8], s2_cap=8, n_cap_prompts=1,
                             n_unlimited_prompts=1, repetitions=1, cap_repetitions=1,
                             out_dir=str(tmp_path / "70_generation"))
    df = gen.run_generation_study(st, progress=False)
    assert (df["status"] == "error").all()
    table = trial_status(df)
    assert set(table["label"]) == {"guide", "default", "max_tokens=8", "max_tokens=unlimited"}
    assert table["error"].str.contains("ChatTemplateError: the chat template could not be rendered").all()
    assert (table["chat_format_source"] == "gguf").all()
    for v in (gen.s1_verdict(df), gen.s2_verdict(df)):
        assert v.verdict == NOT_TESTABLE and "SecurityError" in v.reason and "every test failed" in v.reason
    gen.plot_sampling(df), gen.plot_caps(df)  # figures that say why they are empty, no exception
    assert gen.sampling_table(df).empty
    ss = sq.ServingStudy(model=str(copies["hostile"]), n_ctx=256, n_prompts=1, max_tokens=4, clients=[1],
                         rhos=[1.0], poisson_requests=2, calibration_requests=1, repetitions=1,
                         out_dir=str(tmp_path / "75_serving_queue"))
    df = sq.run_serving_study(ss, progress=False)
    assert len(failures(df)) == 2 and "SecurityError" in failure_cause(df)
    v = sq.p1_verdict(df)
    assert v.verdict == NOT_TESTABLE and "SecurityError" in v.reason
    sq.plot_queue(df)
    assert sq.load_table(df).empty and sq.requests_frame(df).empty


def test_killed_trials_give_not_testable_with_the_cause(tmp_path):
    """Every trial killed by its time limit: timeout rows, verdicts that say so."""
    st = gen.GenerationStudy(n_ctx=256, n_prompts=1, sweep_max_tokens=8, temperatures=[], repeat_penalties=[],
                             caps=[8], s2_cap=8, n_cap_prompts=1, n_unlimited_prompts=1, repetitions=1,
                             cap_repetitions=1, timeout_s=0.2, out_dir=str(tmp_path / "70_generation"))
    df = gen.run_generation_study(st, progress=False)
    assert (df["status"].isin(["timeout", "skipped"])).all() and (df["status"] == "timeout").any()
    v = gen.s1_verdict(df)
    assert v.verdict == NOT_TESTABLE and "timeout: no result within 0.2 s" in v.reason
    ss = sq.ServingStudy(n_ctx=256, n_prompts=1, max_tokens=4, clients=[1], rhos=[], repetitions=1, timeout_s=0.2,
                         out_dir=str(tmp_path / "75_serving_queue"))
    v = sq.p1_verdict(sq.run_serving_study(ss, progress=False))
    assert v.verdict == NOT_TESTABLE and "timeout" in v.reason


@pytest.mark.notebook
def test_kit_run_quick_on_a_template_less_copy_finishes_both_notebooks(copies, tmp_path):
    out = tmp_path / "quick"
    r = subprocess.run([sys.executable, "-m", "kit", "run", "--quick", "--only", "70,75", "--model",
                        str(copies["no template"]), "--out", str(out), "--no-probe"], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    status = read_status(out)
    for stem, claims in (("70_generation", {"S1", "S2"}), ("75_serving_queue", {"P1"})):
        assert status[stem]["status"] == "ok"
        df = load_results(out / stem)
        assert (df["status"] == "ok").all(), df[["label", "status", "error"]].to_string()
        assert (df["chat_format_effective"] == "chatml").all()
        assert df["chat_format_source"].str.startswith("chosen: the vocabulary has <|im_start|>").all()
        v = verdicts_by_claim(out / stem)
        assert set(v) == claims and all(x["verdict"] != NOT_TESTABLE for x in v.values()), v
