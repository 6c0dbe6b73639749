"""The LoRA adapter's shape: its settings (`LoraArguments`), and checking a saved adapter's.

The shape check lets ``--init_adapter`` continue an adapter only with the rank, alpha and target
layers it was trained with, so a changed config is never silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from supportlm.errors import SupportLMError
from supportlm.run_folder import RunFolder


@dataclass
class LoraArguments:
    """The LoRA adapter: what is trained while the base stays frozen."""

    lora_r: int = field(
        default=16, metadata={"help": "Rank of the update matrices: more capacity, more memory."}
    )
    lora_alpha: int = field(
        default=32, metadata={"help": "Scale of the update (alpha / r multiplies it)."}
    )
    lora_dropout: float = field(
        default=0.05, metadata={"help": "Dropout on the adapter input: regularises small data."}
    )
    lora_target_modules: str = field(
        default="all-linear",
        metadata={
            "help": "Layers that get an adapter: 'all-linear' (every linear layer but the output "
            "head) or a comma-separated list such as 'q_proj,v_proj'."
        },
    )

    def __post_init__(self) -> None:
        if self.lora_r < 1:
            raise SupportLMError(f"lora_r must be at least 1, got {self.lora_r}.")
        if self.lora_alpha <= 0:
            raise SupportLMError(f"lora_alpha must be positive, got {self.lora_alpha}.")
        if not 0 <= self.lora_dropout < 1:
            raise SupportLMError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        if not self.lora_target_modules.strip():
            raise SupportLMError("lora_target_modules must name at least one layer.")

    @property
    def target_modules(self) -> str | list[str]:
        if self.lora_target_modules == "all-linear":
            return "all-linear"
        return [name.strip() for name in self.lora_target_modules.split(",") if name.strip()]

    def to_peft_config(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=self.target_modules,
            task_type="CAUSAL_LM",
        )


def linear_layer_names(model: torch.nn.Module) -> set[str]:
    """The short names of the linear layers PEFT's ``all-linear`` adapts (the head excluded)."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lora_" not in name:
            names.add(name.removesuffix(".base_layer").rsplit(".", 1)[-1])  # PEFT wraps the layer
    return names - {"lm_head"}


def check_lora_shape(parent: RunFolder, model: torch.nn.Module, lora: Any) -> None:
    """Raise when the parent adapter's rank, alpha or target layers differ from the config's."""
    saved = parent.adapter_config()
    wanted = lora.target_modules
    targets = linear_layer_names(model) if wanted == "all-linear" else set(wanted)
    found = {
        "lora_r": (saved.get("r"), lora.lora_r),
        "lora_alpha": (saved.get("lora_alpha"), lora.lora_alpha),
        # PEFT saves the full module names for "all-linear", the given names otherwise.
        "lora_target_modules": (
            sorted({name.rsplit(".", 1)[-1] for name in saved.get("target_modules") or ()}),
            sorted(targets),
        ),
    }
    differences = [f"{key} {old} (config {new})" for key, (old, new) in found.items() if old != new]
    if differences:
        raise SupportLMError(
            f"--init_adapter {parent.path} has another LoRA shape: {'; '.join(differences)}. "
            "Continue it with the settings it was trained with."
        )
