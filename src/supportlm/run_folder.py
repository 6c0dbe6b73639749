"""The run folder: the one reader and writer of what `finetune/train.py` leaves behind.

A run folder describes itself, so someone handed only the folder can serve and judge the adapter:

* ``adapter_config.json`` + ``adapter_model.safetensors``: plain PEFT, loadable with
  `PeftModel.from_pretrained`; ``base_model_name_or_path`` is the upstream Hub id or path;
* ``supportlm_run.json``: supportlm's own record: the base model spec (``embedded``, a path, a
  Hub id), the content version of the adapter, the lineage (datasets, parent adapter, method);
* ``supportlm_prompt.json`` + tokenizer files: the system prompt and chat template trained with;
* ``training_config.yaml`` (the typed config, re-parsed with the same dataclasses),
  ``metrics.json``, ``data_report.{json,md}``, ``loss.png`` and a model card ``README.md``.

Checkpoints live beside the folder (``<name>.checkpoints/``), so the final folder can be written
to a temporary sibling and renamed into place whole. ``outputs/latest`` names the newest run; the
word ``latest`` is accepted wherever a run folder is.

Folders written before ``supportlm_run.json`` existed still load: the base comes from
``adapter_config.json`` and the version is computed from the files.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supportlm import embedded
from supportlm.cache import atomic_target, file_digest, short_hash
from supportlm.engines.base import AdapterRef
from supportlm.errors import SupportLMError
from supportlm.prompts import DEFAULT_SYSTEM_PROMPT, PROMPT_STYLE_FILE

OUTPUTS_DIR = Path("outputs")
#: Text file in `OUTPUTS_DIR` naming the folder of the last finished run (read by the app).
LATEST_FILE = "latest"
LATEST = "latest"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
RUN_FILE = "supportlm_run.json"
TRAINING_CONFIG_FILE = "training_config.yaml"
METRICS_FILE = "metrics.json"
#: The training split's questions and intents, which the app's intent classifier learns from.
INTENT_QUESTIONS_FILE = "intent_questions.jsonl"
LOSS_PLOT = "loss.png"
#: The question hashes (`supportlm.train.data.dataset.question_hash`) of the held-out splits.
SPLIT_FILE = "split.json"
#: The report of a feedback export (`supportlm.feedback.export`), beside its JSONL files.
FEEDBACK_EXPORT_REPORT = "export.json"
RUN_FORMAT = 1
#: The adapter shipped in the repository (`finetune/configs/release.yaml`): served when no run of
#: the user's own is there (``outputs/latest``).
SHIPPED_ADAPTER = Path(__file__).resolve().parents[2] / "models" / "supportlm-smollm2"
#: The finetune/ scripts that write run folders (the feedback loop runs them), beside the
#: package in a source checkout.
SCRIPTS_DIR = Path(__file__).resolve().parents[2] / "finetune"


@dataclass(frozen=True)
class PromptStyle:
    """The system prompt and chat template an adapter was trained with."""

    system_prompt: str
    chat_template: str | None = None

    @classmethod
    def default(cls) -> PromptStyle:
        return cls(DEFAULT_SYSTEM_PROMPT)

    def apply(self, tokenizer: Any) -> Any:
        """Give `tokenizer` the chat template trained with, when one was saved; returns it."""
        if self.chat_template:
            tokenizer.chat_template = self.chat_template
        return tokenizer


class RunFolder:
    """Reads (and, in training, writes) one run folder; see the module docstring for the layout."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser()

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @classmethod
    def resolve(cls, spec: str | os.PathLike, outputs_dir: str | os.PathLike = OUTPUTS_DIR):
        """`spec` as a run folder: a path, or ``latest`` for what the app serves by default (the
        run `outputs_dir`/latest names, else the shipped adapter)."""
        if str(spec) == LATEST:
            run = served_run(outputs_dir)
            if run is None:
                raise SupportLMError(
                    f"There is no latest run: {Path(outputs_dir) / LATEST_FILE} names no adapter "
                    "folder; train one with finetune/train.py."
                )
            return run
        return cls(spec)

    # -- the layout ---------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.path.resolve().name

    @property
    def checkpoints_dir(self) -> Path:
        """Where the trainer writes ``checkpoint-N`` (beside the folder, never inside it)."""
        return self.path.with_name(f"{self.path.name}.checkpoints")

    def file(self, name: str) -> Path | None:
        path = self.path / name
        return path if path.is_file() else None

    def is_adapter(self) -> bool:
        return self.file(ADAPTER_CONFIG) is not None

    def is_run(self) -> bool:
        """A folder this project wrote (a run record or an adapter): replacing it loses no more."""
        return self.file(RUN_FILE) is not None or self.is_adapter()

    # -- reading ------------------------------------------------------------------------------

    def _json(self, name: str) -> dict[str, Any] | None:
        path = self.file(name)
        if path is None:
            return None
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise SupportLMError(f"Could not read {path}: {error}") from error
        if not isinstance(value, dict):
            raise SupportLMError(f"{path} does not hold a JSON object.")
        return value

    def record(self) -> dict[str, Any]:
        """``supportlm_run.json`` ({} for folders written before it existed)."""
        return self._json(RUN_FILE) or {}

    def adapter_config(self) -> dict[str, Any]:
        config = self._json(ADAPTER_CONFIG)
        if config is None:
            raise SupportLMError(f"{self.path} is not an adapter folder (no {ADAPTER_CONFIG}).")
        return config

    def base_model(self) -> str | None:
        """The base model spec to load this adapter on.

        supportlm's own record first; else PEFT's ``base_model_name_or_path``, where the upstream
        Hub id of the embedded model maps back to the embedded GGUF when it is installed, so an
        adapter of SmolLM2 is served offline.
        """
        recorded = self.record().get("base_model")
        if recorded:
            return recorded
        base = self.adapter_config().get("base_model_name_or_path")
        if base == embedded.EMBEDDED_UPSTREAM_ID and embedded.is_installed():
            return embedded.EMBEDDED_MODEL
        return base

    def adapter_version(self) -> str:
        """A content hash of the adapter's weights and config: the same files, the same version."""
        recorded = self.record().get("adapter_version")
        if recorded:
            return recorded
        files = [self.path / ADAPTER_CONFIG, self.path / ADAPTER_WEIGHTS]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise SupportLMError(f"{self.path} has no {', '.join(missing)}; is it a PEFT adapter?")
        return compute_adapter_version(self.path)

    def adapter_ref(self) -> AdapterRef:
        return AdapterRef(name=self.name, version=self.adapter_version())

    def prompt_style(self) -> PromptStyle:
        """The prompt the adapter was trained with; `DEFAULT_SYSTEM_PROMPT` when none is saved."""
        if not self.is_adapter():
            return PromptStyle.default()
        style = self._json(PROMPT_STYLE_FILE) or {}
        system_prompt = style.get("system_prompt")
        if not system_prompt:
            system_prompt = self._yaml_setting("system_prompt") or DEFAULT_SYSTEM_PROMPT
        return PromptStyle(system_prompt, style.get("chat_template"))

    def _yaml_setting(self, name: str) -> Any:
        # Only for folders that predate supportlm_prompt.json; everything else reads the typed
        # config through `training_config`.
        import yaml

        path = self.file(TRAINING_CONFIG_FILE)
        if path is None:
            return None
        try:
            settings = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            raise SupportLMError(f"{path} is not valid YAML ({error}).") from error
        return settings.get(name) if isinstance(settings, dict) else None

    def metrics(self) -> dict[str, Any] | None:
        return self._json(METRICS_FILE)

    def loss_plot(self) -> Path | None:
        return self.file(LOSS_PLOT)

    def intent_questions(self) -> Path | None:
        """The questions and intents of the training split, when the data named intents."""
        return self.file(INTENT_QUESTIONS_FILE)

    def lineage(self) -> dict[str, Any]:
        return self.record().get("lineage", {})

    def split(self) -> dict[str, frozenset[str]] | None:
        """The held-out question hashes by split name, as training recorded them (None for a
        run from before ``split.json``)."""
        recorded = self._json(SPLIT_FILE)
        if recorded is None:
            return None
        return {name: frozenset(hashes) for name, hashes in recorded["splits"].items()}

    # -- writing ------------------------------------------------------------------------------

    def write_split(self, held_out: dict[str, list[str]]) -> None:
        """Write ``split.json``: which questions training held out (see `split`)."""
        record = {
            "format": RUN_FORMAT,
            "hash": "sha256 of the normalised, case-folded first user message",
            "splits": held_out,
        }
        (self.path / SPLIT_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")

    def write_record(self, base_model: str, lineage: dict[str, Any]) -> None:
        """Write ``supportlm_run.json``, versioning the adapter files already in the folder."""
        record = {
            "format": RUN_FORMAT,
            "base_model": base_model,
            "adapter_version": compute_adapter_version(self.path),
            "lineage": lineage,
        }
        (self.path / RUN_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def apply_prompt_style(tokenizer: Any, adapter: str | os.PathLike | None) -> None:
    """Serve with the chat template the adapter was trained with, when its folder saved one."""
    if adapter is not None and RunFolder(adapter).is_adapter():
        RunFolder(adapter).prompt_style().apply(tokenizer)


def compute_adapter_version(folder: Path) -> str:
    """``v-`` and 12 hex digits of the SHA-256 over the adapter config and weights."""
    return "v-" + short_hash(
        file_digest(folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS), length=12
    )


@contextlib.contextmanager
def writing(final_dir: str | os.PathLike) -> Iterator[RunFolder]:
    """A `RunFolder` at a temporary sibling of `final_dir`; renamed into place once complete.

    The app (or anyone) reading `final_dir` meanwhile sees the previous run, never a half-written
    folder; a run that fails leaves the previous folder as it was.
    """
    final = Path(final_dir).expanduser()
    # Replacing removes the old folder: never do that to something that is not a run.
    if final.is_dir() and any(final.iterdir()) and not RunFolder(final).is_run():
        raise SupportLMError(f"{final} is not a training run; refusing to replace it.")
    with atomic_target(final) as partial:
        partial.mkdir(parents=True)
        yield RunFolder(partial)


def adapter_ref(adapter: str | os.PathLike) -> AdapterRef:
    """The `AdapterRef` of a local adapter folder, or of a Hub adapter id (versioned by its id)."""
    folder = RunFolder(adapter)
    if folder.is_adapter():
        return folder.adapter_ref()
    name = str(adapter).rstrip("/")
    return AdapterRef(name=name, version="hub-" + short_hash(name, length=12))


# -- the latest pointer -----------------------------------------------------------------------


def run_name(model_name_or_path: str) -> str:
    """A short folder name for a run: ``smollm2-support`` for the embedded model."""
    if model_name_or_path == embedded.EMBEDDED_MODEL:
        return "smollm2-support"
    stem = Path(model_name_or_path.rstrip("/")).name.removesuffix(".gguf")
    slug = re.sub(r"[^a-z0-9.]+", "-", stem.lower()).strip("-")
    return f"{slug or 'model'}-support"


def default_output_dir(model_name_or_path: str) -> Path:
    return OUTPUTS_DIR / run_name(model_name_or_path)


def point_latest(run: RunFolder | None, outputs_dir: str | os.PathLike = OUTPUTS_DIR) -> None:
    """Point ``outputs/latest`` at `run` wherever it lives (None: remove the pointer); atomic.

    `finetune/promote.py` uses it; a run under `outputs_dir` is named relative to it.
    """
    outputs = Path(outputs_dir).resolve()
    pointer = outputs / LATEST_FILE
    if run is None:
        pointer.unlink(missing_ok=True)
        return
    folder = run.path.resolve()
    name = folder.relative_to(outputs).as_posix() if outputs in folder.parents else str(folder)
    with atomic_target(pointer) as partial:
        partial.write_text(name + "\n", encoding="utf-8")


def served_run(outputs_dir: str | os.PathLike = OUTPUTS_DIR) -> RunFolder | None:
    """What the app serves by default: the latest run, else the shipped adapter, else none."""
    run = latest_run(outputs_dir)
    if run is None and RunFolder(SHIPPED_ADAPTER).is_adapter():
        run = RunFolder(SHIPPED_ADAPTER)
    return run


def update_latest(run: RunFolder, outputs_dir: str | os.PathLike = OUTPUTS_DIR) -> bool:
    """Point ``outputs/latest`` at `run` when it lives under `outputs_dir`; atomic.

    The pointer is a new file renamed over the old one, so a reader sees the old or the new
    name, and a symlink at ``latest`` is replaced, not written through.
    """
    folder = run.path.resolve()
    outputs = Path(outputs_dir).resolve()
    if outputs not in folder.parents:
        return False
    with atomic_target(outputs / LATEST_FILE) as partial:
        partial.write_text(folder.relative_to(outputs).as_posix() + "\n", encoding="utf-8")
    return True


def latest_run(outputs_dir: str | os.PathLike = OUTPUTS_DIR) -> RunFolder | None:
    """The adapter of the last finished training run, or None when there is none.

    Reads ``outputs/latest`` (written by `train`), falling back to the default run folder of the
    embedded model, ``outputs/smollm2-support``.
    """
    outputs_dir = Path(outputs_dir)
    candidates = []
    pointer = outputs_dir / LATEST_FILE
    if pointer.is_file():
        candidates.append(outputs_dir / pointer.read_text(encoding="utf-8").strip())
    candidates.append(outputs_dir / run_name(embedded.EMBEDDED_MODEL))
    for candidate in candidates:
        run = RunFolder(candidate)
        if run.is_adapter():
            return run
    return None
