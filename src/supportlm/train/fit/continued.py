"""Training that continues an adapter (``--init_adapter``), and every run's lineage.

``--init_adapter latest`` (or a run folder) loads that adapter trainable instead of a fresh LoRA:
the new run starts from what is served. It must fit: the same base model (checked by
`supportlm.modeling.check_adapter_base` while loading) and the same LoRA shape as the config asks
for (rank, alpha and target layers, checked here on the loaded model), so a config change is never
silently ignored. Such a run is a *candidate*: it does not move ``outputs/latest``;
``finetune/promote.py`` does, once the candidate has been compared with its parent.

The lineage (``supportlm_run.json``) names the method, the datasets, the parent adapter and its
version, and for each dataset that is a feedback export (`supportlm.feedback.export`) the
export's hash and row counts, so any adapter can be traced back to the feedback that made it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from supportlm.errors import SupportLMError
from supportlm.run_folder import FEEDBACK_EXPORT_REPORT, RunFolder
from supportlm.train.data.mixture import dataset_sources


def resolve_init_adapter(spec: str | None) -> RunFolder | None:
    """The run folder ``--init_adapter`` names (``latest`` included), checked to hold an adapter."""
    if not spec:
        return None
    run = RunFolder.resolve(spec)
    if not run.is_adapter():
        raise SupportLMError(f"--init_adapter {spec}: {run.path} holds no adapter.")
    return run


def feedback_exports(datasets: list[str]) -> list[dict[str, Any]]:
    """The export reports of the datasets that are files of a feedback export."""
    exports = []
    for source in datasets:
        report_file = Path(source).expanduser().parent / FEEDBACK_EXPORT_REPORT
        if not Path(source).expanduser().is_file() or not report_file.is_file():
            continue
        try:
            report = json.loads(report_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        exports.append(
            {
                "file": os.fspath(source),
                "export_hash": report.get("export_hash"),
                "rows": report.get("rows"),
                "filters": report.get("filters"),
            }
        )
    return exports


def lineage(
    datasets: list[str],
    method: str,
    parent: RunFolder | None = None,
    replay: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What a run came from: method, datasets, replay, parent and its version, feedback exports."""
    return {
        "method": method,
        "datasets": datasets,
        "replay": replay,
        "parent": parent_record(parent),
        "feedback_exports": feedback_exports(datasets),
    }


def run_lineage(config: Any, parent: RunFolder | None) -> dict[str, Any]:
    """The lineage of a `finetune/train.py` run."""
    data = config.data
    replay = {"dataset": data.replay_dataset, "share": data.replay_share}
    return lineage(
        dataset_sources(data.dataset), "sft", parent, replay if data.replay_dataset else None
    )


def parent_record(parent: RunFolder | None) -> dict[str, Any] | None:
    if parent is None:
        return None
    return {
        "path": os.fspath(parent.path.resolve()),
        "name": parent.name,
        "adapter_version": parent.adapter_version(),
    }
