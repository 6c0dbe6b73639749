"""Merging: the standalone model computes exactly what base + adapter computed."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch
from helpers import save_random_adapter
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from supportlm.errors import SupportLMError
from supportlm.prompts import save_prompt_style
from supportlm.train.release.merge import merge_adapter


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter with random (non-zero) updates, saved like train.py saves one."""
    folder = save_random_adapter(
        tiny_model_dir, tmp_path_factory.mktemp("adapter"), target_modules="all-linear"
    )
    save_prompt_style(folder, AutoTokenizer.from_pretrained(tiny_model_dir), "Be brief.")
    return folder


def test_merged_logits_equal_adapter_logits(tiny_model_dir, tiny_adapter, tmp_path) -> None:
    merged_dir = merge_adapter(tiny_adapter, tmp_path / "merged")
    input_ids = torch.tensor([[1, 42, 7, 1000, 5, 99]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        expected = PeftModel.from_pretrained(base, str(tiny_adapter)).eval()(input_ids).logits
        merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
        actual = merged(input_ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(input_ids).logits
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(actual, plain, atol=1e-3)  # the adapter really changed the model
    assert not (merged_dir / "adapter_config.json").exists()
    assert (
        json.loads((merged_dir / "supportlm_prompt.json").read_text())["system_prompt"]
        == "Be brief."
    )
    assert AutoTokenizer.from_pretrained(merged_dir).chat_template
    assert json.loads((merged_dir / "config.json").read_text())["model_type"] == "llama"


def test_merging_into_a_quantised_base_is_refused(tiny_adapter, tmp_path, capsys) -> None:
    merge = runpy.run_path(str(Path(__file__).parents[1] / "finetune" / "merge.py"))["main"]
    output = tmp_path / "merged"
    assert (
        merge(
            ["--adapter", str(tiny_adapter), "--output_dir", str(output), "--quantization", "4bit"]
        )
        == 2
    )
    assert "Refusing to merge into a 4bit base" in capsys.readouterr().err
    assert not output.exists()


def test_merging_a_folder_without_adapter_fails_clearly(tmp_path) -> None:
    with pytest.raises(SupportLMError, match="not an adapter folder"):
        merge_adapter(tmp_path, tmp_path / "merged")
