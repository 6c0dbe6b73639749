"""LoRA/QLoRA supervised fine-tuning with TRL's `SFTTrainer`, and the self-describing output folder.

The conversations are tokenised by `supportlm.prompts.tokenize_conversation` (the one prompt
module), so the labels the loss sees are exactly the answer-only mask built there: `IGNORE_INDEX`
on system and user turns, every assistant turn supervised. TRL treats a dataset that already has
``input_ids`` and ``labels`` as processed and uses the labels as they are.

Speed on a CPU (measured by ``bench/train.py``):

* fp32 and no activation checkpointing (bf16 is emulated on AVX2; a 135M model's activations fit);
* batches grouped by length, so little compute is spent on padding;
* the output head is applied only where a label is supervised (`supervised_lm_loss`): SmolLM2's
  vocabulary is 49,152 wide, so the full logits of a batch cost about as much as a third of the
  model, and most positions (system prompt, question, padding) carry no label;
* as many torch threads as physical cores, and no dataloader worker processes.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import resource
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from datasets import Dataset
from transformers import EarlyStoppingCallback, PreTrainedTokenizerBase, TrainerCallback
from trl import SFTTrainer

from supportlm.embedded import EMBEDDED_MODEL, EMBEDDED_UPSTREAM_ID, upstream_id
from supportlm.errors import SupportLMError
from supportlm.modeling import LoadedModel, load_model, prepare_model_dir
from supportlm.prompts import IGNORE_INDEX, save_prompt_style, tokenize_conversation
from supportlm.prompts import with_system_prompt as add_system_prompt
from supportlm.run_folder import (
    LOSS_PLOT,
    METRICS_FILE,
    TRAINING_CONFIG_FILE,
    RunFolder,
    update_latest,
    writing,
)
from supportlm.train.config import TrainConfig
from supportlm.train.data import Example, prepare_dataset

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def tokenize_examples(
    examples: list[Example],
    tokenizer: PreTrainedTokenizerBase,
    *,
    system_prompt: str | None,
    assistant_only_loss: bool = True,
) -> Dataset:
    """A `datasets.Dataset` of ``input_ids`` and ``labels`` (answer-only by default)."""
    rows = []
    for example in examples:
        encoded = tokenize_conversation(
            tokenizer,
            add_system_prompt(example.messages, system_prompt),
            assistant_only_loss=assistant_only_loss,
        )
        rows.append({"input_ids": encoded["input_ids"], "labels": encoded["labels"]})
    return Dataset.from_list(rows, features=None) if rows else Dataset.from_dict({})


# ---------------------------------------------------------------------------------------------
# Loss on supervised positions only
# ---------------------------------------------------------------------------------------------


def _causal_lm_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The decoder stack and the output head of a (PEFT-wrapped) causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def supports_supervised_logits(model: torch.nn.Module) -> bool:
    """Whether the head is a plain projection (no logit soft-capping or scaling to replicate)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.get_text_config()
    return all(
        getattr(config, name, None) in (None, 1.0)
        for name in ("final_logit_softcapping", "logit_scale", "logits_scaling")
    )


def supervised_lm_loss(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> tuple[torch.Tensor, int]:
    """Causal-LM cross-entropy computed from the logits of supervised positions only.

    Equal to the model's own loss (shifted labels, `IGNORE_INDEX` ignored, mean over supervised
    tokens or sum / `num_items_in_batch` under gradient accumulation), without materialising the
    ``(batch, length, vocabulary)`` logits. Returns the loss and the number of supervised tokens.
    """
    decoder, head = _causal_lm_parts(model)
    hidden = decoder(**inputs, use_cache=False).last_hidden_state
    # Position t predicts token t + 1.
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logits = head(hidden[:, :-1][mask]).float()
    loss = F.cross_entropy(logits, targets[mask], reduction="sum")
    count = int(mask.sum())
    denominator = num_items_in_batch if num_items_in_batch is not None else max(count, 1)
    return loss / denominator, count


class CpuDropout(torch.nn.Dropout):
    """`nn.Dropout` with a mask drawn 4 elements per 64-bit random number, for CPU training.

    PyTorch's CPU `bernoulli_` draws one Mersenne-Twister number per element: with PEFT's
    LoRA dropout on every adapted layer (210 calls a step for SmolLM2 all-linear) it took 15 %
    of a training step on 2 cores. Here one 64-bit draw gives four 16-bit uniforms, 2.9x faster
    per call (measured). Each element is still dropped independently, with probability `p`
    rounded to a multiple of 1/65536, and survivors scaled by 1/(1-p).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device)
        uniform16 = words.random_(-(2**63), None).view(torch.int16)[:n].view(x.shape)
        keep = uniform16 >= round(self.p * 65536) - 32768
        return x * keep * (1.0 / (1.0 - self.p))


def use_cpu_dropout(model: torch.nn.Module) -> int:
    """Swap the LoRA layers' `nn.Dropout` for `CpuDropout`; returns how many were swapped."""
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            if type(dropout) is torch.nn.Dropout and dropout.p > 0:
                dropouts[name] = CpuDropout(dropout.p)
                swapped += 1
    return swapped


class SupportLMTrainer(SFTTrainer):
    """`SFTTrainer` whose loss applies the output head to supervised positions only.

    TRL's own fused head scores every position in chunks on devices without Triton (CPUs), and also
    computes entropy and top-1 accuracy for its logs; here only the supervised rows reach the
    head. Evaluation logs perplexity = exp(eval_loss) next to the loss.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.supervised_tokens = 0
        self.supervised_logits = supports_supervised_logits(self.model)
        if not self.supervised_logits:
            logger.info("This model scales its logits; using TRL's loss instead of ours.")
        if self.args.device.type == "cpu" and (swapped := use_cpu_dropout(self.model)):
            logger.info("LoRA dropout: CpuDropout on %d layers (cheaper masks on CPU).", swapped)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        if not self.supervised_logits or return_outputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        loss, count = supervised_lm_loss(model, inputs, labels, num_items_in_batch)
        if model.training:
            self.supervised_tokens += count
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "eval_loss" in logs:
            logs["eval_perplexity"] = perplexity(logs["eval_loss"])
        super().log(logs, start_time)


def perplexity(loss: float) -> float:
    # Capped so a diverged run reports a huge number, not an OverflowError.
    return math.exp(min(loss, 50.0))


class StepTimer(TrainerCallback):
    """Wall time spent in optimizer steps, excluding evaluation and checkpointing."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self._start = None


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def parameter_counts(model: torch.nn.Module) -> dict[str, Any]:
    """Trainable and total parameters, and how many parameters each dtype holds."""
    by_dtype: Counter[str] = Counter()
    trainable = total = 0
    for parameter in model.parameters():
        count = parameter.numel()
        # bitsandbytes packs two 4-bit weights per uint8 element.
        if parameter.dtype == torch.uint8 and hasattr(parameter, "quant_state"):
            count *= 2
        by_dtype[str(parameter.dtype).removeprefix("torch.")] += count
        total += count
        trainable += count if parameter.requires_grad else 0
    return {
        "trainable": trainable,
        "total": total,
        "trainable_share": trainable / total if total else 0.0,
        "by_dtype": dict(by_dtype.most_common()),
    }


def peak_memory_mb(device: str) -> tuple[float, str]:
    """Peak memory of this process: allocated GPU memory on CUDA, resident set size on a CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20, "torch.cuda.max_memory_allocated"
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak RSS"


def physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or torch.get_num_threads()


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    output_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    #: The trained PEFT model (best checkpoint when `load_best_model_at_end`), still in memory.
    model: torch.nn.Module | None = None


def train(config: TrainConfig) -> TrainResult:
    """Load the model and data, fine-tune a LoRA adapter, and write the self-describing folder."""
    model_args, data_args, lora_args, args = config.model, config.data, config.lora, config.training
    output_dir = Path(args.output_dir)
    logger.info("Resolved config:\n%s", yaml.safe_dump(config.to_flat_dict(), sort_keys=False))

    loaded = load_model(
        model_args.model_name_or_path,
        quantization=model_args.quantization,
        dtype=model_args.dtype,
        device=model_args.device,
        is_trainable=True,
    )
    if loaded.device == "cpu":
        # One thread per physical core: hyper-threads share the FMA units and only add contention.
        torch.set_num_threads(physical_cores())
        logger.info("CPU threads: %d", torch.get_num_threads())
    prepared = prepare_dataset(
        data_args.dataset,
        loaded.tokenizer,
        system_prompt=model_args.system_prompt,
        max_seq_length=data_args.max_seq_length,
        validation_ratio=data_args.validation_ratio,
        test_ratio=data_args.test_ratio,
        strict=data_args.strict,
        max_examples=data_args.max_examples,
    )
    logger.info("Data report:\n%s", prepared.report.to_markdown())
    datasets = {
        name: tokenize_examples(
            prepared.splits[name],
            loaded.tokenizer,
            system_prompt=model_args.system_prompt,
            assistant_only_loss=data_args.assistant_only_loss,
        )
        for name in ("train", "validation")
    }
    if len(datasets["train"]) == 0:
        raise SupportLMError("The training split is empty; use more data or smaller ratios.")
    eval_dataset = datasets["validation"] if len(datasets["validation"]) else None
    if eval_dataset is None and args.eval_strategy != "no":
        logger.warning("The validation split is empty: no evaluation and no early stopping.")
        args.eval_strategy = "no"
        args.load_best_model_at_end = False
        args.early_stopping_patience = None

    model = loaded.model
    # PEFT records the model's `name_or_path` as the adapter's base_model_name_or_path: the
    # upstream Hub id (or the folder transformers read), so plain PEFT can load the adapter;
    # supportlm's own spec ("embedded", a .gguf path) goes into supportlm_run.json.
    model.name_or_path = (
        upstream_id(loaded.source.name)
        if loaded.source.kind == "embedded"
        else (prepare_model_dir(loaded.source))
    )
    if loaded.quantization in {"4bit", "8bit"}:
        from peft import prepare_model_for_kbit_training

        # Casts norms to fp32 and enables input gradients, as QLoRA needs.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=bool(args.activation_checkpointing)
        )
    timer = StepTimer()
    callbacks: list[TrainerCallback] = [timer]
    if args.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(args.early_stopping_patience))
    # Checkpoints go beside the run folder, which is written whole at the end (`writing`).
    trainer_args = copy.copy(args)
    trainer_args.output_dir = str(RunFolder(output_dir).checkpoints_dir)
    trainer = SupportLMTrainer(
        model=model,
        args=trainer_args,
        train_dataset=datasets["train"],
        eval_dataset=eval_dataset,
        processing_class=loaded.tokenizer,
        peft_config=lora_args.to_peft_config(),
        callbacks=callbacks,
    )
    counts = parameter_counts(trainer.model)
    logger.info(
        "Trainable parameters: %s of %s (%.2f%%)",
        f"{counts['trainable']:,}",
        f"{counts['total']:,}",
        100 * counts["trainable_share"],
    )
    logger.info(
        "Parameters by dtype: %s",
        ", ".join(f"{dtype} {count:,}" for dtype, count in counts["by_dtype"].items()),
    )
    logger.info(
        "Dataset sizes: %s",
        ", ".join(f"{name} {count}" for name, count in prepared.report.splits.items()),
    )

    resume = args.resume_from_checkpoint
    if resume == "true":
        resume = True
    train_output = trainer.train(resume_from_checkpoint=resume)
    eval_metrics = trainer.evaluate() if eval_dataset is not None else {}

    memory, memory_kind = peak_memory_mb(loaded.device)
    metrics = {
        "train_loss": train_output.training_loss,
        "eval_loss": eval_metrics.get("eval_loss"),
        "eval_perplexity": eval_metrics.get("eval_perplexity"),
        "global_step": trainer.state.global_step,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "train_runtime_s": train_output.metrics.get("train_runtime"),
        "step_time_s": timer.seconds,
        "train_supervised_tokens": trainer.supervised_tokens,
        "train_supervised_tokens_per_second": (
            trainer.supervised_tokens / timer.seconds if timer.seconds else None
        ),
        "peak_memory_mb": round(memory, 1),
        "peak_memory_kind": memory_kind,
        "dataset_sizes": prepared.report.splits,
        "parameters": counts,
        "device": loaded.device,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "quantization": loaded.quantization,
    }
    with writing(output_dir) as run:
        trainer.save_model(str(run.path))
        write_output_dir(run, config, loaded, trainer, metrics, prepared.report)
    update_latest(RunFolder(output_dir))
    logger.info("Metrics: %s", json.dumps({k: metrics[k] for k in _SUMMARY_KEYS}))
    logger.info("Adapter and model card written to %s", output_dir)
    return TrainResult(output_dir=output_dir, metrics=metrics, model=trainer.model)


_SUMMARY_KEYS = (
    "train_loss",
    "eval_loss",
    "eval_perplexity",
    "global_step",
    "step_time_s",
    "train_supervised_tokens_per_second",
    "peak_memory_mb",
)


# ---------------------------------------------------------------------------------------------
# The output folder
# ---------------------------------------------------------------------------------------------


def write_output_dir(
    run: RunFolder,
    config: TrainConfig,
    loaded: LoadedModel,
    trainer: SFTTrainer,
    metrics: dict[str, Any],
    report,
) -> None:
    """Everything someone handed only this folder needs to serve and judge the adapter."""
    output_dir = run.path
    save_prompt_style(output_dir, loaded.tokenizer, config.model.system_prompt)
    (output_dir / TRAINING_CONFIG_FILE).write_text(
        "# Reproduce this run: python finetune/train.py --config <this file>\n"
        + yaml.safe_dump(config.to_flat_dict(), sort_keys=False, allow_unicode=True)
    )
    (output_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    report.save(output_dir)
    plot_loss(trainer.state.log_history, output_dir / LOSS_PLOT)
    (output_dir / "README.md").write_text(model_card(config, loaded, metrics, report))
    lineage = {"method": "sft", "datasets": [config.data.dataset], "parent": None}
    run.write_record(loaded.source.name, lineage)


def plot_loss(log_history: list[dict[str, Any]], path: Path) -> None:
    """Train and eval loss against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    train = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    evaluation = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    figure, axis = plt.subplots(figsize=(6, 4))
    if train:
        axis.plot(*zip(*train, strict=True), label="train loss")
    if evaluation:
        axis.plot(*zip(*evaluation, strict=True), marker="o", label="eval loss")
    axis.set_xlabel("step")
    axis.set_ylabel("cross-entropy (answer tokens)")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def model_card(config: TrainConfig, loaded: LoadedModel, metrics: dict[str, Any], report) -> str:
    base = loaded.source.name
    upstream = EMBEDDED_UPSTREAM_ID if base == EMBEDDED_MODEL else base
    lora = config.lora
    args = config.training

    def fmt(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    rows = "\n".join(
        f"| {key} | {fmt(metrics.get(key))} |"
        for key in (
            "train_loss",
            "eval_loss",
            "eval_perplexity",
            "global_step",
            "train_supervised_tokens_per_second",
            "peak_memory_mb",
        )
    )
    return f"""---
base_model: {upstream}
library_name: peft
tags: [lora, sft, customer-support, supportlm]
---

# {Path(config.training.output_dir).name}

A LoRA adapter that turns `{upstream}` into a customer-service assistant, trained with
supportlm's `finetune/train.py`.

- Base model: `{base}` ({loaded.source.display_name}), {loaded.quantization} quantization,
  {str(loaded.dtype).removeprefix("torch.")} on {loaded.device}
- Data: `{report.source}` ({report.shape}); splits {report.splits}; see `data_report.md`
- LoRA: r={lora.lora_r}, alpha={lora.lora_alpha}, dropout={lora.lora_dropout},
  target modules {lora.lora_target_modules}
- Training: learning rate {args.learning_rate}, batch {args.per_device_train_batch_size} x
  {args.gradient_accumulation_steps} accumulation, max_steps {args.max_steps}, epochs
  {args.num_train_epochs}, max_seq_length {config.data.max_seq_length},
  answer-only loss {config.data.assistant_only_loss}; full settings in `training_config.yaml`

## Metrics (validation split)

| metric | value |
|---|---:|
{rows}

Loss curve: `loss.png`. All metrics: `metrics.json`.

## Serve

```bash
SUPPORTLM_ADAPTER={config.training.output_dir} python app.py
```

The chat template and system prompt used in training are saved here (`supportlm_prompt.json`)
and loaded by the app. Merge into a standalone model with
`python finetune/merge.py --adapter {config.training.output_dir} --output_dir merged`.
"""
