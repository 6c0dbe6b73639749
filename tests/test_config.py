"""Configuration: every checked-in YAML parses, typos are errors, flags override the YAML."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from supportlm.errors import SupportLMError
from supportlm.run_folder import run_name
from supportlm.train.fit.config import TrainConfig, parse_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "finetune" / "configs").glob("*.yaml"))


def gpu_overrides(path: Path) -> list[str]:
    """GPU configs ask for bf16; on a machine without a bf16 GPU they parse with it turned off."""
    wants_bf16 = yaml.safe_load(path.read_text()).get("bf16")
    has_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return ["--bf16", "false"] if wants_bf16 and not has_bf16 else []


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_parses(path: Path) -> None:
    config = parse_config(["--config", str(path), *gpu_overrides(path)])
    settings = yaml.safe_load(path.read_text())
    assert isinstance(config, TrainConfig)
    # Every key landed in a dataclass with the value written in the file.
    flat = {**vars(config.model), **vars(config.data), **vars(config.lora)}
    for key, value in settings.items():
        if isinstance(value, list):  # a list of datasets (or weights) is parsed as commas
            value = ",".join(map(str, value))
        if key in flat:
            assert flat[key] == value, key
        elif key != "bf16":
            actual = getattr(config.training, key)
            assert getattr(actual, "value", actual) == value, key
    assert config.training.max_length == config.data.max_seq_length


def test_config_header_names_the_command() -> None:
    for path in CONFIGS:
        assert f"python finetune/train.py --config finetune/configs/{path.name}" in path.read_text()


def test_default_config_is_the_cpu_run() -> None:
    config = parse_config(["--config", str(CONFIGS[0].parent / "default.yaml")])
    assert config.model.model_name_or_path == "embedded"
    assert config.training.output_dir == "outputs/smollm2-support"
    assert not config.training.bf16 and not config.training.activation_checkpointing
    assert config.training.train_sampling_strategy == "group_by_length"


def test_unknown_flag_is_an_error() -> None:
    with pytest.raises(SupportLMError, match="lora_rank"):
        parse_config(["--lora_rank", "8"])


def test_unknown_yaml_key_is_an_error(tmp_path: Path) -> None:
    config = tmp_path / "typo.yaml"
    config.write_text("lora_r: 8\nlearning_rte: 0.001\n")
    with pytest.raises(SupportLMError, match="learning_rte"):
        parse_config(["--config", str(config)])


def test_flags_override_yaml(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("lora_r: 8\nmax_steps: 5\nmax_seq_length: 256\n")
    parsed = parse_config(["--config", str(config), "--lora_r", "4", "--max_seq_length", "128"])
    assert parsed.lora.lora_r == 4
    assert parsed.training.max_steps == 5
    assert parsed.data.max_seq_length == parsed.training.max_length == 128


def test_max_seq_length_is_the_only_length_flag() -> None:
    with pytest.raises(SupportLMError, match="max_length"):
        parse_config(["--max_length", "128"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--validation_ratio", "0.6", "--test_ratio", "0.5"], "leave some examples"),
        (["--max_seq_length", "4"], "at least 16"),
        (["--lora_r", "0"], "lora_r"),
        (["--dataset", "missing.jsonl"], "does not exist"),
        (["--model_name_or_path", "./no/such/model"], "Unknown model"),
        (["--resume_from_checkpoint", "/no/such/checkpoint"], "does not exist"),
        (["--early_stopping_patience", "-1"], "early_stopping"),
    ],
)
def test_invalid_settings_fail_before_loading(argv: list[str], message: str) -> None:
    with pytest.raises(SupportLMError, match=message):
        parse_config(argv)


def test_output_dir_defaults_to_the_run_name() -> None:
    assert run_name("embedded") == "smollm2-support"
    assert run_name("Qwen/Qwen2.5-0.5B-Instruct") == "qwen2.5-0.5b-instruct-support"
    config = parse_config(["--model_name_or_path", "Qwen/Qwen2.5-0.5B-Instruct"])
    assert config.training.output_dir == "outputs/qwen2.5-0.5b-instruct-support"


def test_resume_true_means_last_checkpoint() -> None:
    assert (
        parse_config(["--resume_from_checkpoint", "true"]).training.resume_from_checkpoint == "true"
    )


def test_flat_dict_round_trips(tmp_path: Path) -> None:
    config = parse_config(["--lora_r", "4", "--max_steps", "7", "--output_dir", str(tmp_path)])
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(config.to_flat_dict()))
    again = parse_config(["--config", str(saved)])
    assert again.to_flat_dict() == config.to_flat_dict()


@pytest.mark.parametrize(
    "script", sorted(p.name for p in (Path(__file__).parents[1] / "finetune").glob("*.py"))
)
def test_every_finetune_script_prints_its_help(script: str) -> None:
    # argparse %-formats help strings: a bare "15%" in a field's help crashed `train.py --help`.
    root = Path(__file__).parents[1]
    done = subprocess.run(
        [sys.executable, str(root / "finetune" / script), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
