"""Promoting a candidate adapter to what the app serves, only when it is better (`promote.py`).

The evidence is the candidate's ``versus.json`` (`finetune/evaluate.py --adapter NEW --against
OLD`), checked to be about this candidate's files and about the adapter served now. A candidate
is promoted when

* on the held-out **test** split, ROUGE-L and chrF each drop by at most ``max_test_drop`` points
  (0-100 scale; default 1.0): old skills are kept;
* on the held-out **feedback**, ROUGE-L and chrF are both higher: the feedback changed something.

Otherwise it is refused with the numbers that failed. ``force`` promotes anyway and the log says
so. Promotion moves ``outputs/latest`` atomically (the app switches to it between requests);
every promotion and rollback is a line of ``outputs/promotions.jsonl``, and ``rollback`` points
``latest`` back to what the last promotion replaced.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from supportlm.errors import SupportLMError
from supportlm.run_folder import OUTPUTS_DIR, RunFolder, point_latest, served_run
from supportlm.train.judge.versus import VERSUS_FILE

logger = logging.getLogger(__name__)

PROMOTIONS_FILE = "promotions.jsonl"
TEXT_METRICS = ("rougeL", "chrf")


@dataclass
class Decision:
    promote: bool
    failures: list[str] = field(default_factory=list)
    checks: dict[str, Any] = field(default_factory=dict)


def decide(report: dict[str, Any], max_test_drop: float = 1.0) -> Decision:
    """Whether the report shows a candidate good enough to serve, and the numbers that fail."""
    decision = Decision(promote=True)
    test = report.get("test") or {"n": 0}
    for metric in TEXT_METRICS:
        if not test["n"]:
            decision.failures.append("no held-out test examples were scored")
            break
        old, new = test["old"][metric], test["new"][metric]
        decision.checks[f"test_{metric}"] = {"old": old, "new": new, "allowed_drop": max_test_drop}
        if new < old - max_test_drop:
            decision.failures.append(
                f"test {metric} fell {old - new:.2f} points ({old:.2f} -> {new:.2f}); "
                f"at most {max_test_drop} is allowed"
            )
    feedback = report.get("feedback") or {"n": 0}
    if not feedback["n"]:
        decision.failures.append("no held-out feedback was scored, so no improvement is shown")
    for metric in TEXT_METRICS if feedback["n"] else ():
        old, new = feedback["old"][metric], feedback["new"][metric]
        decision.checks[f"feedback_{metric}"] = {"old": old, "new": new}
        if new <= old:
            decision.failures.append(f"feedback {metric} did not improve ({old:.2f} -> {new:.2f})")
    decision.promote = not decision.failures
    return decision


def read_report(candidate: RunFolder, report_path: str | os.PathLike | None) -> dict[str, Any]:
    """The candidate's comparison report, checked to be about its files and what is served."""
    path = Path(report_path) if report_path else candidate.path / VERSUS_FILE
    if not path.is_file():
        raise SupportLMError(
            f"No comparison at {path}: run finetune/evaluate.py --adapter {candidate.path} "
            "--against latest first."
        )
    report = json.loads(path.read_text(encoding="utf-8"))
    if report["new"]["adapter_version"] != candidate.adapter_version():
        raise SupportLMError(
            f"{path} compares another version of {candidate.path} "
            f"({report['new']['adapter_version']}, now {candidate.adapter_version()}): re-run it."
        )
    return report


def _log(outputs: Path, entry: dict[str, Any]) -> None:
    outputs.mkdir(parents=True, exist_ok=True)
    entry = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **entry}
    with (outputs / PROMOTIONS_FILE).open("a", encoding="utf-8") as file:
        file.write(json.dumps(entry) + "\n")


def _describe(run: RunFolder | None) -> dict[str, Any]:
    if run is None:
        return {"path": None, "adapter_version": None}
    return {"path": str(run.path.resolve()), "adapter_version": run.adapter_version()}


def promote(
    candidate: str | os.PathLike,
    *,
    report_path: str | os.PathLike | None = None,
    max_test_drop: float = 1.0,
    force: bool = False,
    outputs_dir: str | os.PathLike = OUTPUTS_DIR,
) -> Decision:
    """Point ``latest`` at `candidate` when `decide` allows it (or `force`); log either way."""
    run = RunFolder.resolve(candidate)
    if not run.is_adapter():
        raise SupportLMError(f"{run.path} holds no adapter.")
    report = read_report(run, report_path)
    current = served_run(outputs_dir)
    if current is not None and report["old"]["adapter_version"] != current.adapter_version():
        raise SupportLMError(
            f"The comparison is against {report['old']['adapter_version']}, but "
            f"{current.adapter_version()} ({current.path}) is served now: compare again."
        )
    decision = decide(report, max_test_drop)
    entry = {"from": _describe(current), "to": _describe(run), "checks": decision.checks,
             "failures": decision.failures, "forced": force and not decision.promote}  # fmt: skip
    if not decision.promote and not force:
        _log(Path(outputs_dir), {"action": "refused", **entry})
        return decision
    if entry["forced"]:
        logger.warning("Promoting %s by force despite: %s", run.path, "; ".join(decision.failures))
    point_latest(run, outputs_dir)
    _log(Path(outputs_dir), {"action": "promote", **entry})
    decision.promote = True
    return decision


def history(outputs_dir: str | os.PathLike = OUTPUTS_DIR) -> list[dict[str, Any]]:
    path = Path(outputs_dir) / PROMOTIONS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def rollback(outputs_dir: str | os.PathLike = OUTPUTS_DIR) -> dict[str, Any]:
    """Point ``latest`` back to what the last promotion not yet rolled back replaced."""
    stack: list[dict[str, Any]] = []
    for entry in history(outputs_dir):
        if entry["action"] == "promote":
            stack.append(entry["from"])
        elif entry["action"] == "rollback" and stack:
            stack.pop()
    if not stack:
        raise SupportLMError("Nothing to roll back: no promotion is on record.")
    previous = stack[-1]
    target = RunFolder(previous["path"]) if previous["path"] else None
    if target is not None and not target.is_adapter():
        raise SupportLMError(f"The previous adapter {previous['path']} is gone.")
    current = served_run(outputs_dir)
    point_latest(target, outputs_dir)
    entry = {"action": "rollback", "from": _describe(current), "to": previous}
    _log(Path(outputs_dir), entry)
    return entry


def decision_text(decision: Decision) -> str:
    lines = [f"{name}: {json.dumps(values)}" for name, values in decision.checks.items()]
    return "\n".join([*lines, *(f"FAILED: {failure}" for failure in decision.failures)])
