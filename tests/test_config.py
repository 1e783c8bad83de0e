"""Settings: every bad input gets one clear error; .env files round-trip in the guide's LLAMACPP_* names."""
import pytest

from kit.config import Settings, SettingsError, chat_format_names, read_dotenv


@pytest.mark.parametrize("kwargs, message", [
    ({"n_batchh": 512}, "did you mean 'n_batch'"),
    ({"n_ctx_train": 131072}, "property of the model"),
    ({"n_ctx": "4096"}, "expected int"),
    ({"flash_attn": 1}, "expected bool"),
    ({"n_batch": 0}, "must be positive"),
    ({"n_ubatch": -4}, "must be positive"),
    ({"n_threads": 0}, "must be positive"),
    ({"n_batch": 256, "n_ubatch": 512}, "n_ubatch=512 > n_batch=256"),
    ({"type_v": "q8_0"}, "needs flash_attn=True"),
    ({"type_k": "q3_k"}, "is not one of"),
    ({"type_k": 99}, "expected str"),
    ({"numa": "sometimes"}, "is not one of"),
    ({"top_p": 1.5}, "top_p"),
    ({"temperature": -0.1}, "temperature"),
    ({"rope_freq_base": 0.0}, "rope_freq_base"),
    ({"chat_format": "chat-ml"}, "is not a chat format llama-cpp-python registers; did you mean 'chatml'"),
    ({"chat_format": 1}, "expected str"),
])
def test_bad_settings_get_one_clear_error(kwargs, message):
    with pytest.raises(SettingsError, match=message):
        Settings.from_dict(kwargs)


def test_quantized_v_with_flash_attention_is_fine():
    s = Settings(type_k="q8_0", type_v="q4_0", flash_attn=True)
    assert s.llama_kwargs("m.gguf")["type_v"] == 2 and s.llama_kwargs("m.gguf")["type_k"] == 8


def test_llama_kwargs_are_names_llama_reads():
    import inspect

    from llama_cpp import Llama

    accepted = set(inspect.signature(Llama.__init__).parameters)
    kw = Settings(rope_freq_base=10000.0).llama_kwargs("m.gguf")
    assert set(kw) <= accepted, set(kw) - accepted


def test_context_must_hold_prompt_and_generation():
    s = Settings(n_ctx=512)
    s.check_fits(512)
    with pytest.raises(SettingsError, match="n_ctx=512 is smaller"):
        s.check_fits(513)
    Settings(n_ctx=0).check_fits(8000, n_ctx_train=8192)  # 0 = the model's own context


def test_effective_values_record_llama_cpp_clamps():
    eff = Settings(n_ctx=256, n_batch=1024, n_ubatch=512).effective()
    assert (eff["n_batch"], eff["n_ubatch"]) == (256, 256)
    assert eff["clamped"] == ["n_batch", "n_ubatch"]


def test_dotenv_round_trip(tmp_path):
    s = Settings(n_ctx=4096, n_batch=1024, n_ubatch=512, flash_attn=True, type_k="q8_0", type_v="q8_0",
                 n_threads=2, temperature=0.1, top_p=0.9, max_tokens=512, rag_search_k=5, rope_freq_base=None,
                 chat_format="chatml")
    path = s.to_dotenv(tmp_path / "tuned.env", header="measured: 123 t/s\nfrom trials abc")
    text = path.read_text()
    assert text.startswith("# measured: 123 t/s")
    assert "LLAMACPP_N_BATCH=1024" in text and "LLAMACPP_FLASH_ATTN=true" in text
    assert "LLAMACPP_CHAT_FORMAT=chatml" in text
    assert Settings.from_dotenv(path) == s
    # unset (the GGUF's own template) round-trips as an empty value
    unset = Settings().to_dotenv(tmp_path / "default.env")
    assert "LLAMACPP_CHAT_FORMAT=  #" in unset.read_text() and Settings.from_dotenv(unset).chat_format is None


def test_chat_format_is_a_registered_name_passed_to_llama():
    from llama_cpp import llama_chat_format

    assert Settings().chat_format is None and "chat_format" not in Settings().llama_kwargs("m.gguf")
    s = Settings.from_env({"LLAMACPP_CHAT_FORMAT": "llama-3"})
    assert s.llama_kwargs("m.gguf")["chat_format"] == "llama-3"
    assert set(chat_format_names()) >= {"chatml", "llama-2", "llama-3", "gemma", "mistral-instruct"}
    for name in chat_format_names():  # every accepted name is one llama-cpp-python can build a handler for
        llama_chat_format.get_chat_completion_handler(name)
    with pytest.raises(SettingsError, match="LLAMACPP_CHAT_FORMAT"):
        Settings.from_env({"LLAMACPP_CHAT_FORMAT": "llama2"})


def test_reads_the_guides_profile_syntax(tmp_path):
    p = tmp_path / ".env.speed"
    p.write_text("# speed\nLLAMACPP_N_CTX=2048\nLLAMACPP_N_BATCH=1024\nLLAMACPP_N_GPU_LAYERS=40  # try 40+\n"
                 "LLAMACPP_TEMPERATURE=0.1\nLLAMACPP_RAG_SEARCH_K=3\nLLAMACPP_MAX_CONTEXT_LENGTH=2000\n"
                 "LLAMACPP_LOG_LEVEL=INFO\n")
    s = Settings.from_dotenv(p, base=Settings(n_ubatch=512))
    assert (s.n_ctx, s.n_batch, s.n_gpu_layers, s.temperature, s.rag_search_k) == (2048, 1024, 40, 0.1, 3)


@pytest.mark.parametrize("line, message", [
    ("LLAMACPP_N_BATHC=512", "unknown variable LLAMACPP_N_BATHC; did you mean LLAMACPP_N_BATCH"),
    ("LLAMACPP_N_CTX_TRAIN=131072", "property of the model"),
    ("LLAMACPP_N_CTX=big", "expected int"),
    ("LLAMACPP_FLASH_ATTN=maybe", "expected bool"),
    ("just words", "expected KEY=VALUE"),
])
def test_bad_env_files(tmp_path, line, message):
    p = tmp_path / "bad.env"
    p.write_text(line + "\n")
    with pytest.raises(SettingsError, match=message):
        Settings.from_dotenv(p)


def test_environment_variables_are_read_and_others_ignored():
    s = Settings.from_env({"LLAMACPP_N_CTX": "1024", "PATH": "/bin", "OTHER_N_CTX": "1"})
    assert s.n_ctx == 1024
    assert read_dotenv  # the parser is public for studies that load the guide's files


def test_every_field_has_help_and_a_llamacpp_name():
    helps, envs = Settings.help(), Settings.env_names()
    assert all(helps.values())
    assert len(set(envs.values())) == len(envs)
    assert all(v.startswith("LLAMACPP_") for v in envs.values())
