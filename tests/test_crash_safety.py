"""Crash-safe training: a killed run resumes from its last complete checkpoint; output folders
are never reused, or replaced, by accident (issue 9, part 3)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM

from supportlm.errors import SupportLMError
from supportlm.run_folder import RunFolder, writing
from supportlm.train.fit.output_dir import is_complete, prepare_output_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
KILLER = REPO_ROOT / "tests" / "scripts" / "kill_at_checkpoint.py"
TRAIN = REPO_ROOT / "finetune" / "train.py"


def tiny_flags(model_dir, output_dir, *extra):
    return [
        "--model_name_or_path", str(model_dir), "--output_dir", str(output_dir),
        "--max_examples", "32", "--max_seq_length", "128", "--per_device_train_batch_size", "4",
        "--max_steps", "6", "--eval_steps", "3", "--logging_steps", "1", "--report_to", "none",
        "--disable_tqdm", "true", "--load_best_model_at_end", "false", *extra,
    ]  # fmt: skip


def run(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, *map(str, args)], capture_output=True, text=True, env=env, timeout=600
    )


def fake_repository(tmp_path: Path) -> Path:
    """Stands in for a repository: never point a test's training run at the real one."""
    repository = tmp_path / "a-repository"
    (repository / ".git").mkdir(parents=True)
    (repository / "README.md").write_text("# someone's project\n")
    return repository


def test_a_run_killed_mid_checkpoint_resumes_from_the_last_complete_one(tiny_model_dir, tmp_path):
    output_dir = tmp_path / "killed-run"
    killed = run(KILLER, 6, *tiny_flags(tiny_model_dir, output_dir))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    checkpoints = RunFolder(output_dir).checkpoints_dir
    assert is_complete(checkpoints / "checkpoint-3")
    assert (checkpoints / "checkpoint-6").is_dir() and not is_complete(checkpoints / "checkpoint-6")
    assert not output_dir.exists()  # the final folder appears whole or not at all

    flags = tiny_flags(tiny_model_dir, output_dir, "--resume_from_checkpoint", "true")
    resumed = run(TRAIN, *flags)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert "checkpoint-6: it is incomplete" in log
    assert "Resuming from" in log and "checkpoint-3" in log
    assert RunFolder(output_dir).metrics()["global_step"] == 6
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert PeftModel.from_pretrained(base, output_dir).peft_config["default"].r > 0


def test_a_non_empty_output_dir_is_refused_unless_overwritten(tmp_path):
    output_dir = tmp_path / "used"
    output_dir.mkdir()
    (output_dir / "supportlm_run.json").write_text("{}")
    with pytest.raises(SupportLMError, match="is not empty.*--overwrite_output_dir"):
        prepare_output_dir(output_dir, None, False)
    old = RunFolder(output_dir).checkpoints_dir / "checkpoint-9"
    old.mkdir(parents=True)
    assert prepare_output_dir(output_dir, None, True) is None
    assert not old.exists()  # the old run's checkpoints cannot be resumed by mistake


def test_a_folder_that_is_not_a_run_is_never_replaced(tiny_model_dir, tmp_path):
    repository = fake_repository(tmp_path)
    for extra in ((), ("--overwrite_output_dir", "true")):
        result = run(TRAIN, *tiny_flags(tiny_model_dir, repository, *extra))
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert "is not a training run" in result.stderr
    with pytest.raises(SupportLMError, match="not a training run"), writing(repository):
        pass
    assert (repository / "README.md").read_text() == "# someone's project\n"
    assert (repository / ".git").is_dir()


def test_resume_without_a_checkpoint_is_one_clear_sentence(tiny_model_dir, tmp_path):
    flags = tiny_flags(tiny_model_dir, tmp_path / "new", "--resume_from_checkpoint", "true")
    result = run(TRAIN, *flags)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "holds no complete checkpoint" in result.stderr
