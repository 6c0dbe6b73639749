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
* ours: `supportlm.train.fit.trainer.train` with its defaults (group by length, supervised-only
  head, one thread per physical core, no activation checkpointing, micro-batches of
  ``--micro_batch_size`` accumulated to ``--batch_size``), validating a fixed stratified sample of
  ``--eval_examples`` every ``--eval_steps`` steps, as a default run does;
* packed: ours with TRL's best-fit packing (``packing``: conversations packed into sequences of
  ``--max_seq_length`` tokens, position ids restart at each conversation and no attention mask,
  so no token attends to another conversation), as many packed sequences per step as hold
  ``--batch_size`` conversations of the training split's mean length.

Validation cost, the same validation conversations for every variant (batches of
``--batch_size``): ``eval_seconds_per_batch`` is a variant's own validation pass (naive: full
logits; trl: `SFTTrainer.evaluate` with its defaults; ours: our trainer's evaluation), and
``train_seconds_per_step`` its optimizer step. ``eval_cost_ratio`` is ours' eval batch over its
training step; ``eval_time_fraction`` is the share of ours' training wall time spent validating
at ``--eval_steps`` (run ``--steps`` as a multiple of it).

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
VARIANTS = ("naive", "trl", "ours", "packed")
MEMORY_VARIANTS = ("qlora", "lora16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from supportlm.train.data.examples import DEFAULT_DATASET

    default_dataset = str(BITEXT_CSV) if BITEXT_CSV.is_file() else DEFAULT_DATASET
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded", help="Model spec (see supportlm.modeling).")
    parser.add_argument("--dataset", default=default_dataset, help="Training data file or Hub id.")
    parser.add_argument("--steps", type=int, default=20, help="Optimizer steps per variant.")
    parser.add_argument("--batch_size", type=int, default=8, help="Conversations per step.")
    parser.add_argument(
        "--micro_batch_size", type=int, default=1, help="Ours: conversations per forward pass."
    )
    parser.add_argument("--eval_steps", type=int, default=20, help="Ours: validate every N steps.")
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--max_seq_length", type=int, default=256)
    parser.add_argument(
        "--max_examples", type=int, default=2000, help="Sample of the dataset (tokenising is slow)."
    )
    parser.add_argument(
        "--eval_examples", type=int, default=96, help="Validation sample (as max_eval_examples)."
    )
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
    from supportlm.train.data.arguments import DataArguments
    from supportlm.train.data.dataset import prepare_dataset
    from supportlm.train.data.sampling import stratified_sample

    tokenizer = load_tokenizer(args.model)
    data = DataArguments(
        dataset=args.dataset, max_seq_length=args.max_seq_length, max_examples=args.max_examples
    )
    prepared = prepare_dataset(data, tokenizer, system_prompt=DEFAULT_SYSTEM_PROMPT)
    # The sample our trainer validates on with max_eval_examples = eval_examples: the same rows.
    validation = stratified_sample(prepared.splits["validation"], args.eval_examples)
    return tokenizer, prepared.splits["train"], validation


def load_base(args: argparse.Namespace):
    from supportlm.modeling import load_model

    return load_model(
        args.model, quantization="none", dtype="float32", device="cpu", is_trainable=True
    )


def lora_config():
    from supportlm.train.fit.lora import LoraArguments

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
    return timed_validation(model, dataset, pad_token_id, batch_size)[0]


@torch.no_grad()
def timed_validation(model, dataset, pad_token_id: int, batch_size: int) -> tuple[float, float]:
    """`validation_loss` and the seconds it took per batch (the naive loop's validation)."""
    started = time.perf_counter()
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
    batches = -(-len(rows) // batch_size)
    return total / count, (time.perf_counter() - started) / batches


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------------------------


def run_naive(args: argparse.Namespace) -> dict[str, Any]:
    from peft import get_peft_model

    from supportlm.prompts import DEFAULT_SYSTEM_PROMPT
    from supportlm.train.fit.trainer import tokenize_examples

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
    loss, eval_per_batch = timed_validation(model, val_set, tokenizer.pad_token_id, args.batch_size)
    summary = summarize(tokens, seconds, loss, args.steps)
    return {**summary, "eval_seconds_per_batch": eval_per_batch}


def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from supportlm.prompts import DEFAULT_SYSTEM_PROMPT, with_system_prompt
    from supportlm.train.fit.trainer import StepTimer, tokenize_examples

    tokenizer, train_examples, validation = prepare(args)
    val_set = tokenize_examples(validation, tokenizer, system_prompt=DEFAULT_SYSTEM_PROMPT)

    def prompt_completion(examples):
        rows = []
        for example in examples:
            messages = with_system_prompt(example.messages, DEFAULT_SYSTEM_PROMPT)
            rows.append({"prompt": messages[:-1], "completion": messages[-1:]})
        return Dataset.from_list(rows)

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
            per_device_eval_batch_size=args.batch_size,
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
            train_dataset=prompt_completion(train_examples),
            eval_dataset=prompt_completion(validation),
            processing_class=tokenizer,
            peft_config=lora_config(),
            data_collator=counting_collator,
            callbacks=[timer],
        )
        trainer.train()
        counted_before = counted["tokens"]
        runtime = trainer.evaluate()["eval_runtime"]  # TRL's own validation, its defaults
        counted["tokens"] = counted_before
    loss = validation_loss(trainer.model, val_set, tokenizer.pad_token_id)
    summary = summarize(counted["tokens"], timer.seconds, loss, args.steps)
    return {**summary, "eval_seconds_per_batch": runtime / -(-len(validation) // args.batch_size)}


def run_ours(
    args: argparse.Namespace, quantization: str | None = None, packed: bool = False
) -> dict[str, Any]:
    from supportlm.prompts import DEFAULT_SYSTEM_PROMPT
    from supportlm.train.fit.config import parse_config
    from supportlm.train.fit.run import train
    from supportlm.train.fit.trainer import tokenize_examples

    tokenizer, train_examples, validation = prepare(args)
    val_set = tokenize_examples(validation, tokenizer, system_prompt=DEFAULT_SYSTEM_PROMPT)
    micro = min(args.micro_batch_size, args.batch_size)
    settings = {"per_device_train_batch_size": micro, "gradient_accumulation_steps": 1}
    settings["gradient_accumulation_steps"] = max(1, args.batch_size // micro)
    if packed:
        # Packed sequences per step that hold batch_size conversations of the mean length.
        mean = sum(len(e.encoded["input_ids"]) for e in train_examples) / len(train_examples)
        per_step = max(1, round(args.batch_size * mean / args.max_seq_length))
        settings = {"per_device_train_batch_size": 1, "gradient_accumulation_steps": per_step}
        settings |= {"packing": True, "eval_packing": False}
    validating = quantization is None and args.eval_steps > 0
    with tempfile.TemporaryDirectory() as output_dir:
        settings |= {
            "model_name_or_path": args.model,
            "dataset": args.dataset,
            "max_examples": args.max_examples,
            "max_seq_length": args.max_seq_length,
            "max_steps": args.steps,
            "per_device_eval_batch_size": args.batch_size,
            "max_eval_examples": args.eval_examples,
            "learning_rate": args.learning_rate,
            "output_dir": output_dir,
            # Validation as a default run does it; no checkpoints, early stopping or loggers.
            "eval_strategy": "steps" if validating else "no",
            "eval_steps": max(args.eval_steps, 1),
            "save_strategy": "no",
            "load_best_model_at_end": False,
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
    tokens, seconds = metrics["train_supervised_tokens"], metrics["step_time_s"]
    summary = summarize(tokens, seconds, loss, args.steps)
    summary["micro_batch"] = settings["per_device_train_batch_size"]
    summary["accumulation"] = settings["gradient_accumulation_steps"]
    for key in ("peak_memory_mb", "peak_memory_kind", "dtype", "quantization"):
        summary[key] = metrics.get(key)
    if metrics.get("evaluations"):
        batches = metrics["evaluations"] * -(-metrics["eval_examples"] // args.batch_size)
        summary["eval_seconds_per_batch"] = metrics["eval_runtime_s"] / batches
        summary["eval_time_fraction"] = metrics["eval_runtime_s"] / metrics["train_runtime_s"]
    return summary


def summarize(tokens: int, seconds: float, eval_loss: float, steps: int) -> dict[str, Any]:
    return {
        "supervised_tokens": tokens,
        "train_seconds": round(seconds, 2),
        "train_seconds_per_step": seconds / steps,
        "supervised_tokens_per_second": round(tokens / seconds, 1) if seconds else None,
        "eval_loss": round(eval_loss, 4),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


RUNNERS = {
    "naive": run_naive,
    "trl": run_trl,
    "ours": run_ours,
    "packed": lambda args: run_ours(args, packed=True),
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
        "micro_batch_size": args.micro_batch_size,
        "eval_steps": args.eval_steps,
        "eval_examples": args.eval_examples,
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
    if "eval_seconds_per_batch" in results.get("ours", {}):
        ours = results["ours"]
        report["eval_cost_ratio"] = ours["eval_seconds_per_batch"] / ours["train_seconds_per_step"]
        report["eval_time_fraction"] = ours["eval_time_fraction"]
    if {"ours", "packed"} <= results.keys():
        report["packed_speedup"] = (
            results["packed"]["supervised_tokens_per_second"]
            / results["ours"]["supervised_tokens_per_second"]
        )
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
