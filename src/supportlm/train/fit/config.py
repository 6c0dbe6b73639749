"""Configuration of `finetune/train.py`: one dataclass per concern, parsed by `TrlParser`.

A checked-in YAML (``finetune/configs/default.yaml``) is the default run; command-line flags
override it; unknown flags and unknown YAML keys are errors, so a typo never silently trains the
wrong thing. Every dataclass validates itself in ``__post_init__``, before any model is loaded.

The training arguments are TRL's `SFTConfig` (Hugging Face names: ``output_dir``, ``max_steps``,
``learning_rate``…) with CPU-friendly defaults and ``early_stopping_patience`` added. Two
`SFTConfig` fields are owned elsewhere so each setting has one source of truth:
``max_length`` is set from ``--max_seq_length`` (`DataArguments`), and ``assistant_only_loss``
lives in `DataArguments` because the label mask is built by `supportlm.prompts`, not by TRL.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from transformers.trainer_utils import IntervalStrategy
from trl import SFTConfig, TrlParser

from supportlm.embedded import EMBEDDED_MODEL
from supportlm.errors import SupportLMError
from supportlm.modeling import DTYPE_CHOICES, QUANTIZATION_CHOICES, check_choice, resolve_model
from supportlm.prompts import DEFAULT_SYSTEM_PROMPT
from supportlm.run_folder import TRAINING_CONFIG_FILE, RunFolder, default_output_dir
from supportlm.train.data.arguments import DataArguments
from supportlm.train.fit.continued import resolve_init_adapter
from supportlm.train.fit.lora import LoraArguments


@dataclass
class ModelArguments:
    """Which base model to adapt, and how to load it."""

    model_name_or_path: str = field(
        default=EMBEDDED_MODEL,
        metadata={
            "help": "Base model: 'embedded' (SmolLM2-135M-Instruct shipped with the package), a "
            ".gguf file, a local model folder or a Hugging Face Hub id."
        },
    )
    quantization: str = field(
        default="auto",
        metadata={
            "help": "Weight quantisation of the frozen base: 4bit (QLoRA), 8bit or none; auto "
            "picks 4bit on a CUDA GPU and none on a CPU.",
            "choices": list(QUANTIZATION_CHOICES),
        },
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Compute dtype; auto picks bf16 on GPUs that have it and float32 on a CPU.",
            "choices": list(DTYPE_CHOICES),
        },
    )
    device: str = field(
        default="auto", metadata={"help": "Device to train on: auto, cpu, cuda, cuda:1…"}
    )
    init_adapter: str | None = field(
        default=None,
        metadata={
            "help": "Continue this adapter (a run folder, or 'latest') instead of a new LoRA: same "
            "base and LoRA shape, checked. The run is a candidate for finetune/promote.py."
        },
    )
    system_prompt: str = field(
        default=DEFAULT_SYSTEM_PROMPT,
        metadata={
            "help": "System prompt prepended to every training conversation and saved next to "
            "the adapter, so the app serves with the prompt the model was trained with."
        },
    )

    def __post_init__(self) -> None:
        check_choice("quantization", self.quantization, QUANTIZATION_CHOICES)
        check_choice("dtype", self.dtype, DTYPE_CHOICES)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps|xpu(:\d+)?", self.device):
            raise SupportLMError(f"Unknown device {self.device!r}; use auto, cpu or cuda[:N].")
        # Resolving reads no weights but rejects a missing folder or file right away.
        resolve_model(self.model_name_or_path)
        resolve_init_adapter(self.init_adapter)


@dataclass
class TrainingArguments(SFTConfig):
    """TRL's `SFTConfig` with defaults for small models on a CPU, plus early stopping."""

    output_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where the adapter, checkpoints, metrics and model card are written; default "
            "outputs/<run name>, e.g. outputs/smollm2-support."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Replace the run in a non-empty output_dir (and delete its checkpoints); "
            "without it such a folder is refused."
        },
    )
    # TRL turns activation checkpointing on by default; a 135M-parameter model's activations fit
    # in memory, and recomputing them costs ~30% more time. Set `activation_checkpointing` (the
    # transformers 5 name) to trade that time for memory on bigger models.
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Deprecated alias of activation_checkpointing (off by default here)."},
    )
    # TRL turns bf16 on by default; it is emulated (slow) on CPUs without AMX/AVX512-BF16.
    bf16: bool | None = field(
        default=False,
        metadata={"help": "bf16 mixed precision (autocast): on for GPUs that have bf16."},
    )
    learning_rate: float = field(
        default=2e-4, metadata={"help": "Peak AdamW learning rate (LoRA tolerates ~10x full FT)."}
    )
    train_sampling_strategy: str = field(
        default="group_by_length",
        metadata={
            "help": "Sampler: group_by_length batches similar lengths together (less padding, "
            "faster), random, sequential or batch_rebalance.",
            "choices": ["random", "sequential", "group_by_length", "batch_rebalance"],
        },
    )
    # Evaluation needs only the loss: keeping the logits would hold batch x length x vocabulary
    # floats per batch (~600 MB for 8 x 375 x 49,152) and bypass the supervised-only head.
    prediction_loss_only: bool = field(
        default=True, metadata={"help": "Evaluate the loss only, without gathering logits."}
    )
    eval_strategy: IntervalStrategy | str = field(
        default="steps",
        metadata={"help": "When to evaluate on the validation split: steps, epoch or no."},
    )
    eval_steps: float | None = field(
        default=50, metadata={"help": "Evaluate (and checkpoint) every this many optimizer steps."}
    )
    load_best_model_at_end: bool = field(
        default=True,
        metadata={"help": "Keep the checkpoint with the lowest validation loss at the end."},
    )
    metric_for_best_model: str | None = field(
        default="eval_loss", metadata={"help": "Metric that picks the best checkpoint."}
    )
    save_total_limit: int | None = field(
        default=2, metadata={"help": "Checkpoints kept on disk (the best one is always kept)."}
    )
    # Same annotation as transformers: HfArgumentParser reads the union's members by position.
    report_to: None | str | list[str] = field(  # noqa: RUF036
        default="auto",
        metadata={"help": "Loggers: auto (TensorBoard when installed), none, tensorboard, wandb…"},
    )
    early_stopping_patience: int | None = field(
        default=3,
        metadata={
            "help": "Stop after this many evaluations without a lower validation loss; 0 or null "
            "disables early stopping."
        },
    )
    cpu_dropout: bool = field(
        default=True,
        metadata={
            "help": "On a CPU, draw LoRA dropout masks four per 64-bit random number "
            "(supportlm.train.fit.trainer.CpuDropout): 2.9x cheaper than torch's bernoulli_, which "
            "took 15 percent of a training step; false keeps PEFT's nn.Dropout."
        },
    )
    # Owned by DataArguments.max_seq_length; not a flag of its own (see the module docstring).
    max_length: int | None = field(default=None, init=False)
    # Owned by DataArguments.assistant_only_loss: our pre-tokenised labels already carry the mask.
    assistant_only_loss: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if self.report_to == "auto":
            self.report_to = ["tensorboard"] if _tensorboard_available() else "none"
        if self.eval_strategy != "no" and self.eval_steps is not None:
            self.save_strategy = self.eval_strategy
            self.save_steps = self.eval_steps
        if self.early_stopping_patience is not None and self.early_stopping_patience < 0:
            raise SupportLMError("early_stopping_patience must be 0 (off) or positive.")
        if self.eval_strategy == "no":
            # Nothing to compare checkpoints by: no best model, no early stopping.
            self.load_best_model_at_end = False
            self.early_stopping_patience = None
        if isinstance(self.resume_from_checkpoint, str) and self.resume_from_checkpoint.lower() in {
            "true",
            "false",
        }:
            self.resume_from_checkpoint = (
                "true" if self.resume_from_checkpoint.lower() == "true" else None
            )
        elif self.resume_from_checkpoint and not Path(self.resume_from_checkpoint).is_dir():
            raise SupportLMError(
                f"Checkpoint folder {self.resume_from_checkpoint} does not exist; pass a "
                "checkpoint-N folder or true for the last checkpoint in output_dir."
            )
        if self.bf16 and not self.use_cpu and not _bf16_gpu_available():
            raise SupportLMError(
                "bf16 needs a GPU with bf16 support and this machine has none; pass --bf16 false "
                "to train in float32 on the CPU."
            )
        # The output folder needs the model name; `resolve_output_dir` fills it in after parsing.
        output_dir = self.output_dir
        if output_dir is None:
            self.output_dir = "unset"
        super().__post_init__()
        if output_dir is None:
            self.output_dir = None


def _bf16_gpu_available() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _tensorboard_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


@dataclass
class TrainConfig:
    """Everything `supportlm.train.fit.trainer.train` needs, one object per concern."""

    model: ModelArguments
    data: DataArguments
    lora: LoraArguments
    training: TrainingArguments

    def to_flat_dict(self) -> dict[str, Any]:
        """The settings as one flat mapping, in the layout of the YAML configs.

        Training arguments are listed only where they differ from their defaults, so the file
        reads like a config someone wrote; it can be passed back with ``--config``.
        """
        flat: dict[str, Any] = {}
        for group in (self.model, self.data, self.lora):
            flat.update({f.name: getattr(group, f.name) for f in fields(group) if f.init})
        defaults = TrainingArguments(output_dir=self.training.output_dir).to_dict()
        current = self.training.to_dict()
        # gradient_checkpointing* only mirror activation_checkpointing* in transformers 5.
        aliases = {"gradient_checkpointing", "gradient_checkpointing_kwargs"}
        init_fields = {f.name for f in fields(TrainingArguments) if f.init} - aliases
        for name in sorted(init_fields):
            if name in current and current[name] != defaults.get(name):
                flat[name] = current[name]
        flat["output_dir"] = self.training.output_dir
        return flat


def make_parser() -> TrlParser:
    return TrlParser((ModelArguments, DataArguments, LoraArguments, TrainingArguments))


def parse_config(args: Sequence[str] | None = None) -> TrainConfig:
    """Parse ``--config file.yaml`` and flags (flags win) into a `TrainConfig`.

    Unknown flags and unknown YAML keys raise `SupportLMError`; so does an invalid value.
    """
    parser = make_parser()
    try:
        model, data, lora, training = parser.parse_args_and_config(
            list(args) if args is not None else None
        )
    except ValueError as error:
        message = str(error)
        if "not used by the HfArgumentParser" in message or "Unknown arguments" in message:
            unknown = re.findall(r"'--?([A-Za-z0-9_.-]+)'", message)
            raise SupportLMError(
                f"Unknown setting(s): {', '.join(unknown) or message}; run with --help to list "
                "the settings."
            ) from error
        raise SupportLMError(f"Invalid setting: {message}") from error
    except FileNotFoundError as error:
        raise SupportLMError(f"Config file {error.filename} does not exist.") from error
    if training.output_dir is None:
        training.output_dir = str(default_output_dir(model.model_name_or_path))
    training.max_length = data.max_seq_length
    if training.run_name is None or training.run_name == "unset":
        training.run_name = Path(training.output_dir).name
    return TrainConfig(model, data, lora, training)


def run_config(run: RunFolder) -> TrainConfig | None:
    """The `TrainConfig` a run folder recorded, parsed with today's dataclasses: the one reader
    of ``training_config.yaml`` (None for a folder without one)."""
    path = run.file(TRAINING_CONFIG_FILE)
    if path is None:
        return None
    try:
        return parse_config(["--config", str(path), "--output_dir", str(run.path)])
    except SupportLMError as error:
        raise SupportLMError(f"Could not read {path}: {error}") from error
