"""Training speed on this machine: a naive loop vs TRL's SFTTrainer defaults vs supportlm's trainer.

    python bench/train.py --steps 20 --json bench/train.json

All three variants train the same LoRA adapter (r 16, alpha 32, all linear layers) on the same
model and training split, with the same batch size, learning rate and number of optimizer steps:

* naive: a hand-written loop; random order, pad to the longest sequence of each batch, the
  model's own loss over the full ``(batch, length, vocabulary)`` logits;
* trl: `SFTTrainer` with its defaults (activation checkpointing on, random order, its fused
  log-prob head) on the conversational dataset. SmolLM2's chat template has no TRL training
  template, so ``assistant_only_loss`` is unavailable; the data is given in TRL's
  prompt/completion form, whose default ``completion_only_loss`` supervises the last assistant
  answer (every example of the Bitext data is single-turn). Only bf16 is turned off: it is
  emulated on this CPU and would make TRL several times slower;
* ours: `supportlm.train.trainer.train` with its defaults (group by length, supervised-only head,
  one thread per physical core, no activation checkpointing), evaluation off while timing.

Memory, QLoRA against 16-bit LoRA (run it on a GPU; ``--variants qlora,lora16``):

* qlora: ours with the base model in 4-bit NF4 (bitsandbytes, double quantisation);
* lora16: ours with the base model unquantised in its auto dtype (bf16 on GPUs that have it).

    python bench/train.py --model Qwen/Qwen2.5-0.5B-Instruct --variants qlora,lora16 --steps 10 \
        --json docs/bench/memory.json

`qlora_memory_ratio` is qlora's peak over lora16's (target <= 0.5). On CUDA the peak is
`torch.cuda.max_memory_allocated`; on a CPU it is the process's peak RSS, where 4-bit weights
save less (bitsandbytes de-quantises per layer and the activations dominate).

Each variant runs in its own process, so the peak RSS is its own. Throughput is supervised
(answer) tokens per second of optimizer steps; the final validation loss is computed the same way
for all three (token-weighted mean over our answer-only labels).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
BITEXT_CSV = REPO_ROOT.parent / "shared" / "data" / "bitext-customer-support" / "train.csv"
VARIANTS = ("naive", "trl", "ours")
MEMORY_VARIANTS = ("qlora", "lora16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from supportlm.train.data import DEFAULT_DATASET

    default_dataset = str(BITEXT_CSV) if BITEXT_CSV.is_file() else DEFAULT_DATASET
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded", help="Model spec (see supportlm.modeling).")
    parser.add_argument("--dataset", default=default_dataset, help="Training data file or Hub id.")
    parser.add_argument("--steps", type=int, default=20, help="Optimizer steps per variant.")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--max_seq_length", type=int, default=256)
    parser.add_argument(
        "--max_examples", type=int, default=2000, help="Sample of the dataset (tokenising is slow)."
    )
    parser.add_argument("--eval_examples", type=int, default=64, help="Validation examples.")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json", type=Path, help="Write the results here.")
    parser.add_argument("--variant", choices=VARIANTS + MEMORY_VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------


def prepare(args: argparse.Namespace):
    from supportlm.modeling import load_tokenizer
    from supportlm.prompts import DEFAULT_SYSTEM_PROMPT
    from supportlm.train.dataset import prepare_dataset

    tokenizer = load_tokenizer(args.model)
    prepared = prepare_dataset(
        args.dataset,
        tokenizer,
        system_prompt=DEFAULT_SYSTEM_PROMPT,
        max_seq_length=args.max_seq_length,
        max_examples=args.max_examples,
    )
    validation = prepared.splits["validation"][: args.eval_examples]
    return tokenizer, prepared.splits["train"], validation


def load_base(args: argparse.Namespace):
    from supportlm.modeling import load_model

    return load_model(
        args.model, quantization="none", dtype="float32", device="cpu", is_trainable=True
    )


def lora_config():
    from supportlm.train.config import LoraArguments

    return LoraArguments().to_peft_config()


def pad_batch(features: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence of the batch; labels padded with -100."""
    longest = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), longest), pad_token_id)
    labels = torch.full((len(features), longest), -100)
    attention_mask = torch.zeros((len(features), longest), dtype=torch.long)
    for row, feature in enumerate(features):
        n = len(feature["input_ids"])
        input_ids[row, :n] = torch.tensor(feature["input_ids"])
        labels[row, :n] = torch.tensor(feature["labels"])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def supervised_count(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != -100).sum())


@torch.no_grad()
def validation_loss(model, dataset, pad_token_id: int, batch_size: int = 8) -> float:
    """Token-weighted answer-only cross-entropy with the full logits (the reference loss)."""
    model.eval()
    total, count = 0.0, 0
    rows = list(dataset)
    for start in range(0, len(rows), batch_size):
        batch = pad_batch(rows[start : start + batch_size], pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="sum"
        )
        total += float(loss)
        count += supervised_count(batch["labels"])
    return total / count


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------------------------


def run_naive(args: argparse.Namespace) -> dict[str, Any]:
    from peft import get_peft_model

    from supportlm.prompts import DEFAULT_SYSTEM_PROMPT
    from supportlm.train.trainer import tokenize_examples

    tokenizer, train_examples, validation = prepare(args)
    train_set = tokenize_examples(train_examples, tokenizer, system_prompt=DEFAULT_SYSTEM_PROMPT)
    val_set = tokenize_examples(validation, tokenizer, system_prompt=DEFAULT_SYSTEM_PROMPT)
    torch.manual_seed(42)
    model = get_peft_model(load_base(args).model, lora_config())
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=args.learning_rate
    )
    loader = torch.utils.data.DataLoader(
        list(train_set),
        batch_size=args.batch_size,
        shuffle=True,
        collate_fn=lambda features: pad_batch(features, tokenizer.pad_token_id),
    )
    model.train()
    tokens, seconds, step = 0, 0.0, 0
    while step < args.steps:
        for batch in loader:
            start = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            seconds += time.perf_counter() - start
            tokens += supervised_count(batch["labels"])
            step += 1
            if step == args.steps:
                break
    return summarize(tokens, seconds, validation_loss(model, val_set, tokenizer.pad_token_id))


def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from supportlm.prompts import DEFAULT_SYSTEM_PROMPT, with_system_prompt
    from supportlm.train.trainer import StepTimer, tokenize_examples

    tokenizer, train_examples, validation = prepare(args)
    val_set = tokenize_examples(validation, tokenizer, system_prompt=DEFAULT_SYSTEM_PROMPT)
    rows = []
    for example in train_examples:
        messages = with_system_prompt(example.messages, DEFAULT_SYSTEM_PROMPT)
        rows.append({"prompt": messages[:-1], "completion": messages[-1:]})
    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
    counted = {"tokens": 0}

    def counting_collator(examples):
        batch = collator(examples)
        counted["tokens"] += supervised_count(batch["labels"])
        return batch

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as output_dir:
        config = SFTConfig(
            output_dir=output_dir,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            max_length=args.max_seq_length,
            bf16=False,
            report_to="none",
            save_strategy="no",
            eval_strategy="no",
            seed=42,
        )
        trainer = SFTTrainer(
            model=load_base(args).model,
            args=config,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=lora_config(),
            data_collator=counting_collator,
            callbacks=[timer],
        )
        trainer.train()
    loss = validation_loss(trainer.model, val_set, tokenizer.pad_token_id)
    return summarize(counted["tokens"], timer.seconds, loss)


def run_ours(args: argparse.Namespace, quantization: str | None = None) -> dict[str, Any]:
    from supportlm.prompts import DEFAULT_SYSTEM_PROMPT
    from supportlm.train.config import parse_config
    from supportlm.train.run import train
    from supportlm.train.trainer import tokenize_examples

    tokenizer, _, validation = prepare(args)
    val_set = tokenize_examples(validation, tokenizer, system_prompt=DEFAULT_SYSTEM_PROMPT)
    with tempfile.TemporaryDirectory() as output_dir:
        settings = {
            "model_name_or_path": args.model,
            "dataset": args.dataset,
            "max_examples": args.max_examples,
            "max_seq_length": args.max_seq_length,
            "max_steps": args.steps,
            "per_device_train_batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "output_dir": output_dir,
            # Timing the training steps only: no evaluation, checkpoints or loggers.
            "eval_strategy": "no",
            "save_strategy": "no",
            "early_stopping_patience": 0,
            "report_to": "none",
            "seed": 42,
        }
        if quantization is not None:
            settings["quantization"] = quantization
        config = parse_config(
            [item for key, value in settings.items() for item in (f"--{key}", str(value))]
        )
        result = train(config)
    loss = validation_loss(result.model, val_set, tokenizer.pad_token_id)
    metrics = result.metrics
    summary = summarize(metrics["train_supervised_tokens"], metrics["step_time_s"], loss)
    summary["peak_memory_mb"] = metrics["peak_memory_mb"]
    summary["peak_memory_kind"] = metrics["peak_memory_kind"]
    summary["dtype"] = metrics.get("dtype")
    summary["quantization"] = metrics.get("quantization")
    return summary


def summarize(tokens: int, seconds: float, eval_loss: float) -> dict[str, Any]:
    return {
        "supervised_tokens": tokens,
        "train_seconds": round(seconds, 2),
        "supervised_tokens_per_second": round(tokens / seconds, 1) if seconds else None,
        "eval_loss": round(eval_loss, 4),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


RUNNERS = {
    "naive": run_naive,
    "trl": run_trl,
    "ours": run_ours,
    "qlora": lambda args: run_ours(args, quantization="4bit"),
    "lora16": lambda args: run_ours(args, quantization="none"),
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.variant:
        import supportlm

        supportlm.setup_logging()
        result = RUNNERS[args.variant](args)
        args.result.write_text(json.dumps(result))
        return 0
    results: dict[str, Any] = {}
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
    for variant in args.variants.split(","):
        with tempfile.NamedTemporaryFile(suffix=".json") as result_file:
            command = [
                sys.executable,
                __file__,
                *_strip_json(forwarded),
                "--variant",
                variant,
                "--result",
                result_file.name,
            ]
            subprocess.run(command, check=True)
            results[variant] = json.loads(Path(result_file.name).read_text())
        print(f"{variant}: {json.dumps(results[variant])}", flush=True)
    report: dict[str, Any] = {
        "model": args.model,
        "dataset": args.dataset,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "max_seq_length": args.max_seq_length,
        "torch_threads_default": torch.get_num_threads(),
    }
    if {"naive", "trl", "ours"} <= results.keys():
        ours = results["ours"]["supervised_tokens_per_second"]
        report["speedup_vs_naive"] = round(
            ours / results["naive"]["supervised_tokens_per_second"], 3
        )
        report["speedup_vs_trl"] = round(ours / results["trl"]["supervised_tokens_per_second"], 3)
        trl_loss = results["trl"]["eval_loss"]
        report["eval_loss_delta"] = round((results["ours"]["eval_loss"] - trl_loss) / trl_loss, 4)
    if set(MEMORY_VARIANTS) <= results.keys():
        qlora, lora16 = results["qlora"], results["lora16"]
        report["qlora_memory_ratio"] = round(qlora["peak_memory_mb"] / lora16["peak_memory_mb"], 3)
        report["memory_kind"] = qlora["peak_memory_kind"]
    report.update(results)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _strip_json(argv: list[str]) -> list[str]:
    """The arguments without ``--json FILE`` (the parent writes the report)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--json":
            skip = True
        elif not arg.startswith("--json="):
            out.append(arg)
    return out


if __name__ == "__main__":
    sys.exit(main())
