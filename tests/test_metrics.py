"""Metrics: readable expected values on tiny inputs, perplexity checked against the model's loss."""

from __future__ import annotations

import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from supportlm.prompts import IGNORE_INDEX
from supportlm.train.judge.metrics import (
    bleu,
    chrf,
    latency_summary,
    perplexity,
    reference_labels,
    rouge_l,
    text_metrics,
)

SENTENCE = "Please share your order number and I will cancel the order for you."


def test_identical_texts_score_100():
    scores = text_metrics([SENTENCE, "Thank you!"], [SENTENCE, "Thank you!"])
    assert scores == pytest.approx({"rougeL": 100.0, "chrf": 100.0, "bleu": 100.0})


def test_disjoint_texts_score_about_0():
    scores = text_metrics(["alpha beta gamma delta"], ["refund window closes tomorrow"])
    assert scores["rougeL"] == 0.0
    assert scores["bleu"] == pytest.approx(0.0, abs=1e-6)
    assert scores["chrf"] < 5.0


def test_rouge_l_hand_checked_with_stemming():
    # Stemmed: "the cat was sit on the mat" vs "the cat sat on the mat": the longest common
    # subsequence "the cat on the mat" has 5 words, so P = 5/7, R = 5/6 and F = 2PR/(P+R) = 10/13.
    assert rouge_l(["the cat was sitting on the mat"], ["the cat sat on the mat"]) == pytest.approx(
        100 * 10 / 13
    )
    # Stemming makes "cancelled orders" match "cancel order".
    assert rouge_l(["cancelled orders"], ["cancel order"]) == pytest.approx(100.0)


def test_rouge_l_is_the_mean_over_examples():
    assert rouge_l(["a b", "c d"], ["a b", "x y"]) == pytest.approx(50.0)


def test_more_overlap_scores_higher():
    close = "Please share your order number and I will cancel it for you."
    far = "Our store opens at nine."
    for metric in (rouge_l, chrf, bleu):
        assert metric([close], [SENTENCE]) > metric([far], [SENTENCE])


def test_metrics_reject_mismatched_lengths():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        chrf(["a", "b"], ["a"])


def test_latency_summary():
    summary = latency_summary([1.0, 2.0, 3.0, 4.0, 100.0])
    assert summary["latency_mean_s"] == pytest.approx(22.0)
    # numpy's linear interpolation: between 4.0 (p75) and 100.0 (p100), 80% of the way.
    assert summary["latency_p95_s"] == pytest.approx(4.0 + 0.8 * 96.0)


CONVERSATIONS = [
    [
        {"role": "system", "content": "You are a support assistant."},
        {"role": "user", "content": "How do I cancel my order?"},
        {"role": "assistant", "content": "Go to My Orders, choose the order and click Cancel."},
    ],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Where is my refund?"},
        {"role": "assistant", "content": "Refunds reach your card within 5 to 7 business days."},
    ],
]


def test_reference_labels_score_only_the_last_answer(smollm2_tokenizer):
    encoded = reference_labels(smollm2_tokenizer, CONVERSATIONS[1])
    scored = [
        i
        for i, label in zip(encoded["input_ids"], encoded["labels"], strict=True)
        if label != IGNORE_INDEX
    ]
    # The earlier answer is context; the reference and the token that ends it are scored.
    assert smollm2_tokenizer.decode(scored) == (
        "Refunds reach your card within 5 to 7 business days.<|im_end|>"
    )


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def test_perplexity_is_exp_of_the_models_own_loss(tiny_model, smollm2_tokenizer):
    encoded = reference_labels(smollm2_tokenizer, CONVERSATIONS[0])
    with torch.no_grad():
        loss = tiny_model(
            input_ids=torch.tensor([encoded["input_ids"]]), labels=torch.tensor([encoded["labels"]])
        ).loss
    ours = perplexity(tiny_model, smollm2_tokenizer, CONVERSATIONS[:1])
    assert ours == pytest.approx(math.exp(loss.item()), rel=1e-4)


def test_perplexity_does_not_depend_on_batching(tiny_model, smollm2_tokenizer):
    # The two conversations have different lengths, so batch_size=2 pads one of them.
    one_by_one = perplexity(tiny_model, smollm2_tokenizer, CONVERSATIONS, batch_size=1)
    batched = perplexity(tiny_model, smollm2_tokenizer, CONVERSATIONS, batch_size=2)
    assert batched == pytest.approx(one_by_one, rel=1e-4)


def test_smollm2_prefers_real_answers_to_shuffled_ones(smollm2_dir, smollm2_tokenizer):
    """The real model finds fluent support answers far more likely than the same words shuffled."""
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    rng = random.Random(0)
    shuffled = []
    for messages in CONVERSATIONS:
        words = messages[-1]["content"].split()
        rng.shuffle(words)
        shuffled.append([*messages[:-1], {"role": "assistant", "content": " ".join(words)}])
    real = perplexity(model, smollm2_tokenizer, CONVERSATIONS)
    assert math.isfinite(real) and real < 1e3
    assert perplexity(model, smollm2_tokenizer, shuffled) > 2 * real
