"""Training in several processes (`accelerate launch`, torchrun): who does what.

transformers' `Trainer` already runs DDP when a launcher sets ``WORLD_SIZE``/``RANK``; what it
cannot know is supportlm's own side effects, so each has one rule here:

* on a machine without CUDA the ranks are CPU processes talking over gloo
  (``ACCELERATE_USE_CPU``, read by `TrainingArguments` and accelerate), each on its share of the
  physical cores;
* the main process goes first wherever a cache or the output folder is written (the model's
  one-time conversion, the output-folder check that may delete old checkpoints), the others then
  find it done (`TrainingArguments.main_process_first`);
* only the main process logs supportlm's reports and writes the run folder and ``latest``.
"""

from __future__ import annotations

import logging
import os

import torch


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def use_cpu_ranks() -> None:
    """Under a multi-process launch without CUDA, train on CPU ranks (gloo); call before the
    training arguments are parsed."""
    if world_size() > 1 and not torch.cuda.is_available():
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")


def quiet_replicas() -> None:
    """Only the main process reports; the others log warnings and errors."""
    if not is_main():
        logging.getLogger("supportlm").setLevel(logging.WARNING)


def threads_per_rank(physical_cores: int) -> int:
    """Each rank's share of the physical cores (at least one)."""
    return max(1, physical_cores // world_size())


def sum_over_ranks(value: float) -> float:
    """`value` summed over every rank (itself when training in one process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    total = torch.tensor([float(value)], dtype=torch.float64)
    torch.distributed.all_reduce(total)
    return float(total.item())
