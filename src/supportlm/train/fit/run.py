"""`train(config)`: load, prepare the data, fine-tune with `SupportLMTrainer`, write the run folder.

Each step is a function of its own and says what it chose before spending compute (LitGPT's
"verifying settings"): the resolved config, CPU threads, the data report, parameter counts.
"""

from __future__ import annotations

import copy
import json
import logging
import resource
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import EarlyStoppingCallback, TrainerCallback

from supportlm.embedded import upstream_id
from supportlm.errors import SupportLMError
from supportlm.modeling import LoadedModel, load_model, prepare_model_dir
from supportlm.run_folder import RunFolder, update_latest, writing
from supportlm.train.data.dataset import PreparedDataset, prepare_dataset
from supportlm.train.data.sampling import stratified_sample
from supportlm.train.fit import distributed
from supportlm.train.fit.config import TrainConfig
from supportlm.train.fit.continued import resolve_init_adapter, run_lineage
from supportlm.train.fit.lora import check_lora_shape
from supportlm.train.fit.output_dir import prepare_output_dir
from supportlm.train.fit.run_card import write_output_dir
from supportlm.train.fit.trainer import StepTimer, SupportLMTrainer, perplexity, tokenize_examples

logger = logging.getLogger(__name__)

_SUMMARY_KEYS = (
    "train_loss",
    "eval_loss",
    "eval_perplexity",
    "global_step",
    "step_time_s",
    "train_supervised_tokens_per_second",
    "peak_memory_mb",
)


@dataclass
class TrainResult:
    output_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    #: The trained PEFT model (best checkpoint when `load_best_model_at_end`), still in memory.
    model: torch.nn.Module | None = None


def train(config: TrainConfig) -> TrainResult:
    """Load the model and data, fine-tune a LoRA adapter, and write the self-describing folder."""
    output_dir = Path(config.training.output_dir)
    training = config.training
    distributed.quiet_replicas()
    with training.main_process_first(desc="checking the output folder"):
        resume = prepare_output_dir(
            output_dir, training.resume_from_checkpoint, training.overwrite_output_dir
        )
    logger.info("Resolved config:\n%s", yaml.safe_dump(config.to_flat_dict(), sort_keys=False))
    parent = resolve_init_adapter(config.model.init_adapter)
    with training.main_process_first(desc="loading (and converting) the model, reading data"):
        loaded = _load_model(config, parent)
        prepared = _prepare_data(config, loaded)
    trainer, timer = _build_trainer(config, loaded, prepared, output_dir)
    train_output = trainer.train(resume_from_checkpoint=resume)
    eval_metrics = final_eval_metrics(trainer)  # every rank: it may evaluate, a collective step
    metrics = _metrics(loaded, prepared, trainer, timer, train_output, eval_metrics)
    if not distributed.is_main():
        return TrainResult(output_dir=output_dir, metrics=metrics, model=trainer.model)
    with writing(output_dir) as run:
        trainer.save_model(str(run.path))
        write_output_dir(run, config, loaded, trainer, metrics, prepared)
        run.write_record(loaded.source.name, run_lineage(config, parent))
    if parent is None:
        update_latest(RunFolder(output_dir))
    else:
        logger.info(
            "A candidate continued from %s: compare it (finetune/evaluate.py --adapter %s "
            "--against %s), then serve it with finetune/promote.py.",
            parent.path, output_dir, parent.path,
        )  # fmt: skip
    logger.info("Metrics: %s", json.dumps({k: metrics[k] for k in _SUMMARY_KEYS}))
    logger.info("Adapter and model card written to %s", output_dir)
    return TrainResult(output_dir=output_dir, metrics=metrics, model=trainer.model)


def _load_model(config: TrainConfig, parent: RunFolder | None = None) -> LoadedModel:
    model_args = config.model
    loaded = load_model(
        model_args.model_name_or_path,
        quantization=model_args.quantization,
        dtype=model_args.dtype,
        device=model_args.device,
        adapter=None if parent is None else str(parent.path),
        is_trainable=True,
    )
    if parent is not None:
        check_lora_shape(parent, loaded.model, config.lora)
    if loaded.device == "cpu":
        # One thread per physical core: hyper-threads share the FMA units and only add contention.
        torch.set_num_threads(distributed.threads_per_rank(physical_cores()))
        logger.info(
            "CPU threads: %d per process, %d process(es)",
            torch.get_num_threads(), distributed.world_size(),
        )  # fmt: skip
    # PEFT records the model's `name_or_path` as the adapter's base_model_name_or_path: the
    # upstream Hub id (or the folder transformers read), so plain PEFT can load the adapter;
    # supportlm's own spec ("embedded", a .gguf path) goes into supportlm_run.json.
    if loaded.source.kind == "embedded":
        loaded.model.name_or_path = upstream_id(loaded.source.name)
    else:
        loaded.model.name_or_path = prepare_model_dir(loaded.source)
    return loaded


def _prepare_data(config: TrainConfig, loaded: LoadedModel) -> PreparedDataset:
    prepared = prepare_dataset(
        config.data, loaded.tokenizer, system_prompt=config.model.system_prompt
    )
    logger.info("Data report:\n%s", prepared.report.to_markdown())
    return prepared


def _build_trainer(
    config: TrainConfig, loaded: LoadedModel, prepared: PreparedDataset, output_dir: Path
) -> tuple[SupportLMTrainer, StepTimer]:
    args = config.training
    splits = {"train": prepared.splits["train"], "validation": validation_sample(config, prepared)}
    datasets = {
        name: tokenize_examples(
            splits[name],
            loaded.tokenizer,
            system_prompt=config.model.system_prompt,
            assistant_only_loss=config.data.assistant_only_loss,
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
        # A continued adapter is already a PeftModel, trainable: TRL trains it as it is.
        peft_config=None if loaded.adapter else config.lora.to_peft_config(),
        callbacks=callbacks,
    )
    _log_sizes(trainer, prepared)
    return trainer, timer


def validation_sample(config: TrainConfig, prepared: PreparedDataset) -> list:
    """What each evaluation scores: the validation split or its fixed stratified sample.

    Why a sample: on the Bitext data a pass over the whole split (355 conversations) cost ~4.5
    minutes, a third of the run at the default `eval_steps`. The sample is fixed (same questions
    at every evaluation), so checkpoints are compared on equal terms and early stopping sees
    the change of the loss, not a new draw of questions.
    """
    validation = prepared.splits["validation"]
    size = config.data.max_eval_examples
    if not size or len(validation) <= size:
        return validation
    sample = stratified_sample(validation, size)
    logger.info("Validation: a fixed stratified sample of %d of %d.", size, len(validation))
    return sample


def _log_sizes(trainer: SupportLMTrainer, prepared: PreparedDataset) -> None:
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


def final_eval_metrics(trainer: SupportLMTrainer) -> dict[str, float]:
    """The validation loss of the adapter being saved, evaluated again only if not yet known.

    With `load_best_model_at_end` the saved adapter is the best checkpoint, whose loss the trainer
    kept (`best_metric`); otherwise the last scheduled evaluation scored the final weights when
    it ran at the last step. Only when neither holds is the validation set scored once more.
    """
    if trainer.eval_dataset is None:
        return {}
    args, state = trainer.args, trainer.state
    loss = None
    if args.load_best_model_at_end and args.metric_for_best_model in ("eval_loss", "loss"):
        loss = state.best_metric
    else:
        last = next((log for log in reversed(state.log_history) if "eval_loss" in log), None)
        if last is not None and last.get("step") == state.global_step:
            loss = last["eval_loss"]
    if loss is None:
        return trainer.evaluate()
    return {"eval_loss": loss, "eval_perplexity": perplexity(loss)}


def _metrics(loaded, prepared, trainer, timer, train_output, eval_metrics) -> dict[str, Any]:
    memory, memory_kind = peak_memory_mb(loaded.device)
    evaluations = [log for log in trainer.state.log_history if "eval_runtime" in log]
    supervised = distributed.sum_over_ranks(trainer.supervised_tokens)  # all ranks' batches
    return {
        "train_loss": train_output.training_loss,
        "eval_loss": eval_metrics.get("eval_loss"),
        "eval_perplexity": eval_metrics.get("eval_perplexity"),
        "global_step": trainer.state.global_step,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "train_runtime_s": train_output.metrics.get("train_runtime"),
        # Validation inside the run (included in train_runtime_s): how often and how long.
        "evaluations": len(evaluations),
        "eval_runtime_s": sum(log["eval_runtime"] for log in evaluations),
        "step_time_s": timer.seconds,
        "train_supervised_tokens": supervised,
        "train_supervised_tokens_per_second": supervised / timer.seconds if timer.seconds else None,
        "processes": distributed.world_size(),
        "cpu_threads_per_process": torch.get_num_threads() if loaded.device == "cpu" else None,
        "peak_memory_mb": round(memory, 1),
        "peak_memory_kind": memory_kind,
        "dataset_sizes": prepared.report.splits,
        # Conversations each evaluation scored (`max_eval_examples` of the validation split).
        "eval_examples": len(trainer.eval_dataset) if trainer.eval_dataset is not None else 0,
        "parameters": parameter_counts(trainer.model),
        "device": loaded.device,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "quantization": loaded.quantization,
    }


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
