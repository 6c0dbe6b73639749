"""Base model vs fine-tuned adapter on held-out conversations, for `finetune/evaluate.py`.

Both are evaluated on ONE loaded model: the PEFT adapter is switched off for "base" and on for
"tuned", so the comparison costs one model's memory and the two can never differ in anything but
the adapter. Each held-out conversation is cut before its last assistant turn: everything before
it (with the system prompt the adapter was trained with) is the prompt, and the last assistant
message is the reference. Answers are decoded greedily through the app's own engine
(`supportlm.train.judge.decoding`: the engine the app would pick, e.g. llama.cpp with one answer
per CPU at once), so what is measured is what users get. Perplexity is always
computed with transformers.

Which data, by default: the test split of the data the adapter was trained on. The adapter folder
holds the data settings of its run (``training_config.yaml``) and the hashes of the questions it
held out (``split.json``, `RunFolder.split`): those are scored. Folders from before ``split.json``
are re-split with the run's ratios (the split is a hash of each first user message).
With ``--dataset`` another file is used: all of it when it is not the training data (the adapter
never saw it), its test split when it is (the rest was trained on). ``--split`` overrides both.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from supportlm.embedded import EMBEDDED_MODEL
from supportlm.engines.base import GenerationSettings
from supportlm.errors import SupportLMError
from supportlm.modeling import LoadedModel, load_model
from supportlm.placeholders import ShopDetails, raw_placeholders
from supportlm.prompts import DEFAULT_SYSTEM_PROMPT, with_system_prompt
from supportlm.run_folder import TRAINING_CONFIG_FILE, PromptStyle, RunFolder
from supportlm.train.data.examples import Example
from supportlm.train.fit.config import run_config
from supportlm.train.judge.arguments import EvaluationArguments
from supportlm.train.judge.decoding import Decoder, open_decoder
from supportlm.train.judge.intents import intent_report
from supportlm.train.judge.metrics import (
    answer_nll,
    latency_summary,
    pooled_perplexity,
    text_metrics,
)
from supportlm.train.judge.selection import EvaluationData, check_adapter, select_data

logger = logging.getLogger(__name__)

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


def _adapter_switch(loaded: LoadedModel, use_adapter: bool):
    if use_adapter or loaded.adapter is None:
        return nullcontext()
    return loaded.model.disable_adapter()


@functools.cache
def _shop() -> ShopDetails:
    """The bundled shop's details, read once for every score table of a report."""
    return ShopDetails.load()


def answer_scores(
    answers: list[str],
    references: list[str],
    nll: list[tuple[float, int]],
    latencies: list[float],
    new_tokens: list[int],
    cut: list[bool],
) -> dict[str, float]:
    shop = _shop()
    reference_tokens = sum(count for _, count in nll) / len(nll)
    return {
        **text_metrics(answers, references),
        # Raw {{placeholders}} as generated, and left after the app's filling (target 0).
        "raw_placeholder_share": sum(bool(raw_placeholders(a)) for a in answers) / len(answers),
        "raw_placeholder_share_filled": sum(bool(raw_placeholders(shop.fill(a))) for a in answers)
        / len(answers),
        "perplexity": pooled_perplexity(nll),
        **latency_summary(latencies),
        # Latency grows with answer length: this tells a faster model from a terser one.
        "new_tokens_mean": sum(new_tokens) / len(new_tokens),
        # Answer length against the references' (their tokens, as perplexity counted them), and
        # how many answers max_new_tokens cut: a cap below the references' length caps ROUGE-L.
        "reference_tokens_mean": reference_tokens,
        "length_ratio": sum(new_tokens) / len(new_tokens) / reference_tokens,
        "answers_cut_share": sum(cut) / len(cut),
    }


def compare(
    loaded: LoadedModel,
    examples: list[Example],
    *,
    system_prompt: str,
    settings: GenerationSettings,
    decoder: Decoder,
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
    questions = [conversation[:-1] for conversation in conversations]

    nll: dict[str, list[tuple[float, int]]] = {}
    for variant in variants:
        logger.info("Scoring perplexity of the %s model on %d references.", variant, len(examples))
        with _adapter_switch(loaded, variant == "tuned"):
            nll[variant] = answer_nll(loaded.model, tokenizer, conversations, batch_size=batch_size)

    answers: dict[str, list[str]] = {}
    latencies: dict[str, list[float]] = {}
    new_tokens: dict[str, list[int]] = {}
    cut: dict[str, list[bool]] = {}
    for variant in variants:  # one variant after the other: an engine switches its adapter once
        events = decoder.decode(
            questions, settings, use_adapter=variant == "tuned", desc=f"Answers ({variant})"
        )
        answers[variant] = [event.text.strip() for event in events]
        latencies[variant] = [event.elapsed for event in events]
        new_tokens[variant] = [event.num_tokens for event in events]
        cut[variant] = [event.finish_reason == "length" for event in events]

    result: dict[str, Any] = {variant: None for variant in VARIANTS}
    for variant in variants:
        result[variant] = answer_scores(
            answers[variant],
            references,
            nll[variant],
            latencies[variant],
            new_tokens[variant],
            cut[variant],
        )

    result["by_task"] = _by_task(
        examples, variants, answers, references, nll, latencies, new_tokens, cut
    )
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


def _by_task(examples, variants, answers, references, nll, latencies, new_tokens, cut) -> dict:
    """The same scores per ``task`` (chat, summarise, translate) where examples name one."""
    by_task: dict[str, list[int]] = defaultdict(list)
    for index, example in enumerate(examples):
        if "task" in example.meta:
            by_task[example.meta["task"]].append(index)

    def scores(variant: str, indices: list[int]) -> dict[str, float] | None:
        if variant not in variants:
            return None
        return answer_scores(
            [answers[variant][i] for i in indices],
            [references[i] for i in indices],
            [nll[variant][i] for i in indices],
            [latencies[variant][i] for i in indices],
            [new_tokens[variant][i] for i in indices],
            [cut[variant][i] for i in indices],
        )

    return {
        task: {"n_examples": len(indices), **{v: scores(v, indices) for v in VARIANTS}}
        for task, indices in sorted(by_task.items())
    }


@dataclass
class EvaluationInputs:
    """The loaded model (adapter on), its prompt style and the examples to evaluate."""

    loaded: LoadedModel
    system_prompt: str
    data: EvaluationData
    context_length: int


def evaluation_inputs(args: EvaluationArguments) -> EvaluationInputs:
    """Load the model and adapter and select the data, as `args` asks."""
    training = None
    model_spec = args.model_name_or_path
    style = PromptStyle(DEFAULT_SYSTEM_PROMPT)
    if args.adapter is not None:
        recorded_base = check_adapter(args.adapter)
        model_spec = model_spec or recorded_base
        run = RunFolder(args.adapter)
        if run.is_adapter():
            training = run_config(run)
            style = run.prompt_style()
        if training is None and args.dataset is None:
            raise SupportLMError(
                f"Adapter {args.adapter} has no {TRAINING_CONFIG_FILE}, so its held-out data is "
                "unknown; pass --dataset."
            )
    loaded = load_model(model_spec or EMBEDDED_MODEL, adapter=args.adapter)
    style.apply(loaded.tokenizer)  # serve with the template the adapter was trained with
    context_length = int(getattr(loaded.model.config, "max_position_embeddings", 2048))
    run = RunFolder(args.adapter) if training is not None else None
    data = select_data(args, loaded.tokenizer, style.system_prompt, run, context_length)
    return EvaluationInputs(loaded, style.system_prompt, data, context_length)


def evaluate(args: EvaluationArguments) -> dict[str, Any]:
    """Everything `finetune/evaluate.py` does but writing files: the report as a dict."""
    inputs = evaluation_inputs(args)
    loaded, data, system_prompt = inputs.loaded, inputs.data, inputs.system_prompt
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
    started = time.perf_counter()
    # Room for the longest evaluated conversation (and the intent question) plus the answer.
    window = max(2048, data.max_seq_length + settings.max_new_tokens)
    decoder = open_decoder(args.engine, loaded, context_length=min(inputs.context_length, window))
    try:
        result = compare(
            loaded,
            data.examples,
            system_prompt=system_prompt,
            settings=settings,
            decoder=decoder,
            batch_size=args.batch_size,
            num_shown=args.num_shown,
        )
        intents = intent_report(decoder, loaded, data.train_examples, data.examples, system_prompt)
    finally:
        decoder.close()
    for variant in ("base", "tuned"):
        if intents and result[variant] is not None:
            result[variant].update(intents["scores"][variant])
    return {
        "intent_baseline": intents["scores"]["baseline"] if intents else None,
        "intents": intents,
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
        "engine": {
            "name": decoder.name,
            "description": decoder.engine.description,
            "reason": decoder.reason,
            "concurrency": decoder.concurrency,
        },
        "wall_s": time.perf_counter() - started,
        "by_task": result["by_task"],
        "examples": result["examples"],
    }
