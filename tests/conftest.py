"""Shared fixtures: the real embedded model, a tiny random model with the same tokenizer, data."""

from __future__ import annotations

import os
from pathlib import Path

# No test may reach the Hugging Face Hub (none is reachable in CI); offline mode makes a Hub id
# fail at once instead of after a minute of retries. Set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from helpers import save_random_adapter
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from supportlm.modeling import prepare_model_dir
from supportlm.prompts import save_prompt_style

# In CI a skipped test fails the run: every engine (llama.cpp too) is installed there.
pytest_plugins = ["ci_no_skips"]

REPO_ROOT = Path(__file__).resolve().parents[1]
BITEXT_CSV = REPO_ROOT.parent / "shared" / "data" / "bitext-customer-support" / "train.csv"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """The embedded SmolLM2-135M-Instruct, converted once to a safetensors folder (cached)."""
    return prepare_model_dir("embedded")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir: str):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer) -> str:
    """A tiny random Llama (2 layers, width 64) with SmolLM2's real tokenizer and chat template.

    Fast enough to train and serve in tests; its text is gibberish, so tests on it assert
    mechanics (shapes, streaming, storage), never quality.
    """
    folder = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        vocab_size=len(smollm2_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=smollm2_tokenizer.bos_token_id,
        eos_token_id=smollm2_tokenizer.eos_token_id,
        pad_token_id=smollm2_tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: str) -> str:
    """The tiny Llama with larger random weights, so its (gibberish) reply depends on the prompt.

    With the default initialisation every prompt gets the same reply; app tests that tell two
    users' answers apart need replies that differ.
    """
    folder = tmp_path_factory.mktemp("tiny-chat-llama")
    config = LlamaConfig.from_pretrained(tiny_model_dir, initializer_range=0.2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_adapter_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: str) -> str:
    """A random (non-zero) LoRA on the tiny model, saved with the prompt style "Be brief." as
    finetune/train.py saves one."""
    folder = save_random_adapter(tiny_model_dir, tmp_path_factory.mktemp("tiny-adapter"))
    save_prompt_style(folder, AutoTokenizer.from_pretrained(tiny_model_dir), "Be brief.")
    return str(folder)


@pytest.fixture(scope="session")
def bitext_csv() -> Path:
    if not BITEXT_CSV.is_file():
        pytest.skip("the Bitext sample (../shared/data/bitext-customer-support) is not present")
    return BITEXT_CSV
