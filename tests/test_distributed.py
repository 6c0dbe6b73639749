"""`accelerate launch --num_processes 2 finetune/train.py`: DDP over gloo on this CPU, for real.

Two processes train the tiny model on the bundled data; the test checks what DDP must not
change or duplicate: one adapter folder written by the main process, the loss falling, one data
report, every rank on its share of the cores. The GPU configurations are checked for parsing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "finetune" / "configs" / "accelerate"


@pytest.fixture(scope="module")
def two_ranks(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    command = [
        accelerate, "launch", "--config_file", str(CONFIGS / "cpu-ddp.yaml"),
        str(REPO_ROOT / "finetune" / "train.py"),
        "--model_name_or_path", tiny_model_dir, "--output_dir", str(out),
        "--max_examples", "64", "--max_seq_length", "256", "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-2", "--max_steps", "8", "--logging_steps", "1",
        "--eval_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=env,
                            timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout + result.stderr


def test_two_processes_train_one_adapter_whose_loss_falls(two_ranks):
    out, log = two_ranks
    assert (out / "adapter_model.safetensors").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2
    # The trainer logs each step's loss (averaged over the ranks) from the main process only.
    losses = [float(x) for x in re.findall(r"'loss': '?([0-9.]+)", log)]
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_the_main_process_alone_reports_and_writes(two_ranks):
    out, log = two_ranks
    assert log.count("[supportlm] Data report:") == 1
    assert log.count("[supportlm] Adapter and model card written to") == 1
    assert not list(out.parent.glob("run.partial*"))  # no half-written second copy


def test_each_rank_uses_its_share_of_the_cores(two_ranks):
    out, _ = two_ranks
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["cpu_threads_per_process"] == max(1, psutil.cpu_count(logical=False) // 2)


@pytest.mark.parametrize("name", ["multi-gpu-ddp", "fsdp-qlora", "deepspeed-zero2-qlora"])
def test_the_gpu_configurations_parse(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    raw = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    assert config.distributed_type == raw["distributed_type"] and config.num_processes >= 2
    assert config.use_cpu is False and config.mixed_precision == "bf16"
