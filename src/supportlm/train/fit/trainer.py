"""The trainer: TRL's `SFTTrainer` with the loss on supervised positions only, and its helpers.

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

import logging
import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import PreTrainedTokenizerBase, TrainerCallback
from trl import SFTTrainer

from supportlm.prompts import IGNORE_INDEX, tokenize_conversation
from supportlm.prompts import with_system_prompt as add_system_prompt
from supportlm.train.data.examples import Example

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
    """A `datasets.Dataset` of ``input_ids`` and ``labels`` (answer-only by default).

    Examples measured by `supportlm.train.data.dataset.limit_length` with the same system prompt
    carry their encoding already; only the others are tokenised here.
    """
    rows = []
    for example in examples:
        encoded = example.encoded
        if encoded is None or encoded["system_prompt"] != system_prompt:
            messages = add_system_prompt(example.messages, system_prompt)
            encoded = tokenize_conversation(tokenizer, messages)
        labels = encoded["labels"] if assistant_only_loss else list(encoded["input_ids"])
        rows.append({"input_ids": encoded["input_ids"], "labels": labels})
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
    """Swap the LoRA layers' `nn.Dropout` for `CpuDropout`; returns how many were swapped.

    PEFT has no setting for its dropout module, so the `nn.Dropout` entries of each layer's
    public ``lora_dropout`` `ModuleDict` are replaced (a documented `nn.ModuleDict` operation, no
    private attribute); ``--cpu_dropout false`` keeps PEFT's own.
    """
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
        # `cpu_dropout` is our TrainingArguments' setting; a plain SFTConfig keeps PEFT's dropout.
        wanted = getattr(self.args, "cpu_dropout", False) and self.args.device.type == "cpu"
        if wanted and (swapped := use_cpu_dropout(self.model)):
            logger.info("LoRA dropout: CpuDropout on %d layers (cheaper masks on CPU).", swapped)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        # Under DDP the forward must go through the wrapper (it prepares the gradient
        # all-reduce), which calls the whole model: the trainer's own loss, all positions.
        wrapped = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        if not self.supervised_logits or return_outputs or wrapped:
            if model.training and not return_outputs:
                self.supervised_tokens += int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
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
