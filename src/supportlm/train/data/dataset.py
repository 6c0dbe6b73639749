"""From loaded examples to training splits: clean, de-duplicate, sample, limit length, split.

Every example is cleaned (`normalize_text`), de-duplicated, optionally sampled, measured once with
the exact tokenisation used for training (`supportlm.prompts.tokenize_conversation`; the encoding
is kept on the example for the trainer), and assigned to train/validation/test by a hash of its
first user message, so a question never appears in two splits. `prepare_dataset` does all of it
and returns a `DataReport` to print before training and save next to the adapter.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from supportlm.errors import SupportLMError
from supportlm.prompts import IGNORE_INDEX, tokenize_conversation, with_system_prompt
from supportlm.train.data.examples import SPLITS, Example
from supportlm.train.data.mixture import (
    dataset_sources,
    dataset_weights,
    load_mixture,
    weigh,
    with_replay,
)
from supportlm.train.data.report import DataReport
from supportlm.train.data.sampling import sample_examples, sha256_text

if TYPE_CHECKING:  # the arguments module imports `check_ratios` from here
    from supportlm.train.data.arguments import DataArguments

logger = logging.getLogger(__name__)

#: Below this many examples tokenising takes about a second, not worth a progress bar.
PROGRESS_BAR_MIN_EXAMPLES = 2000

_HORIZONTAL_SPACE = re.compile(r"[^\S\n]+")
_INDENT = re.compile(r"[^\S\n]*")
_EXTRA_BLANK_LINES = re.compile(r"\n{3,}")


@dataclass
class CleanStats:
    num_input: int = 0
    empty_dropped: int = 0
    duplicates_dropped: int = 0
    too_long_dropped: int = 0
    #: Token counts of the kept examples, when a tokenizer was given.
    num_tokens: list[int] = field(default_factory=list)
    num_supervised_tokens: list[int] = field(default_factory=list)


def normalize_text(text: str) -> str:
    """Unicode NFC, one kind of line ending, single spaces, at most one blank line in a row.

    Line breaks and paragraph breaks are kept (answers contain numbered lists), and so is the
    indentation at the start of a line (nested list items), with tabs expanded to four spaces.
    """
    lines = []
    for line in unicodedata.normalize("NFC", text).splitlines():
        indent = _INDENT.match(line).group()
        body = _HORIZONTAL_SPACE.sub(" ", line[len(indent) :]).rstrip()
        lines.append(" " * len(indent.expandtabs(4)) + body if body else "")
    return _EXTRA_BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def clean_examples(
    examples: Iterable[Example],
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    system_prompt: str | None = None,
    max_seq_length: int | None = None,
) -> tuple[list[Example], CleanStats]:
    """Normalise every message, then drop empty, duplicate and (optionally) too-long examples.

    Duplicates are whole conversations that are equal after normalisation; the first is kept.
    With a `tokenizer`, every example is also measured (`limit_length`).
    """
    if max_seq_length is not None and tokenizer is None:
        raise ValueError("max_seq_length needs a tokenizer to count tokens with.")
    stats = CleanStats()
    seen: set[tuple[tuple[str, str], ...]] = set()
    kept: list[Example] = []
    for example in examples:
        stats.num_input += 1
        messages = [
            {"role": m["role"], "content": normalize_text(m["content"])} for m in example.messages
        ]
        if not all(m["content"] for m in messages):
            stats.empty_dropped += 1
            continue
        key = tuple((m["role"], m["content"]) for m in messages)
        if key in seen:
            stats.duplicates_dropped += 1
            continue
        seen.add(key)
        kept.append(Example(messages=messages, meta=dict(example.meta)))
    if tokenizer is not None:
        kept = limit_length(kept, stats, tokenizer, system_prompt, max_seq_length)
    _check_not_empty(kept, stats, max_seq_length)
    return kept, stats


def _check_not_empty(kept: list[Example], stats: CleanStats, max_seq_length: int | None) -> None:
    if not kept:
        raise SupportLMError(
            f"No examples left after cleaning: of {stats.num_input}, {stats.empty_dropped} had "
            f"an empty message, {stats.duplicates_dropped} were duplicates and "
            f"{stats.too_long_dropped} were longer than {max_seq_length} tokens."
        )


def limit_length(
    examples: list[Example],
    stats: CleanStats,
    tokenizer: PreTrainedTokenizerBase,
    system_prompt: str | None,
    max_seq_length: int | None,
) -> list[Example]:
    """Tokenise each example once, as training will; drop those over `max_seq_length`.

    The encoding (answer-only labels, `system_prompt` prepended) stays on the example, so the
    trainer does not tokenise it again; token counts go into `stats` for the report.
    """
    kept = []
    progress = tqdm(
        examples,
        desc="Tokenising",
        unit="example",
        disable=len(examples) < PROGRESS_BAR_MIN_EXAMPLES,
    )
    for example in progress:
        encoded = tokenize_conversation(
            tokenizer, with_system_prompt(example.messages, system_prompt)
        )
        labels = encoded["labels"]
        if max_seq_length is not None and len(labels) > max_seq_length:
            stats.too_long_dropped += 1
            continue
        stats.num_tokens.append(len(labels))
        stats.num_supervised_tokens.append(sum(label != IGNORE_INDEX for label in labels))
        example.encoded = {**encoded, "system_prompt": system_prompt}
        kept.append(example)
    return kept


# ---------------------------------------------------------------------------------------------
# Splitting
# ---------------------------------------------------------------------------------------------


def question_hash(example: Example) -> str:
    """SHA-256 of the example's first user message, normalised and case-folded: what decides
    its split, and what a run folder records of each held-out question (``split.json``)."""
    return sha256_text(normalize_text(example.first_user_message).casefold())


def assign_split(
    example: Example, *, validation_ratio: float = 0.1, test_ratio: float = 0.1
) -> str:
    """ "train", "validation" or "test", from a hash of the example's first user message.

    The question is normalised and case-folded first, so the same question (also with another
    answer, or as the start of a longer conversation) always lands in the same split, whatever
    the other examples are and in whatever order they come.
    """
    fraction = int(question_hash(example)[:16], 16) / 16**16
    if fraction < test_ratio:
        return "test"
    if fraction < test_ratio + validation_ratio:
        return "validation"
    return "train"


def split_examples(
    examples: Iterable[Example], *, validation_ratio: float = 0.1, test_ratio: float = 0.1
) -> dict[str, list[Example]]:
    """Group examples by `assign_split`; the dict has every key of `SPLITS`, in that order."""
    check_ratios(validation_ratio, test_ratio)
    splits: dict[str, list[Example]] = {name: [] for name in SPLITS}
    for example in examples:
        splits[
            assign_split(example, validation_ratio=validation_ratio, test_ratio=test_ratio)
        ].append(example)
    return splits


def check_ratios(validation_ratio: float, test_ratio: float) -> None:
    """The one rule for split ratios (config, library calls): each in [0, 1), some left to train."""
    if not (
        0 <= validation_ratio < 1 and 0 <= test_ratio < 1 and validation_ratio + test_ratio < 1
    ):
        raise SupportLMError(
            f"validation_ratio ({validation_ratio}) and test_ratio ({test_ratio}) must each be "
            "between 0 and 1 and leave some examples for training."
        )


def held_out_questions(splits: dict[str, list[Example]]) -> dict[str, list[str]]:
    """The `question_hash` of every validation and test example, sorted: the split a run
    records, so that evaluation reads which questions were held out instead of re-deriving it."""
    return {
        name: sorted({question_hash(example) for example in splits[name]})
        for name in SPLITS
        if name != "train"
    }


def split_as_recorded(
    splits: dict[str, list[Example]], recorded: dict[str, frozenset[str]]
) -> dict[str, list[Example]]:
    """`splits` re-cut by the question hashes a run recorded (`held_out_questions`): what the
    run held out stays held out even if the ratios or the hashing rule have changed since."""
    regrouped: dict[str, list[Example]] = {name: [] for name in SPLITS}
    for example in (example for part in splits.values() for example in part):
        key = question_hash(example)
        name = next((name for name, hashes in recorded.items() if key in hashes), "train")
        regrouped[name].append(example)
    return regrouped


@dataclass
class PreparedDataset:
    splits: dict[str, list[Example]]
    report: DataReport


def intent_questions(examples: list[Example], share: float) -> list[Example]:
    """Intent-classification examples for `share` of the conversations that name an intent.

    Each asks the intent question of a conversation's first customer message (worded by
    `supportlm.prompts.intent_request`, as evaluation asks it) and answers with the intent name,
    so the tuned model learns to name intents. Only ever added to the training split.
    """
    from supportlm.intents import canonical_intent, intent_examples, intent_labels
    from supportlm.prompts import intent_request

    if not 0 <= share <= 1:
        raise SupportLMError(f"intent_share must be between 0 and 1, got {share}.")
    labels = intent_labels(e.meta.get("intent") for e in examples)
    named = intent_examples(examples)
    if share <= 0 or not named:
        return []
    chosen = sample_examples(named, max(1, round(share * len(named))))
    return [
        Example(
            messages=[
                intent_request(e.first_user_message, labels),
                {"role": "assistant", "content": canonical_intent(e.meta["intent"])},
            ],
            meta={"task": "intent", "intent": e.meta["intent"]},
        )
        for e in chosen
    ]


def prepare_dataset(
    data: DataArguments, tokenizer: PreTrainedTokenizerBase, *, system_prompt: str | None
) -> PreparedDataset:
    """Load, clean, (optionally) sample and split `data.dataset`, and describe it in a
    `DataReport`.

    `data.max_examples` keeps a deterministic sample (`sample_examples`) before tokenising, for
    quick runs; it is taken after de-duplication so it really holds that many distinct examples.
    `data.replay_dataset` is loaded with the sources and makes up `data.replay_share` of the
    training split (`supportlm.train.data.mixture.with_replay`).
    """
    max_seq_length, replay = data.max_seq_length, data.replay_dataset
    sources = dataset_sources(data.dataset)
    source_weights = dataset_weights(data.dataset_weights, sources)
    examples, load_stats = load_mixture(sources + ([replay] if replay else []), strict=data.strict)
    examples, clean_stats = clean_examples(examples)
    not_sampled = 0
    if data.max_examples is not None:
        sample = sample_examples(examples, data.max_examples)
        not_sampled = len(examples) - len(sample)
        examples = sample
    examples = limit_length(examples, clean_stats, tokenizer, system_prompt, max_seq_length)
    _check_not_empty(examples, clean_stats, max_seq_length)
    splits = split_examples(
        examples, validation_ratio=data.validation_ratio, test_ratio=data.test_ratio
    )
    splits["train"] = with_replay(
        splits["train"],
        replay,
        data.replay_share,
        lambda part: weigh(part, sources, source_weights),
    )
    if data.intent_share:
        extra = intent_questions(splits["train"], data.intent_share)
        extra = limit_length(extra, clean_stats, tokenizer, system_prompt, max_seq_length)
        splits["train"] = splits["train"] + extra
        logger.info("Added %d intent questions to the training split.", len(extra))
    report = DataReport.build(
        load_stats, clean_stats, splits, max_seq_length=max_seq_length, not_sampled=not_sampled
    )
    logger.info(
        "%s: %d examples (%s)",
        report.source,
        len(examples),
        ", ".join(f"{name} {count}" for name, count in report.splits.items()),
    )
    return PreparedDataset(splits=splits, report=report)
