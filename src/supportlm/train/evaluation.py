"""Base model vs fine-tuned adapter on held-out conversations, for `finetune/evaluate.py`.

Both are evaluated on ONE loaded model: the PEFT adapter is switched off for "base" and on for
"tuned", so the comparison costs one model's memory and the two can never differ in anything but
the adapter. Each held-out conversation is cut before its last assistant turn: everything before
it (with the system prompt the adapter was trained with) is the prompt, and the last assistant
message is the reference. Answers are decoded greedily through the app's own engine
(`supportlm.engines.transformers.TransformersEngine`), so what is measured is what users get.

Which data, by default: the test split of the data the adapter was trained on. The adapter folder
holds the data settings of its run (``training_config.yaml``), and splits are a hash of each
first user message, so re-splitting with the same ratios gives exactly the held-out questions.
With ``--dataset`` another file is used: all of it when it is not the training data (the adapter
never saw it), its test split when it is (the rest was trained on). ``--split`` overrides both.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from supportlm.embedded import EMBEDDED_MODEL
from supportlm.engines.base import GenerationSettings
from supportlm.engines.transformers import TransformersEngine
from supportlm.errors import SupportLMError
from supportlm.modeling import LoadedModel, adapter_base_model, load_model
from supportlm.prompts import DEFAULT_SYSTEM_PROMPT, encode_chat, with_system_prompt
from supportlm.run_folder import TRAINING_CONFIG_FILE, PromptStyle, RunFolder
from supportlm.train.data import DEFAULT_DATASET, Example
from supportlm.train.dataset import prepare_dataset, sample_examples
from supportlm.train.metrics import answer_nll, latency_summary, pooled_perplexity, text_metrics

logger = logging.getLogger(__name__)

SPLIT_CHOICES = ("auto", "test", "all")
#: Metrics in report order, with whether a higher value is better.
METRICS: dict[str, bool] = {
    "rougeL": True,
    "chrf": True,
    "bleu": True,
    "perplexity": False,
    "latency_mean_s": False,
    "latency_p95_s": False,
}
VARIANTS = ("base", "tuned")


@dataclass
class EvaluationArguments:
    """What `finetune/evaluate.py` compares, on which data, and where the report goes."""

    adapter: str | None = field(
        default=None,
        metadata={
            "help": "LoRA adapter folder written by finetune/train.py. Without it only the base "
            "model is evaluated (tuned = null), e.g. to measure the starting point."
        },
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Base model; default: the one the adapter was trained on, else 'embedded'."
        },
    )
    dataset: str | None = field(
        default=None,
        metadata={
            "help": "Evaluation data (.jsonl/.csv/.json or Hub id); default: the adapter's "
            "training data, of which the test split is used."
        },
    )
    split: str = field(
        default="auto",
        metadata={
            "help": "test: the held-out split; all: every example; auto: test for the adapter's "
            "own training data, all for any other dataset.",
            "choices": list(SPLIT_CHOICES),
        },
    )
    limit: int | None = field(
        default=None,
        metadata={
            "help": "Evaluate this many examples: a deterministic sample (smallest content "
            "hash), so a larger limit extends a smaller one and the tasks stay mixed."
        },
    )
    max_new_tokens: int = field(default=128, metadata={"help": "Most tokens per answer."})
    repetition_penalty: float = field(
        default=GenerationSettings.repetition_penalty,
        metadata={"help": "Repetition penalty of the greedy decoding (the app's default)."},
    )
    batch_size: int = field(
        default=4, metadata={"help": "Conversations per forward pass when scoring perplexity."}
    )
    num_shown: int = field(
        default=5, metadata={"help": "How many answers the report quotes side by side."}
    )
    output: str | None = field(
        default=None,
        metadata={
            "help": "Report JSON; FILE.md and FILE.png are written next to it. Default: "
            "<adapter>/eval.json, or outputs/eval-base.json without an adapter."
        },
    )

    def __post_init__(self) -> None:
        if self.split not in SPLIT_CHOICES:
            raise SupportLMError(
                f"Unknown split {self.split!r}; choose one of {', '.join(SPLIT_CHOICES)}."
            )
        if self.limit is not None and self.limit < 1:
            raise SupportLMError(f"limit must be at least 1, got {self.limit}.")
        if self.batch_size < 1:
            raise SupportLMError(f"batch_size must be at least 1, got {self.batch_size}.")
        if self.output is not None and not self.output.endswith(".json"):
            raise SupportLMError(f"output must be a .json file, got {self.output}.")
        # Raises on invalid values before any model is loaded.
        self.generation_settings()

    def generation_settings(self) -> GenerationSettings:
        return GenerationSettings(
            max_new_tokens=self.max_new_tokens,
            temperature=0.0,
            repetition_penalty=self.repetition_penalty,
        )

    @property
    def output_path(self) -> Path:
        if self.output is not None:
            return Path(self.output)
        if self.adapter is not None and Path(self.adapter).is_dir():
            return Path(self.adapter) / "eval.json"
        return Path("outputs") / "eval-base.json"


@dataclass
class EvaluationData:
    """The examples to evaluate and where they come from, in words for the report."""

    examples: list[Example]
    dataset: str
    split: str  # "test" | "all"
    reason: str
    max_seq_length: int
    num_available: int


# ---------------------------------------------------------------------------------------------
# What to evaluate
# ---------------------------------------------------------------------------------------------


def check_adapter(adapter: str) -> str | None:
    """The base model `adapter` was trained on; raises if the adapter cannot be read."""
    if not Path(adapter).expanduser().exists() and adapter.startswith((".", "/", "~")):
        raise SupportLMError(f"Adapter folder {adapter} does not exist.")
    try:
        return adapter_base_model(adapter)
    except SupportLMError as error:
        if not Path(adapter).expanduser().exists():
            raise SupportLMError(
                f"Adapter folder {adapter} does not exist (and it is no Hub adapter that could be "
                "downloaded); train one with finetune/train.py."
            ) from error
        raise


def _same_dataset(a: str, b: str) -> bool:
    def key(name: str) -> str:
        path = Path(name).expanduser()
        return str(path.resolve()) if path.exists() else name.rstrip("/")

    return key(a) == key(b)


def select_data(
    args: EvaluationArguments,
    tokenizer: Any,
    system_prompt: str,
    training: Any,
    context_length: int,
) -> EvaluationData:
    """Load and split the evaluation data as `args` asks; see the module docstring."""
    trained_on = training.data.dataset if training else None
    dataset = args.dataset or trained_on or DEFAULT_DATASET
    is_training_data = trained_on is not None and _same_dataset(dataset, trained_on)
    # The training run's ratios reproduce its split exactly; without one, the data module's
    # defaults (those of a default training run) apply, and only the context length limits.
    if is_training_data:
        data_args = {
            "validation_ratio": training.data.validation_ratio,
            "test_ratio": training.data.test_ratio,
            "max_seq_length": training.data.max_seq_length,
        }
    else:
        data_args = {"max_seq_length": context_length}

    split = args.split
    if split == "auto":
        split = "test" if args.dataset is None or is_training_data else "all"
    if split == "test" and is_training_data:
        reason = "held out from the adapter's training data (same ratios, same hash)"
    elif split == "test":
        reason = "by hash of the first user message, default ratios"
    elif trained_on is None:
        reason = "no training data recorded to hold out"
    elif is_training_data:
        reason = "INCLUDING those the adapter was trained on: scores are optimistic"
        logger.warning("Evaluating on the adapter's own training data: %s", reason)
    else:
        reason = f"the adapter was trained on other data ({trained_on})"

    prepared = prepare_dataset(
        dataset, tokenizer, system_prompt=system_prompt, strict=False, **data_args
    )
    if split == "test":
        examples = prepared.splits["test"]
    else:
        examples = [example for part in prepared.splits.values() for example in part]
    if not examples:
        raise SupportLMError(
            f"The {split} split of {dataset} is empty; use a larger dataset or --split all."
        )
    available = len(examples)
    if args.limit is not None:
        examples = sample_examples(examples, args.limit)
    return EvaluationData(
        examples=examples,
        dataset=str(dataset),
        split=split,
        reason=reason,
        max_seq_length=data_args["max_seq_length"],
        num_available=available,
    )


# ---------------------------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------------------------


def _adapter_switch(loaded: LoadedModel, use_adapter: bool):
    if use_adapter or loaded.adapter is None:
        return nullcontext()
    return loaded.model.disable_adapter()


def _scores(
    answers: list[str],
    references: list[str],
    nll: list[tuple[float, int]],
    latencies: list[float],
    new_tokens: list[int],
) -> dict[str, float]:
    return {
        **text_metrics(answers, references),
        "perplexity": pooled_perplexity(nll),
        **latency_summary(latencies),
        # Latency grows with answer length: this tells a faster model from a terser one.
        "new_tokens_mean": sum(new_tokens) / len(new_tokens),
    }


def compare(
    loaded: LoadedModel,
    examples: list[Example],
    *,
    system_prompt: str,
    settings: GenerationSettings,
    batch_size: int = 4,
    num_shown: int = 5,
) -> dict[str, Any]:
    """Perplexity, text metrics and latency of base (and tuned, when an adapter is loaded).

    Returns ``{"base": {...}, "tuned": {...} | None, "by_task": {...}, "examples": [...]}``.
    """
    variants = list(VARIANTS) if loaded.adapter is not None else ["base"]
    tokenizer = loaded.tokenizer
    conversations = [with_system_prompt(example.messages, system_prompt) for example in examples]
    references = [conversation[-1]["content"] for conversation in conversations]
    prompts = [encode_chat(tokenizer, conversation[:-1]) for conversation in conversations]

    nll: dict[str, list[tuple[float, int]]] = {}
    for variant in variants:
        logger.info("Scoring perplexity of the %s model on %d references.", variant, len(examples))
        with _adapter_switch(loaded, variant == "tuned"):
            nll[variant] = answer_nll(loaded.model, tokenizer, conversations, batch_size=batch_size)

    engine = TransformersEngine.from_loaded(loaded)
    answers: dict[str, list[str]] = {variant: [] for variant in variants}
    latencies: dict[str, list[float]] = {variant: [] for variant in variants}
    new_tokens: dict[str, list[int]] = {variant: [] for variant in variants}
    for prompt_ids in tqdm(prompts, desc="Generating", unit="example"):
        for variant in variants:
            request = engine.request(prompt_ids, settings, use_adapter=variant == "tuned")
            event = engine.generate(request)
            answers[variant].append(event.text.strip())
            latencies[variant].append(event.elapsed)
            new_tokens[variant].append(event.num_tokens)

    result: dict[str, Any] = {variant: None for variant in VARIANTS}
    for variant in variants:
        result[variant] = _scores(
            answers[variant], references, nll[variant], latencies[variant], new_tokens[variant]
        )

    by_task: dict[str, list[int]] = defaultdict(list)
    for index, example in enumerate(examples):
        if "task" in example.meta:
            by_task[example.meta["task"]].append(index)
    result["by_task"] = {
        task: {
            "n_examples": len(indices),
            **{
                variant: (
                    _scores(
                        [answers[variant][i] for i in indices],
                        [references[i] for i in indices],
                        [nll[variant][i] for i in indices],
                        [latencies[variant][i] for i in indices],
                        [new_tokens[variant][i] for i in indices],
                    )
                    if variant in variants
                    else None
                )
                for variant in VARIANTS
            },
        }
        for task, indices in sorted(by_task.items())
    }
    result["examples"] = [
        {
            "task": examples[i].meta.get("task"),
            "question": next(
                m["content"] for m in reversed(conversations[i][:-1]) if m["role"] == "user"
            ),
            "reference": references[i],
            **{
                variant: answers[variant][i] if variant in variants else None
                for variant in VARIANTS
            },
        }
        for i in range(min(num_shown, len(examples)))
    ]
    return result


def evaluate(args: EvaluationArguments) -> dict[str, Any]:
    """Everything `finetune/evaluate.py` does but writing files: the report as a dict."""
    training = None
    model_spec = args.model_name_or_path
    style = PromptStyle(DEFAULT_SYSTEM_PROMPT)
    if args.adapter is not None:
        recorded_base = check_adapter(args.adapter)
        model_spec = model_spec or recorded_base
        run = RunFolder(args.adapter)
        if run.is_adapter():
            training = run.training_config()
            style = run.prompt_style()
        if training is None and args.dataset is None:
            raise SupportLMError(
                f"Adapter {args.adapter} has no {TRAINING_CONFIG_FILE}, so its held-out data is "
                "unknown; pass --dataset."
            )
    system_prompt = style.system_prompt
    loaded = load_model(model_spec or EMBEDDED_MODEL, adapter=args.adapter)
    if style.chat_template:
        # Serve with the template the adapter was trained with (saved next to it).
        loaded.tokenizer.chat_template = style.chat_template
    context_length = int(getattr(loaded.model.config, "max_position_embeddings", 2048))
    data = select_data(args, loaded.tokenizer, system_prompt, training, context_length)
    settings = args.generation_settings()
    logger.info(
        "Evaluating %s on %d of %d examples of %s (%s); greedy, max_new_tokens %d.",
        "base vs tuned" if args.adapter else "the base model only",
        len(data.examples),
        data.num_available,
        data.dataset,
        data.reason,
        settings.max_new_tokens,
    )
    result = compare(
        loaded,
        data.examples,
        system_prompt=system_prompt,
        settings=settings,
        batch_size=args.batch_size,
        num_shown=args.num_shown,
    )
    return {
        "base": result["base"],
        "tuned": result["tuned"],
        "n_examples": len(data.examples),
        "dataset": data.dataset,
        "split": data.split,
        "split_reason": data.reason,
        "n_available": data.num_available,
        "max_seq_length": data.max_seq_length,
        "adapter": args.adapter,
        "model": loaded.source.name,
        "model_description": loaded.description,
        "system_prompt": system_prompt,
        "generation": settings.to_dict(),
        "by_task": result["by_task"],
        "examples": result["examples"],
    }


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------


def _format(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def _change(metric: str, base: float, tuned: float) -> str:
    better = (tuned > base) == METRICS[metric] if tuned != base and metric in METRICS else None
    mark = "" if better is None else (" ✓" if better else " ✗")
    return f"{tuned - base:+.3g}{mark}"


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: settings, a metric table, per-task tables and sample answers."""
    base, tuned = report["base"], report["tuned"]
    split = "test split" if report["split"] == "test" else "all examples"
    lines = [
        "# Evaluation: base vs fine-tuned" if tuned else "# Evaluation: base model",
        "",
        f"- Model: {report['model_description']}",
        f"- Adapter: {report['adapter'] or 'none'}",
        f"- Data: {report['dataset']}, {split}: {report['split_reason']}",
        f"- Examples: {report['n_examples']} of {report['n_available']}",
        f"- Decoding: greedy, max_new_tokens {report['generation']['max_new_tokens']}, "
        f"repetition_penalty {report['generation']['repetition_penalty']}",
        "",
        "ROUGE-L, chrF and BLEU: 0-100, higher is better. Perplexity on the reference answers and "
        "latency: lower is better. new_tokens_mean: answer length, for reading the latencies.",
        "",
    ]
    lines += _metric_table(base, tuned)
    for task, scores in report["by_task"].items():
        count = scores["n_examples"]
        lines += ["", f"## Task: {task} ({count} example{'s' if count != 1 else ''})", ""]
        lines += _metric_table(scores["base"], scores["tuned"])
    lines += ["", "## Sample answers", ""]
    for number, example in enumerate(report["examples"], start=1):
        task = f" ({example['task']})" if example.get("task") else ""
        lines += [f"### {number}{task}", "", "**Question**", "", _quote(example["question"])]
        lines += ["", "**Reference**", "", _quote(example["reference"])]
        lines += ["", "**Base**", "", _quote(example["base"])]
        if example.get("tuned") is not None:
            lines += ["", "**Tuned**", "", _quote(example["tuned"])]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _metric_table(base: dict[str, float], tuned: dict[str, float] | None) -> list[str]:
    # Answer length is context for the latencies, neither better nor worse.
    metrics = [*METRICS, "new_tokens_mean"]
    if tuned is None:
        rows = ["| metric | base |", "|---|---:|"]
        return rows + [f"| {metric} | {_format(base[metric])} |" for metric in metrics]
    rows = ["| metric | base | tuned | change |", "|---|---:|---:|---:|"]
    return rows + [
        f"| {metric} | {_format(base[metric])} | {_format(tuned[metric])} | "
        f"{_change(metric, base[metric], tuned[metric])} |"
        for metric in metrics
    ]


def _quote(text: str) -> str:
    return "\n".join(f"> {line}" if line else ">" for line in (text or "(empty)").splitlines())


def plot_report(report: dict[str, Any], path: str | Path) -> None:
    """A bar chart of every metric, base vs tuned side by side, one panel per metric."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt

    variants = [variant for variant in VARIANTS if report[variant] is not None]
    colors = {"base": "#9e9e9e", "tuned": "#1f77b4"}
    figure, axes = plt.subplots(1, len(METRICS), figsize=(2.4 * len(METRICS), 3.2))
    for axis, (metric, higher_is_better) in zip(axes, METRICS.items(), strict=True):
        values = [report[variant][metric] for variant in variants]
        bars = axis.bar(variants, values, color=[colors[v] for v in variants])
        axis.bar_label(bars, labels=[_format(v) for v in values], fontsize=8)
        axis.set_title(f"{metric}\n({'higher' if higher_is_better else 'lower'} is better)")
        # Every metric is >= 0; headroom above the tallest bar for its label.
        axis.set_ylim(0, max(values) * 1.2 or 1.0)
        axis.tick_params(axis="y", labelsize=8)
    figure.suptitle(f"{report['model']} · {report['n_examples']} examples ({report['split']})")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(report: dict[str, Any], output: str | Path) -> dict[str, Path]:
    """Write FILE.json, FILE.md and FILE.png; returns the three paths."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": output,
        "markdown": output.with_suffix(".md"),
        "plot": output.with_suffix(".png"),
    }
    paths["json"].write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    paths["markdown"].write_text(render_markdown(report), encoding="utf-8")
    plot_report(report, paths["plot"])
    return paths
