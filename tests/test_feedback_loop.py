"""`feedback.py loop`'s retrain command: the recipe, the parent's LoRA shape, the replay."""

from __future__ import annotations

from pathlib import Path

import yaml

from supportlm.run_folder import TRAINING_CONFIG_FILE, RunFolder
from supportlm.train.fit.config import parse_config
from supportlm.train.release.feedback_loop import LoopSettings, default_replay, lora_shape


def parent_run(tmp_path: Path, **lora) -> tuple[RunFolder, Path]:
    data = tmp_path / "original.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    folder = tmp_path / "parent"
    folder.mkdir()
    config = {"model_name_or_path": "embedded", "dataset": f"{tmp_path}/gone.csv,{data}", **lora}
    (folder / TRAINING_CONFIG_FILE).write_text(yaml.safe_dump(config))
    return RunFolder(folder), data


def test_the_retrain_keeps_the_parents_lora_shape_over_the_recipes(tmp_path):
    parent, data = parent_run(
        tmp_path, lora_r=8, lora_alpha=16, lora_target_modules="q_proj,v_proj"
    )
    flags = lora_shape(parent)
    assert flags == [
        "--lora_r",
        "8",
        "--lora_alpha",
        "16",
        "--lora_target_modules",
        "q_proj,v_proj",
    ]
    command = ["--config", LoopSettings.train_config, *flags, "--dataset", str(data),
               "--output_dir", str(tmp_path / "candidate"), "--max_steps", "3"]  # fmt: skip
    config = parse_config(command)
    assert (config.lora.lora_r, config.lora.lora_alpha) == (8, 16)
    assert config.lora.lora_target_modules == "q_proj,v_proj"
    # The recipe's settings, except where a flag wins.
    recipe = yaml.safe_load(Path(LoopSettings.train_config).read_text())
    assert config.training.learning_rate == recipe["learning_rate"]
    assert config.data.replay_share == recipe["replay_share"]
    assert config.training.max_steps == 3 != recipe["max_steps"]


def test_the_default_replay_is_the_parents_first_dataset_still_here(tmp_path):
    parent, data = parent_run(tmp_path)
    assert default_replay(parent) == str(data)
    assert lora_shape(RunFolder(tmp_path)) == [] and default_replay(RunFolder(tmp_path)) is None
