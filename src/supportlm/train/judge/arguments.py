"""What `finetune/evaluate.py` compares, on which data, how it decodes, where it reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from supportlm.engines.base import GenerationSettings
from supportlm.errors import SupportLMError
from supportlm.train.judge.decoding import ENGINE_CHOICES

SPLIT_CHOICES = ("auto", "test", "all")


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
    against: str | None = field(
        default=None,
        metadata={
            "help": "Score --adapter (new) against this adapter (old; a run folder or 'latest') "
            "on the old one's held-out test split and the held-out feedback; finetune/promote.py "
            "reads the report (versus.json in the new run folder)."
        },
    )
    feedback: str | None = field(
        default=None,
        metadata={
            "help": "Held-out feedback for --against (heldout.jsonl of finetune/feedback.py "
            "export); default: the export the new adapter was trained on."
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
    # 128 cut 77 % of the Bitext reference answers (median 158 tokens, longest 283), capping
    # ROUGE-L for a model that answers at the right length; 300 cuts none of them.
    max_new_tokens: int = field(
        default=300, metadata={"help": "Most tokens per answer (300: no Bitext answer is cut)."}
    )
    # Measured on the Bitext recipe's adapter, 120 test questions (docs/recipe.md): 1.0 scores
    # ROUGE-L 42.0 against 37.9 at the app's 1.1, chrF 50.6 against 50.8, and cuts no answer;
    # Bitext answers repeat the question's words, which a penalty pushes the model away from.
    repetition_penalty: float = field(
        default=1.0,
        metadata={
            "help": "Repetition penalty of the greedy decoding (1.0: none, what scores the tuned "
            "answers best; the app's default is 1.1)."
        },
    )
    engine: str = field(
        default="auto",
        metadata={
            "help": "What decodes the answers: auto (the engine the app would serve with: for a "
            "GGUF base on a CPU llama.cpp, one answer per CPU at once, else ctranslate2; else "
            "transformers), or one by name. Perplexity is always computed with transformers.",
            "choices": list(ENGINE_CHOICES),
        },
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
        if self.engine not in ENGINE_CHOICES:
            raise SupportLMError(
                f"Unknown engine {self.engine!r}; choose one of {', '.join(ENGINE_CHOICES)}."
            )
        if self.limit is not None and self.limit < 1:
            raise SupportLMError(f"limit must be at least 1, got {self.limit}.")
        if self.batch_size < 1:
            raise SupportLMError(f"batch_size must be at least 1, got {self.batch_size}.")
        if self.against is not None and self.adapter is None:
            raise SupportLMError("--against compares two adapters: pass --adapter too.")
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
            return Path(self.adapter) / ("versus-report.json" if self.against else "eval.json")
        return Path("outputs") / "eval-base.json"
