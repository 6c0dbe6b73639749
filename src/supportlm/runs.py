"""Where training runs live, and which one the app serves by default.

Kept apart from `supportlm.training` so the app can find the latest adapter without importing
TRL (seconds of start-up).
"""

from __future__ import annotations

import re
from pathlib import Path

from supportlm.modeling import EMBEDDED_MODEL

OUTPUTS_DIR = Path("outputs")
#: Text file in `OUTPUTS_DIR` naming the folder of the last finished run (read by the app).
LATEST_FILE = "latest"
ADAPTER_CONFIG = "adapter_config.json"


def run_name(model_name_or_path: str) -> str:
    """A short folder name for a run: ``smollm2-support`` for the embedded model."""
    if model_name_or_path == EMBEDDED_MODEL:
        return "smollm2-support"
    stem = Path(model_name_or_path.rstrip("/")).name.removesuffix(".gguf")
    slug = re.sub(r"[^a-z0-9.]+", "-", stem.lower()).strip("-")
    return f"{slug or 'model'}-support"


def default_output_dir(model_name_or_path: str) -> Path:
    return OUTPUTS_DIR / run_name(model_name_or_path)


def update_latest(output_dir: Path, outputs_dir: Path = OUTPUTS_DIR) -> None:
    """Point ``outputs/latest`` at `output_dir` when the run lives under `outputs_dir`."""
    output_dir = output_dir.resolve()
    outputs_dir = outputs_dir.resolve()
    if outputs_dir not in output_dir.parents:
        return
    (outputs_dir / LATEST_FILE).write_text(output_dir.relative_to(outputs_dir).as_posix() + "\n")


def default_adapter_dir(outputs_dir: str | Path = OUTPUTS_DIR) -> Path | None:
    """The adapter of the last finished training run, or None when there is none.

    Reads ``outputs/latest`` (written by `train`), falling back to the default run folder of the
    embedded model, ``outputs/smollm2-support``.
    """
    outputs_dir = Path(outputs_dir)
    candidates = []
    latest = outputs_dir / LATEST_FILE
    if latest.is_file():
        candidates.append(outputs_dir / latest.read_text().strip())
    candidates.append(outputs_dir / default_output_dir(EMBEDDED_MODEL).name)
    for candidate in candidates:
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    return None
