"""The run's folders before training: never reuse another run by accident, resume only whole
checkpoints.

The final folder is written whole at the end (`supportlm.run_folder.writing`, which replaces the
folder) and checkpoints go to its sibling ``<output_dir>.checkpoints``, so a crash leaves at most
an incomplete checkpoint. Here, before any model is loaded:

* a non-empty ``--output_dir`` (or checkpoints folder) is refused unless
  ``--overwrite_output_dir`` (then the old checkpoints are deleted) or a resume is asked for,
  so a new run cannot mix with an old one's files;
* a folder that is not a supportlm run (``--output_dir .`` in a repository, a home folder) is
  refused even with ``--overwrite_output_dir``: replacing it would delete it;
* ``--resume_from_checkpoint true`` picks the newest *complete* checkpoint, skipping (and
  naming) incomplete ones, and says clearly when there is none.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from supportlm.errors import SupportLMError
from supportlm.run_folder import RunFolder

logger = logging.getLogger(__name__)

#: The trainer writes its state last (after weights, optimizer and RNG state): its presence, as
#: valid JSON, marks a checkpoint as complete.
STATE_FILE = "trainer_state.json"
WEIGHTS_FILES = ("adapter_model.safetensors", "model.safetensors")


def is_complete(checkpoint: Path) -> bool:
    """Whether `checkpoint` holds weights and a readable trainer state."""
    if not any((checkpoint / name).is_file() for name in WEIGHTS_FILES):
        return False
    try:
        json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def checkpoints(folder: Path) -> list[Path]:
    """The ``checkpoint-N`` folders in `folder`, newest (highest N) first."""
    found = [p for p in folder.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]), reverse=True)


def last_complete_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint in `folder`; incomplete newer ones are logged and skipped."""
    for checkpoint in checkpoints(folder):
        if is_complete(checkpoint):
            return checkpoint
        logger.warning(
            "Skipping %s: it is incomplete (the run stopped while writing it).", checkpoint
        )
    return None


def _is_used(folder: Path) -> bool:
    return folder.exists() and (not folder.is_dir() or any(folder.iterdir()))


def prepare_output_dir(output_dir: Path, resume: str | None, overwrite: bool) -> str | None:
    """Check the run's folders; returns the checkpoint to resume from, if any."""
    if _is_used(output_dir) and not RunFolder(output_dir).is_run():
        raise SupportLMError(
            f"{output_dir} is not empty and is not a training run, so it cannot be written "
            "(the run folder replaces it whole); choose a new --output_dir."
        )
    run_checkpoints = RunFolder(output_dir).checkpoints_dir
    if resume == "true":
        checkpoint = last_complete_checkpoint(run_checkpoints)
        if checkpoint is None:
            raise SupportLMError(
                f"--resume_from_checkpoint true, but {run_checkpoints} holds no complete "
                "checkpoint to resume from; start without it, or pass a checkpoint-N folder."
            )
        logger.info("Resuming from %s", checkpoint)
        return str(checkpoint)
    if resume:
        if not is_complete(Path(resume)):
            raise SupportLMError(f"{resume} is not a complete checkpoint (no weights or state).")
        return resume
    used = [folder for folder in (output_dir, run_checkpoints) if _is_used(folder)]
    if used and not overwrite:
        raise SupportLMError(
            f"{used[0]} is not empty; choose a new --output_dir, resume with "
            "--resume_from_checkpoint true, or pass --overwrite_output_dir to replace that run."
        )
    if overwrite and run_checkpoints.is_dir():
        shutil.rmtree(run_checkpoints)  # an old run's checkpoints must not be resumed later
    return None
