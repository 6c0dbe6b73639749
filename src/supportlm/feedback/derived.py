"""Copies of stored rows outside the store: feedback exports, and the adapters trained on them.

Erasing a conversation deletes its rows from the store, but its text also lives in every export
folder written since (`finetune/feedback.py export`, and the Insights loop's
``outputs/feedback-*``). Each export records which reply ids every line came from
(``reply_ids.json``) and is listed in the store's ``exports`` table, so:

* `scrub` rewrites every listed export without the lines of erased replies;
* `expire` deletes whole exports older than the retention;
* `trained_on` names the run folders whose lineage used an export that lost lines: their
  weights cannot be un-trained, so the operator must decide whether to retrain or delete them.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

from supportlm.feedback.store import FeedbackStore
from supportlm.run_folder import RUN_FILE

REPLY_IDS = "reply_ids.json"


def register(store: FeedbackStore, export_dir: Path) -> None:
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with store.connect() as connection:
        connection.execute(
            "INSERT OR REPLACE INTO exports (path, created_at) VALUES (?, ?)",
            (str(export_dir.resolve()), stamp),
        )


def exports(store: FeedbackStore, older_than: str | None = None) -> list[Path]:
    query, parameters = "SELECT path FROM exports", ()
    if older_than is not None:
        query, parameters = query + " WHERE created_at < ?", (older_than,)
    with store.connect() as connection:
        return [Path(row[0]) for row in connection.execute(query, parameters).fetchall()]


def scrub(store: FeedbackStore, reply_ids: Iterable[str]) -> dict[str, list[str]]:
    """Remove the lines of `reply_ids` from every listed export; returns {export: files}."""
    erased, changed = set(reply_ids), {}
    for folder in exports(store) if erased else []:
        index_file = folder / REPLY_IDS
        if not index_file.is_file():
            continue
        index = json.loads(index_file.read_text(encoding="utf-8"))
        files = [name for name in index if _scrub_file(folder, name, index, erased)]
        if files:
            index_file.write_text(json.dumps(index), encoding="utf-8")
            changed[str(folder)] = files
    return changed


def _scrub_file(folder: Path, name: str, index: dict, erased: set[str]) -> bool:
    path = folder / f"{name}.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    keep = [i for i, ids in enumerate(index[name]) if not erased.intersection(ids)]
    if len(keep) == len(lines):
        return False
    path.write_text("".join(lines[i] for i in keep), encoding="utf-8")
    index[name] = [index[name][i] for i in keep]
    return True


def expire(store: FeedbackStore, cutoff: str) -> list[str]:
    """Delete the exports created before `cutoff` (ISO time); returns their paths."""
    gone = exports(store, older_than=cutoff)
    for folder in gone:
        shutil.rmtree(folder, ignore_errors=True)
    with store.connect() as connection:
        connection.execute("DELETE FROM exports WHERE created_at < ?", (cutoff,))
    return [str(folder) for folder in gone]


def trained_on(export_dirs: Iterable[str], outputs_dir: str | Path = "outputs") -> list[str]:
    """The run folders under `outputs_dir` whose lineage read a file of one of `export_dirs`."""
    folders = {str(Path(folder).resolve()) for folder in export_dirs}
    runs = []
    for record in sorted(Path(outputs_dir).glob(f"*/{RUN_FILE}")):
        try:
            lineage = json.loads(record.read_text(encoding="utf-8")).get("lineage") or {}
        except (OSError, ValueError):
            continue
        files = [entry.get("file", "") for entry in lineage.get("feedback_exports") or []]
        if any(str(Path(file).resolve().parent) in folders for file in files):
            runs.append(str(record.parent))
    return runs
