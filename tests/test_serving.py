"""App settings from the environment, the default-adapter and fallback rules, input capping."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from supportlm.errors import SupportLMError
from supportlm.modeling import EMBEDDED_PACKAGE, EMBEDDED_UPSTREAM_ID
from supportlm.prompts import DEFAULT_SYSTEM_PROMPT, save_prompt_style
from supportlm.serving import (
    AppSettings,
    cap_text,
    default_system_prompt,
    flatten_metrics,
    plain_messages,
)


@pytest.fixture(scope="module")
def tiny_adapter_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: str) -> str:
    """A LoRA adapter on the tiny model, saved with its prompt style like finetune/train.py does."""
    folder = tmp_path_factory.mktemp("tiny-adapter")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(folder)
    save_prompt_style(folder, AutoTokenizer.from_pretrained(tiny_model_dir), "Be brief.")
    return str(folder)


def test_from_env_reads_every_variable(tmp_path: Path, tiny_model_dir: str) -> None:
    settings = AppSettings.from_env(
        {
            "SUPPORTLM_MODEL": tiny_model_dir,
            "SUPPORTLM_BACKEND": "transformers",
            "SUPPORTLM_FEEDBACK_DB": str(tmp_path / "fb.sqlite3"),
            "SUPPORTLM_MAX_INPUT_CHARS": "500",
            "SUPPORTLM_MAX_INPUT_TOKENS": "128",
            "SUPPORTLM_CONCURRENCY": "2",
            "SUPPORTLM_MAX_QUEUE": "8",
            "SUPPORTLM_CONTEXT_LENGTH": "512",
        }
    )
    assert settings.model == tiny_model_dir
    assert settings.adapter is None
    assert settings.backend == "transformers"
    assert settings.feedback_db == tmp_path / "fb.sqlite3"
    assert (settings.max_input_chars, settings.max_input_tokens) == (500, 128)
    assert (settings.concurrency, settings.max_queue, settings.context_length) == (2, 8, 512)


def test_from_env_defaults(tiny_model_dir: str) -> None:
    settings = AppSettings.from_env({"SUPPORTLM_MODEL": tiny_model_dir})
    assert (settings.max_input_chars, settings.max_input_tokens) == (4000, 1024)
    assert (settings.concurrency, settings.max_queue, settings.context_length) == (4, 32, 2048)


def test_auto_backend_is_transformers_for_a_model_folder(tiny_model_dir: str) -> None:
    settings = AppSettings.from_env({"SUPPORTLM_MODEL": tiny_model_dir})
    assert settings.backend == "transformers"
    assert any("not a GGUF" in note for note in settings.notes)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("SUPPORTLM_BACKEND", "vllm", "not one of"),
        ("SUPPORTLM_CONCURRENCY", "four", "whole number"),
        ("SUPPORTLM_MAX_QUEUE", "0", "at least 1"),
        ("SUPPORTLM_MAX_INPUT_TOKENS", "4096", "smaller than context_length"),
    ],
)
def test_from_env_rejects_bad_values(tiny_model_dir: str, name: str, value: str, message: str):
    with pytest.raises(SupportLMError, match=message):
        AppSettings.from_env({"SUPPORTLM_MODEL": tiny_model_dir, name: value})


def test_only_an_adapter_serves_its_recorded_base(tiny_adapter_dir: str, tiny_model_dir: str):
    settings = AppSettings.from_env({"SUPPORTLM_ADAPTER": tiny_adapter_dir})
    assert settings.adapter == tiny_adapter_dir
    assert Path(settings.model).resolve() == Path(tiny_model_dir).resolve()
    assert any("recorded in the adapter" in note for note in settings.notes)


def test_nothing_set_serves_the_latest_trained_adapter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_adapter_dir: str
) -> None:
    # finetune/train.py writes outputs/<run>/ and names it in outputs/latest (relative to cwd).
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "outputs" / "my-run"
    run.parent.mkdir()
    run.symlink_to(tiny_adapter_dir, target_is_directory=True)
    (tmp_path / "outputs" / "latest").write_text("my-run\n")
    settings = AppSettings.from_env({})
    assert Path(settings.adapter).resolve() == Path(tiny_adapter_dir).resolve()
    assert "finetune/train.py" in settings.notes[0]


def test_nothing_set_and_no_training_serves_the_embedded_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = AppSettings.from_env({})
    assert settings.adapter is None
    assert settings.model == "embedded"


def test_embedded_without_its_package_falls_back_to_the_hub_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A None entry in sys.modules is Python's documented way to make a module unimportable.
    monkeypatch.setitem(sys.modules, EMBEDDED_PACKAGE, None)
    settings = AppSettings.from_env({"SUPPORTLM_MODEL": "embedded"})
    assert settings.model == EMBEDDED_UPSTREAM_ID
    assert settings.backend == "transformers"
    assert any(EMBEDDED_UPSTREAM_ID in note for note in settings.notes)


def test_system_prompt_comes_from_the_adapter(tiny_adapter_dir: str) -> None:
    assert default_system_prompt(tiny_adapter_dir) == "Be brief."
    assert default_system_prompt(None) == DEFAULT_SYSTEM_PROMPT


def test_cap_text_cuts_characters_then_tokens(smollm2_tokenizer) -> None:
    text, notice = cap_text("hello " * 100, smollm2_tokenizer, max_chars=60, max_tokens=1000)
    assert len(text) == 60
    assert "60 characters" in notice
    text, notice = cap_text("hello " * 100, smollm2_tokenizer, max_chars=4000, max_tokens=10)
    assert len(smollm2_tokenizer(text, add_special_tokens=False)["input_ids"]) == 10
    assert "10 tokens" in notice
    assert cap_text("short", smollm2_tokenizer, 100, 100) == ("short", None)


def test_plain_messages_reads_gradio_history_shapes() -> None:
    history = [
        {"role": "user", "content": [{"type": "text", "text": "Where is my parcel?"}]},
        {"role": "assistant", "content": "On its way.", "metadata": None},
        {"role": "assistant", "content": "thinking…", "metadata": {"title": "Reasoning"}},
        {"role": "user", "content": [{"type": "file", "file": {"path": "a.png"}}]},
    ]
    assert plain_messages(history) == [
        {"role": "user", "content": "Where is my parcel?"},
        {"role": "assistant", "content": "On its way."},
        {"role": "user", "content": ""},
    ]


def test_flatten_metrics() -> None:
    metrics = json.loads('{"eval": {"rougeL": 0.412345, "n": 50}, "model": "embedded"}')
    assert flatten_metrics(metrics) == [
        ("eval.rougeL", "0.4123"),
        ("eval.n", "50"),
        ("model", "embedded"),
    ]
