"""Evaluation metrics: ROUGE-L, chrF and BLEU on generated answers, perplexity on references.

Text metrics are on a 0-100 scale (higher is better) and come from the reference implementations:
`rouge-score` for ROUGE-L (F-measure, Porter stemming) and `sacrebleu` for corpus-level chrF and
BLEU, so the numbers compare with published ones. ROUGE-L's tokenizer keeps only ASCII letters and
digits, so it says nothing about answers in Chinese, Japanese, Arabic…; chrF (character n-grams)
is the metric to read for the translate task.

Perplexity is teacher-forced on the reference answers only: the prompt is context, and only the
tokens of the last assistant turn (plus its end-of-turn token, exactly the labels training uses)
are scored. It is the exponential of the token-weighted mean negative log-likelihood, so a long
answer counts for more than a short one, as in training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import sacrebleu
import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from supportlm.prompts import IGNORE_INDEX, Message, encode_chat, tokenize_conversation

__all__ = [
    "answer_nll",
    "bleu",
    "chrf",
    "latency_summary",
    "perplexity",
    "pooled_perplexity",
    "reference_labels",
    "rouge_l",
    "text_metrics",
]


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references.")
    if not predictions:
        raise ValueError("Metrics need at least one prediction.")


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure ×100 (longest common subsequence of stemmed words)."""
    _check_pairs(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [
        scorer.score(reference, prediction)["rougeL"].fmeasure
        for prediction, reference in zip(predictions, references, strict=True)
    ]
    return 100.0 * float(np.mean(scores))


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus-level chrF (character 6-grams, β=2), sacrebleu's defaults."""
    _check_pairs(predictions, references)
    return float(sacrebleu.corpus_chrf(list(predictions), [list(references)]).score)


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus-level BLEU-4 with sacrebleu's default 13a tokenisation and brevity penalty."""
    _check_pairs(predictions, references)
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def text_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """``{"rougeL", "chrf", "bleu"}`` of `predictions` against `references`."""
    return {
        "rougeL": rouge_l(predictions, references),
        "chrf": chrf(predictions, references),
        "bleu": bleu(predictions, references),
    }


def latency_summary(latencies_s: Sequence[float]) -> dict[str, float]:
    """``{"latency_mean_s", "latency_p95_s"}`` of per-request latencies in seconds."""
    if not latencies_s:
        raise ValueError("A latency summary needs at least one latency.")
    values = np.asarray(latencies_s, dtype=float)
    return {
        "latency_mean_s": float(values.mean()),
        "latency_p95_s": float(np.percentile(values, 95)),
    }


def reference_labels(
    tokenizer: PreTrainedTokenizerBase, messages: list[Message]
) -> dict[str, list[int]]:
    """Input ids and labels that score only the last assistant turn of `messages`.

    Starts from the training labels (`tokenize_conversation`, answer-only) and also masks earlier
    assistant turns, which are context here: the score is about the reference answer.
    """
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("The conversation must end with the reference assistant answer.")
    encoded = tokenize_conversation(tokenizer, messages, assistant_only_loss=True)
    prompt_ids = encode_chat(tokenizer, messages[:-1], add_generation_prompt=True)
    input_ids, labels = encoded["input_ids"], encoded["labels"]
    if input_ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError("The chat template renders the prompt differently inside the dialogue.")
    labels = [IGNORE_INDEX] * len(prompt_ids) + labels[len(prompt_ids) :]
    return {"input_ids": input_ids, "labels": labels}


@torch.inference_mode()
def answer_nll(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[list[Message]],
    *,
    batch_size: int = 4,
) -> list[tuple[float, int]]:
    """``(summed negative log-likelihood, number of scored tokens)`` of each reference answer.

    Each conversation is the prompt followed by its reference answer as the last assistant turn.
    Sums rather than means are returned so that callers can pool any subset (a task, a split)
    token-weighted.
    """
    encoded = [reference_labels(tokenizer, messages) for messages in conversations]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    results: list[tuple[float, int]] = []
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start : start + batch_size]
        length = max(len(item["input_ids"]) for item in batch)
        # Right padding: positions keep their ids, and padded labels are ignored anyway.
        input_ids = torch.tensor(
            [item["input_ids"] + [pad_id] * (length - len(item["input_ids"])) for item in batch]
        )
        labels = torch.tensor(
            [item["labels"] + [IGNORE_INDEX] * (length - len(item["labels"])) for item in batch]
        )
        lengths = torch.tensor([[len(item["input_ids"])] for item in batch])
        attention_mask = (torch.arange(length) < lengths).long()
        logits = model(
            input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device)
        ).logits.float()
        # Token t is predicted from the logits at t-1.
        shifted_logits = logits[:, :-1].transpose(1, 2)
        shifted_labels = labels[:, 1:].to(logits.device)
        nll = F.cross_entropy(
            shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX, reduction="none"
        ).sum(dim=1)
        counts = (shifted_labels != IGNORE_INDEX).sum(dim=1)
        results.extend(
            (float(n), int(c)) for n, c in zip(nll.tolist(), counts.tolist(), strict=True)
        )
    return results


def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[list[Message]],
    *,
    batch_size: int = 4,
) -> float:
    """Perplexity of `model` on the reference answers (last assistant turns) of `conversations`."""
    return pooled_perplexity(answer_nll(model, tokenizer, conversations, batch_size=batch_size))


def pooled_perplexity(nll_and_counts: Sequence[tuple[float, int]]) -> float:
    """exp of the token-weighted mean NLL of `answer_nll` results."""
    total_tokens = sum(count for _, count in nll_and_counts)
    if total_tokens == 0:
        raise ValueError("No reference tokens to score.")
    return math.exp(sum(nll for nll, _ in nll_and_counts) / total_tokens)
