"""Model specs, the GGUF conversion cache, quantisation choices and adapter checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from supportlm.embedded import EMBEDDED_UPSTREAM_ID
from supportlm.errors import SupportLMError
from supportlm.modeling import (
    check_adapter_base,
    load_model,
    prepare_model_dir,
    resolve_dtype,
    resolve_model,
    resolve_quantization,
)


def test_resolve_kinds(tiny_model_dir, tmp_path):
    embedded = resolve_model("embedded")
    assert embedded.kind == "embedded" and embedded.gguf_path.is_file()
    assert resolve_model(None) == embedded
    assert resolve_model(tiny_model_dir).kind == "local"
    assert resolve_model("Qwen/Qwen2.5-0.5B-Instruct").kind == "hub"
    gguf = resolve_model(str(embedded.gguf_path))
    assert gguf.kind == "gguf" and gguf.gguf_file == embedded.gguf_file


def test_names_a_page_shows_are_not_server_paths(tiny_model_dir, tmp_path):
    assert resolve_model(tiny_model_dir).display_name == Path(tiny_model_dir).name
    gguf = resolve_model(str(resolve_model("embedded").gguf_path))
    assert gguf.display_name == gguf.gguf_file
    assert resolve_model("Qwen/Qwen2.5-0.5B-Instruct").display_name == "Qwen/Qwen2.5-0.5B-Instruct"


def test_unknown_models_are_clear_errors(tmp_path):
    with pytest.raises(SupportLMError, match="Unknown model"):
        resolve_model(str(tmp_path / "nowhere"))
    with pytest.raises(SupportLMError, match="no config.json"):
        resolve_model(str(tmp_path))
    # A Hub id that cannot be reached (no network here, or no such repository) is one sentence.
    with pytest.raises(SupportLMError, match="Could not load model"):
        load_model("supportlm-tests/does-not-exist")


def test_auto_choices_on_cpu():
    assert resolve_quantization("auto", "cpu")[0] == "none"
    assert resolve_quantization("auto", "cuda")[0] == "4bit"
    assert resolve_dtype("auto", "cpu")[0] == torch.float32
    with pytest.raises(SupportLMError, match="Unknown quantization"):
        resolve_quantization("3bit", "cpu")


def test_embedded_gguf_is_converted_once(smollm2_dir):
    assert prepare_model_dir("embedded") == smollm2_dir
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert model.config.num_hidden_layers == 30
    assert not hasattr(model.config, "quantization_config")


def test_load_embedded_model_generates(smollm2_dir, capsys):
    loaded = load_model("embedded")
    assert loaded.quantization == "none" and loaded.dtype == torch.float32
    ids = loaded.tokenizer("Hello", return_tensors="pt")
    out = loaded.model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 3


def test_4bit_on_cpu_uses_bitsandbytes(tiny_model_dir):
    import bitsandbytes as bnb

    loaded = load_model(tiny_model_dir, quantization="4bit")
    linear = loaded.model.model.layers[0].self_attn.q_proj
    assert isinstance(linear, bnb.nn.Linear4bit)
    logits = loaded.model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


def _save_adapter(model_dir, adapter_dir, base_name):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base_name
    config_path.write_text(json.dumps(config))


def test_adapter_for_another_base_is_refused(tiny_model_dir, tmp_path):
    adapter = tmp_path / "adapter"
    _save_adapter(tiny_model_dir, adapter, "Qwen/Qwen2.5-0.5B-Instruct")
    with pytest.raises(SupportLMError, match="was trained on base model 'Qwen/Qwen2.5-0.5B"):
        load_model(tiny_model_dir, adapter=str(adapter))


def test_adapter_for_this_base_loads(tiny_model_dir, tmp_path):
    adapter = tmp_path / "adapter"
    _save_adapter(tiny_model_dir, adapter, tiny_model_dir)
    loaded = load_model(tiny_model_dir, adapter=str(adapter))
    assert loaded.adapter == str(adapter) and hasattr(loaded.model, "disable_adapter")
    assert ", adapter adapter on cpu" in loaded.description
    assert str(tmp_path) not in loaded.description  # the page shows names, not server paths


def test_embedded_and_its_upstream_hub_model_are_the_same_base(tiny_model_dir, tmp_path):
    adapter = tmp_path / "adapter"
    _save_adapter(tiny_model_dir, adapter, "embedded")
    check_adapter_base(str(adapter), resolve_model(EMBEDDED_UPSTREAM_ID))
    with pytest.raises(SupportLMError):
        check_adapter_base(str(adapter), resolve_model(tiny_model_dir))


def test_missing_adapter_is_a_clear_error(tiny_model_dir, tmp_path):
    with pytest.raises(SupportLMError, match="Could not read adapter"):
        load_model(tiny_model_dir, adapter=str(tmp_path / "no-adapter"))
