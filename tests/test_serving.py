"""App settings from the environment, the default-adapter and fallback rules, input capping."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import pytest

from supportlm.embedded import EMBEDDED_PACKAGE, EMBEDDED_UPSTREAM_ID
from supportlm.errors import SupportLMError
from supportlm.prompts import DEFAULT_SYSTEM_PROMPT
from supportlm.run_folder import RunFolder
from supportlm.serve.history import cap_text, plain_messages
from supportlm.serve.settings import AppSettings
from supportlm.serve.ui.about import flatten_metrics


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
    plan = settings.resolve()
    assert plan.model == tiny_model_dir
    assert plan.adapter is None
    assert plan.backend == "transformers"
    assert settings.feedback_db == tmp_path / "fb.sqlite3"
    assert (settings.max_input_chars, settings.max_input_tokens) == (500, 128)
    assert (settings.concurrency, settings.max_queue, settings.context_length) == (2, 8, 512)


def test_from_env_defaults(tiny_model_dir: str) -> None:
    settings = AppSettings.from_env({"SUPPORTLM_MODEL": tiny_model_dir})
    assert (settings.max_input_chars, settings.max_input_tokens) == (4000, 1024)
    assert (settings.concurrency, settings.max_queue, settings.context_length) == (4, 32, 2048)
    assert settings.rate_limit == 0


def test_every_setting_declares_its_variable_and_its_default_once(tiny_model_dir: str) -> None:
    # from_env reads exactly the declared fields: unset variables leave the declared default.
    assert AppSettings.from_env({}) == AppSettings()
    envs = [spec.metadata["env"] for spec in dataclasses.fields(AppSettings)]
    assert all(env.startswith("SUPPORTLM_") for env in envs) and len(set(envs)) == len(envs)
    assert all(spec.metadata["help"] for spec in dataclasses.fields(AppSettings))


def test_every_setting_is_in_exactly_one_group():
    from supportlm.serve.settings import GROUPS

    grouped = [spec.name for group in GROUPS for spec in dataclasses.fields(group)]
    assert sorted(grouped) == sorted(spec.name for spec in dataclasses.fields(AppSettings))


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("SUPPORTLM_CONCURRENCY", "0", "SUPPORTLM_CONCURRENCY must be at least 1, got 0"),
        ("SUPPORTLM_RATE_LIMIT", "-1", "SUPPORTLM_RATE_LIMIT must be at least 0"),
        (
            "SUPPORTLM_BACKEND",
            "vllm",
            "'vllm' is not one of auto, llama.cpp, ctranslate2, transformers, openai",
        ),
        ("SUPPORTLM_LLAMACPP_WEIGHTS", "q2", "'q2' is not one of auto, merged"),
        ("SUPPORTLM_ADAPTER_WATCH_S", "-5", "SUPPORTLM_ADAPTER_WATCH_S must be at least 0"),
    ],
)
def test_a_setting_outside_its_declared_bounds_names_its_variable(variable, value, message):
    with pytest.raises(SupportLMError, match=re.escape(message)):
        AppSettings.from_env({variable: value})


def test_the_settings_reference_is_generated_from_the_declarations(repo_root):
    from supportlm.reference import render, stale

    doc = repo_root / "docs" / "settings.md"
    assert stale([doc, repo_root / "README.md"]) == [], "run: python -m supportlm.reference"
    for spec in dataclasses.fields(AppSettings):
        assert f"`{spec.metadata['env']}`" in doc.read_text()
    # The check can fail: a changed declaration makes the committed block stale.
    edited = doc.read_text().replace("| 4 | ≥ 1 |", "| 5 | ≥ 1 |")
    assert edited != doc.read_text() and render(edited) == doc.read_text()


def test_a_directly_built_auto_backend_is_resolved_like_the_environment(tiny_model_dir) -> None:
    direct = AppSettings(model=tiny_model_dir, backend="auto").resolve()
    from_env = AppSettings.from_env({"SUPPORTLM_MODEL": tiny_model_dir}).resolve()
    assert direct.backend == from_env.backend == "transformers"
    assert direct.notes == from_env.notes


def test_auto_backend_is_transformers_for_a_model_folder(tiny_model_dir: str) -> None:
    plan = AppSettings.from_env({"SUPPORTLM_MODEL": tiny_model_dir}).resolve()
    assert plan.backend == "transformers"
    assert any("not a GGUF" in note for note in plan.notes)


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
        AppSettings.from_env({"SUPPORTLM_MODEL": tiny_model_dir, name: value}).resolve()


def test_only_an_adapter_serves_its_recorded_base(tiny_adapter_dir: str, tiny_model_dir: str):
    plan = AppSettings.from_env({"SUPPORTLM_ADAPTER": tiny_adapter_dir}).resolve()
    assert plan.adapter == tiny_adapter_dir
    assert Path(plan.model).resolve() == Path(tiny_model_dir).resolve()
    assert any("recorded with the adapter" in note for note in plan.notes)


def test_nothing_set_serves_the_latest_trained_adapter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_adapter_dir: str
) -> None:
    # finetune/train.py writes outputs/<run>/ and names it in outputs/latest (relative to cwd).
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "outputs" / "my-run"
    run.parent.mkdir()
    run.symlink_to(tiny_adapter_dir, target_is_directory=True)
    (tmp_path / "outputs" / "latest").write_text("my-run\n")
    plan = AppSettings.from_env({}).resolve()
    assert Path(plan.adapter).resolve() == Path(tiny_adapter_dir).resolve()
    assert "finetune/train.py" in plan.notes[0]


def test_nothing_set_and_no_training_serves_the_embedded_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("supportlm.run_folder.SHIPPED_ADAPTER", tmp_path / "no-shipped-adapter")
    plan = AppSettings.from_env({}).resolve()
    assert plan.adapter is None
    assert plan.model == "embedded"


def test_nothing_set_and_no_training_serves_the_shipped_adapter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from supportlm.run_folder import SHIPPED_ADAPTER

    monkeypatch.chdir(tmp_path)
    plan = AppSettings.from_env({}).resolve()
    assert plan.adapter == str(SHIPPED_ADAPTER) and plan.model == "embedded"
    assert any("shipped with supportlm" in note for note in plan.notes)
    assert AppSettings.from_env({"SUPPORTLM_ADAPTER": "none"}).resolve().adapter is None


def test_embedded_without_its_package_falls_back_to_the_hub_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A None entry in sys.modules is Python's documented way to make a module unimportable.
    monkeypatch.setitem(sys.modules, EMBEDDED_PACKAGE, None)
    plan = AppSettings.from_env({"SUPPORTLM_MODEL": "embedded"}).resolve()
    assert plan.model == EMBEDDED_UPSTREAM_ID
    assert plan.backend == "transformers"
    assert any(EMBEDDED_UPSTREAM_ID in note for note in plan.notes)


def test_system_prompt_comes_from_the_adapter(tiny_adapter_dir: str) -> None:
    assert RunFolder(tiny_adapter_dir).prompt_style().system_prompt == "Be brief."
    assert RunFolder("no-such-folder").prompt_style().system_prompt == DEFAULT_SYSTEM_PROMPT


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
