"""The feedback loop as one command: export, retrain, compare, promote (`feedback.py loop`).

Each stage is the README's own command, run as its own process, so the loop does nothing a
person could not do step by step, and a stage that fails stops the loop with its log:

    feedback.py export  ->  train.py --init_adapter  ->  evaluate.py --against  ->  promote.py

The parent is what ``outputs/latest`` names when the loop starts (resolved once, so a promotion
made meanwhile cannot change it halfway). The running app notices the promotion and switches
between requests (`supportlm.serve.switching`). The loop's report, with each stage's seconds, is
written to ``<outputs_dir>/loops/<stamp>.json``.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

from supportlm.cli import subprocess_command, subprocess_env
from supportlm.engines.base import GenerationSettings
from supportlm.errors import SupportLMError
from supportlm.run_folder import (
    FEEDBACK_EXPORT_REPORT,
    LATEST,
    SCRIPTS_DIR,
    TRAINING_CONFIG_FILE,
    RunFolder,
)

#: promote.py's exit status when its gate refuses the candidate (an answer, not a failure).
REFUSED = 1
#: The promotion gate decides what the app serves, so it scores answers decoded as the app
#: decodes them by default, not with `evaluate.py`'s own default (no repetition penalty).
SERVED_DECODING = ["--repetition_penalty", str(GenerationSettings.repetition_penalty)]


@dataclass(frozen=True)
class LoopSettings:
    db: str
    outputs_dir: str = "outputs"
    replay_dataset: str | None = None
    train_config: str = str(SCRIPTS_DIR / "configs" / "feedback.yaml")  # the retrain's recipe
    max_steps: int | None = None  # None: the recipe's
    eval_limit: int = 40
    heldout_share: float = 0.2
    force: bool = False
    train_args: Sequence[str] = ()  # more train.py flags, e.g. ("--config", "finetune/...yaml")


@dataclass
class LoopReport:
    parent: str
    export: str
    candidate: str
    stages_s: dict[str, float] = field(default_factory=dict)
    promoted: bool = False
    forced: bool = False
    log: str = ""

    @property
    def loop_s(self) -> float:
        return sum(self.stages_s.values())

    def to_dict(self) -> dict:
        return {**asdict(self), "loop_s": self.loop_s}


def stage(
    name: str, command: list[str], log: Path, ok: Sequence[int] = (0,), cwd: Path | None = None
) -> tuple[float, int]:
    """Run `command` (a `supportlm.cli` command and its flags) in `cwd`, its output in `log`; its
    seconds and exit status (one outside `ok` raises)."""
    started = time.perf_counter()
    with log.open("a", encoding="utf-8") as out:
        out.write(f"\n== {name}: {' '.join(command)}\n")
        out.flush()
        done = subprocess.run(
            subprocess_command(*command),
            env=subprocess_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
        )
    if done.returncode not in ok:
        raise SupportLMError(f"The loop's {name} step failed (exit {done.returncode}); see {log}.")
    return time.perf_counter() - started, done.returncode


def run_loop(settings: LoopSettings) -> LoopReport:
    """One turn of the loop; the candidate is served only if `promote.py` lets it through."""
    outputs = Path(settings.outputs_dir)
    parent = RunFolder.resolve(LATEST, outputs)
    replay = settings.replay_dataset or default_replay(parent)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    (outputs / "loops").mkdir(parents=True, exist_ok=True)
    report = LoopReport(
        parent=str(parent.path),
        export=str(outputs / f"feedback-{stamp}"),
        candidate=str(outputs / f"loop-{stamp}"),
        log=str(outputs / "loops" / f"{stamp}.log"),
    )
    log = Path(report.log)
    steps = [
        ("export", ["feedback", "--db", settings.db, "export", "--out", report.export,
                    "--heldout_share", str(settings.heldout_share)]),
        ("train", ["train", "--config", settings.train_config, *lora_shape(parent),
                   "--init_adapter", report.parent, "--dataset", f"{report.export}/sft.jsonl",
                   "--output_dir", report.candidate,
                   *(["--max_steps", str(settings.max_steps)] if settings.max_steps else []),
                   *(["--replay_dataset", replay] if replay else []), *settings.train_args]),
        ("evaluate", ["evaluate", "--adapter", report.candidate, "--against", report.parent,
                      "--limit", str(settings.eval_limit), *SERVED_DECODING]),
    ]  # fmt: skip
    for name, command in steps:
        report.stages_s[name] = stage(name, command, log)[0]
        if name == "export":
            _check_export(Path(report.export))
    promote = ["promote", report.candidate, "--outputs_dir", str(outputs)]
    report.stages_s["promote"], status = stage("promote", promote, log, ok=(0, REFUSED))
    report.promoted = status == 0
    if not report.promoted and settings.force:
        report.stages_s["promote"] += stage("promote --force", [*promote, "--force"], log)[0]
        report.promoted = report.forced = True
    (outputs / "loops" / f"{stamp}.json").write_text(json.dumps(report.to_dict(), indent=2))
    return report


def lora_shape(parent: RunFolder) -> list[str]:
    """The parent's LoRA rank, alpha and target layers as train.py flags: a continued adapter
    keeps its shape whatever the recipe's defaults (``--init_adapter`` refuses a mismatch)."""
    recorded = _recorded_settings(parent)
    flags = [(f"--{name}", recorded.get(name)) for name in _LORA_SHAPE]
    return [part for flag, value in flags if value is not None for part in (flag, str(value))]


def default_replay(parent: RunFolder) -> str | None:
    """The parent's first training dataset that is here to replay (None: no replay)."""
    dataset = _recorded_settings(parent).get("dataset") or []
    sources = dataset if isinstance(dataset, list) else str(dataset).split(",")
    return next((s for s in sources if Path(s).expanduser().is_file()), None)


_LORA_SHAPE = ("lora_r", "lora_alpha", "lora_target_modules")


def _recorded_settings(parent: RunFolder) -> dict:
    """The parent's training_config.yaml as written, unvalidated: its datasets may have moved
    since, which would make `RunFolder.training_config` refuse it."""
    path = parent.file(TRAINING_CONFIG_FILE)
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path else {}


def _check_export(folder: Path) -> None:
    rows = json.loads((folder / FEEDBACK_EXPORT_REPORT).read_text())["rows"]
    if not rows.get("sft"):
        raise SupportLMError(
            f"The export {folder} has no corrections or liked replies to learn from (only "
            "trusted feedback is exported: see its export.md); nothing to retrain on."
        )
