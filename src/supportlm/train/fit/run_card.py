"""What a run leaves for its readers: the run folder's files, the loss plot and the model card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from trl import SFTTrainer

from supportlm.embedded import EMBEDDED_MODEL, EMBEDDED_UPSTREAM_ID
from supportlm.intent_classifier import write_intent_questions
from supportlm.modeling import LoadedModel
from supportlm.prompts import save_prompt_style
from supportlm.run_folder import (
    INTENT_QUESTIONS_FILE,
    LOSS_PLOT,
    METRICS_FILE,
    TRAINING_CONFIG_FILE,
    RunFolder,
)
from supportlm.train.data.dataset import PreparedDataset, held_out_questions
from supportlm.train.fit.config import TrainConfig


def write_output_dir(
    run: RunFolder,
    config: TrainConfig,
    loaded: LoadedModel,
    trainer: SFTTrainer,
    metrics: dict[str, Any],
    prepared: PreparedDataset,
) -> None:
    """Everything someone handed only this folder needs to serve and judge the adapter."""
    output_dir = run.path
    report = prepared.report
    # What the app's intent classifier learns from (absent when the data names no intents).
    write_intent_questions(output_dir / INTENT_QUESTIONS_FILE, prepared.splits["train"])
    run.write_split(held_out_questions(prepared.splits))
    save_prompt_style(output_dir, loaded.tokenizer, config.model.system_prompt)
    (output_dir / TRAINING_CONFIG_FILE).write_text(
        "# Reproduce this run: python finetune/train.py --config <this file>\n"
        + yaml.safe_dump(config.to_flat_dict(), sort_keys=False, allow_unicode=True)
    )
    (output_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    report.save(output_dir)
    plot_loss(trainer.state.log_history, output_dir / LOSS_PLOT)
    (output_dir / "README.md").write_text(model_card(config, loaded, metrics, report))


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
