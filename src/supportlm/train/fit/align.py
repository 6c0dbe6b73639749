"""A preference stage on the served adapter with TRL's `KTOTrainer` or `DPOTrainer`.

The policy is the current adapter (``--adapter latest`` or a run folder), loaded trainable; no
``ref_model`` is passed, so TRL copies the adapter into a frozen ``ref`` adapter on the same base
and computes the reference log-probs with it: the reference is the *current* adapter, not the
bare base (`tests/test_align.py` checks this on token ids). The data are the rows of
`finetune/feedback.py export`: ``kto.jsonl`` (prompt, completion, label) or ``dpo.jsonl`` (prompt,
chosen, rejected), conversational. Each prompt gets the adapter's system prompt, as it is served,
and special-token strings in the texts are broken up (`neutralize_special_tokens`) because TRL
tokenises rendered text with special tokens parsed.

The output is a run folder like `finetune/train.py`'s (adapter, prompt style, intent questions,
metrics, a record with the lineage: method, parent and its version, the feedback export), and a
candidate: ``finetune/promote.py`` decides whether it is served.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from supportlm.embedded import EMBEDDED_MODEL
from supportlm.errors import SupportLMError
from supportlm.modeling import LoadedModel, load_model
from supportlm.prompts import neutralize_special_tokens, save_prompt_style, with_system_prompt
from supportlm.run_folder import INTENT_QUESTIONS_FILE, METRICS_FILE, RunFolder, writing
from supportlm.train.fit.continued import lineage, resolve_init_adapter

logger = logging.getLogger(__name__)

METHODS = ("kto", "dpo")
ALIGN_CONFIG_FILE = "align_config.json"


@dataclass
class AlignArguments:
    """The settings of `finetune/align.py`."""

    dataset: str = field(metadata={"help": "kto.jsonl or dpo.jsonl of a feedback export."})
    output_dir: str = field(metadata={"help": "The new run folder (a candidate)."})
    method: str = field(default="kto", metadata={"help": "kto or dpo.", "choices": list(METHODS)})
    adapter: str = field(
        default="latest", metadata={"help": "The adapter to improve (run folder or 'latest')."}
    )
    beta: float = field(default=0.1, metadata={"help": "Strength of the pull to the reference."})
    learning_rate: float = field(default=5e-5, metadata={"help": "Lower than SFT's: a nudge."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Passes over the rows."})
    max_steps: int = field(default=-1, metadata={"help": "> 0 overrides num_train_epochs."})
    per_device_train_batch_size: int = field(
        default=4, metadata={"help": "KTO's KL estimate needs at least 2 rows a batch."}
    )
    gradient_accumulation_steps: int = field(default=2, metadata={"help": "Batches per step."})
    max_length: int = field(default=512, metadata={"help": "Longer rows are truncated by TRL."})
    logging_steps: int = field(default=5, metadata={"help": "Loss and rewards every N steps."})
    seed: int = field(default=42, metadata={"help": "Random seed."})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SupportLMError(f"Unknown method {self.method!r}; use one of {METHODS}.")
        if self.method == "kto" and self.per_device_train_batch_size < 2:
            raise SupportLMError("KTO needs per_device_train_batch_size >= 2 (its KL estimate).")
        if not Path(self.dataset).is_file():
            raise SupportLMError(f"Dataset file {self.dataset} does not exist.")
        resolve_init_adapter(self.adapter)


ROW_KEYS = ("prompt", "completion", "label", "chosen", "rejected")
REQUIRED_KEYS = {"kto": ("prompt", "completion", "label"), "dpo": ("prompt", "chosen", "rejected")}


def read_rows(path: str, method: str) -> list[dict[str, Any]]:
    """The rows of a preference file; a malformed line is named by its number."""
    rows = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as error:
            raise SupportLMError(f"{path}, line {number}: not JSON ({error}).") from error
        missing = [
            key for key in REQUIRED_KEYS[method] if not isinstance(row, dict) or key not in row
        ]
        if missing:
            raise SupportLMError(f"{path}, line {number}: {method} rows need {', '.join(missing)}.")
        rows.append(row)
    if not rows:
        raise SupportLMError(f"{path} holds no rows.")
    return rows


def prepare_rows(rows: list[dict], system_prompt: str, tokenizer) -> list[dict[str, Any]]:
    """Each prompt with the served system prompt; every text with special tokens broken up."""

    def clean(messages: list[dict]) -> list[dict]:
        return [
            {"role": m["role"], "content": neutralize_special_tokens(m["content"], tokenizer)}
            for m in messages
        ]

    prepared = []
    for row in rows:
        out = {
            key: clean(value) if isinstance(value, list) else value for key, value in row.items()
        }
        out["prompt"] = with_system_prompt(out["prompt"], system_prompt)
        prepared.append({key: out[key] for key in out if key in ROW_KEYS})
    return prepared


def load_policy(parent: RunFolder) -> LoadedModel:
    """The base model with the parent adapter, trainable, and the adapter's chat template."""
    from supportlm.train.fit.run import physical_cores

    loaded = load_model(
        parent.base_model() or EMBEDDED_MODEL, adapter=str(parent.path), is_trainable=True
    )
    if loaded.device == "cpu":
        torch.set_num_threads(physical_cores())
    parent.prompt_style().apply(loaded.tokenizer)
    return loaded


def build_trainer(args: AlignArguments, loaded: LoadedModel, rows: list[dict], checkpoints: Path):
    """TRL's trainer for `args.method`, with the PEFT policy and no ``ref_model``."""
    from datasets import Dataset

    if args.method == "kto":
        from trl import KTOConfig as Config
        from trl import KTOTrainer as Trainer
    else:
        from trl import DPOConfig as Config
        from trl import DPOTrainer as Trainer
    extra = {"train_sampling_strategy": "sequential"} if args.method == "kto" else {}
    config = Config(
        output_dir=str(checkpoints),
        beta=args.beta,
        learning_rate=args.learning_rate,
        num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_length=args.max_length,
        logging_steps=args.logging_steps,
        seed=args.seed,
        save_strategy="no",
        report_to="none",
        bf16=False,
        dataloader_pin_memory=False,
        **extra,
    )
    return Trainer(
        model=loaded.model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=loaded.tokenizer,
    )


def align(args: AlignArguments) -> Path:
    """Run the preference stage and write the candidate's run folder; returns its path."""
    parent = resolve_init_adapter(args.adapter)
    output_dir = Path(args.output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise SupportLMError(f"{output_dir} is not empty: align into a new folder.")
    loaded = load_policy(parent)
    style = parent.prompt_style()
    rows = prepare_rows(read_rows(args.dataset, args.method), style.system_prompt, loaded.tokenizer)
    logger.info("%s on %d rows from %s, starting from %s", args.method, len(rows), args.dataset,
                parent.adapter_version())  # fmt: skip
    checkpoints = RunFolder(output_dir).checkpoints_dir
    trainer = build_trainer(args, loaded, rows, checkpoints)
    result = trainer.train()
    with writing(output_dir) as run:
        write_run(run, parent, args, trainer, result.metrics, loaded, style.system_prompt)
    shutil.rmtree(checkpoints, ignore_errors=True)
    logger.info("Candidate written to %s; compare it with finetune/evaluate.py --against %s",
                output_dir, parent.path)  # fmt: skip
    return output_dir


def write_run(run, parent, args, trainer, metrics, loaded, system_prompt) -> None:
    """The candidate's folder: only the trained adapter (not TRL's ``ref`` copy), and its record."""
    trainer.model.save_pretrained(str(run.path), selected_adapters=["default"])
    save_prompt_style(run.path, loaded.tokenizer, system_prompt)
    if questions := parent.intent_questions():
        shutil.copy(questions, run.path / INTENT_QUESTIONS_FILE)
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    (run.path / METRICS_FILE).write_text(
        json.dumps({**metrics, "rows": len(trainer.train_dataset), "log": history}, indent=2)
    )
    (run.path / ALIGN_CONFIG_FILE).write_text(json.dumps(asdict(args), indent=2))
    record = lineage([args.dataset], args.method, parent)
    run.write_record(parent.base_model() or EMBEDDED_MODEL, record)
