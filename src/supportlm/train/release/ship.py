"""A run folder made into the adapter shipped in the repository (`finetune/ship.py`).

The copy is the run folder as training wrote it (adapter, prompt style and tokenizer, config,
metrics, data report, loss plot, intent questions), with three changes:

* the LoRA weights are stored in float16, half the size (PEFT loads them back into the model's
  dtype; their version is recorded anew, with the run's version as ``shipped_from``);
* the evaluation report on held-out questions (``eval.json``/``.md``/``.png``) is added;
* ``README.md`` is a model card for the Hub: base model and both datasets with their licences,
  intended use and limits, the measured scores and the commands that reproduce it.

The folder is written whole or not at all (`atomic_target`), so a retrained adapter replaces the
old one, with its new report, in one commit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from supportlm.cache import atomic_target
from supportlm.embedded import EMBEDDED_MODEL, EMBEDDED_UPSTREAM_ID
from supportlm.errors import SupportLMError
from supportlm.run_folder import ADAPTER_WEIGHTS, RunFolder

EVAL_FILES = {".json": "eval.json", ".md": "eval.md", ".png": "eval.png"}
LICENCES = {
    "data/customer_support.jsonl": "Apache-2.0 (supportlm's bundled, synthetic data)",
    "bitext-customer-support": "CDLA-Sharing-1.0 (Bitext customer-support sample)",
}


def ship(run: RunFolder, dest: str | Path, evaluation: str | Path, command: str = "") -> Path:
    """Copy `run` to `dest` for distribution (see the module doc); returns `dest`."""
    if not run.is_adapter():
        raise SupportLMError(f"{run.path} holds no adapter.")
    evaluation = Path(evaluation)
    if not evaluation.is_file():
        raise SupportLMError(f"No evaluation report at {evaluation}: run finetune/evaluate.py.")
    report = json.loads(evaluation.read_text(encoding="utf-8"))
    dest = Path(dest)
    with atomic_target(dest) as tmp:
        # training_args.bin is a pickle: nobody should have to unpickle a downloaded file.
        shutil.copytree(run.path, tmp, ignore=shutil.ignore_patterns("training_args.bin"))
        weights = load_file(tmp / ADAPTER_WEIGHTS)
        half = {name: tensor.to(torch.float16).contiguous() for name, tensor in weights.items()}
        save_file(half, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        for suffix, name in EVAL_FILES.items():
            source = evaluation.with_suffix(suffix)
            if source.is_file():
                shutil.copy(source, tmp / name)
        shipped = RunFolder(tmp)
        lineage = {**run.lineage(), "shipped_from": run.adapter_version()}
        shipped.write_record(run.base_model() or EMBEDDED_MODEL, lineage)
        (tmp / "README.md").write_text(model_card(shipped, report, command), encoding="utf-8")
    return dest


def _licences(datasets: list[str]) -> list[str]:
    found = []
    for source in datasets:
        licence = next((text for key, text in LICENCES.items() if key in source), "see its source")
        found.append(f"`{source}`: {licence}")
    return found


def _score_rows(report: dict[str, Any]) -> str:
    rows = ["| | ROUGE-L | chrF | BLEU | perplexity |", "|---|---:|---:|---:|---:|"]
    for variant in ("base", "tuned"):
        scores = report.get(variant) or {}
        if scores:
            rows.append(
                f"| {variant} | {scores['rougeL']:.1f} | {scores['chrf']:.1f} | "
                f"{scores['bleu']:.1f} | {scores['perplexity']:.2f} |"
            )
    return "\n".join(rows)


def model_card(run: RunFolder, report: dict[str, Any], command: str) -> str:
    metrics = run.metrics() or {}
    datasets = run.lineage().get("datasets") or []
    licences = "\n".join(f"- {line}" for line in _licences(datasets))
    return f"""---
base_model: {EMBEDDED_UPSTREAM_ID}
library_name: peft
license: cdla-sharing-1.0
tags: [lora, sft, customer-support, supportlm]
---

# supportlm-smollm2

A LoRA adapter (rank 16, all linear layers, float16, {run.adapter_version()}) that turns
`{EMBEDDED_UPSTREAM_ID}` (Apache-2.0) into an e-commerce customer-service assistant. supportlm
serves it by default (`python app.py`) until a run of your own is in `outputs/latest`.

## Licences

- Base model: `{EMBEDDED_UPSTREAM_ID}`, Apache-2.0 (weights not included here).
{licences}

The adapter was trained on CDLA-Sharing-1.0 data; it is shared under CDLA-Sharing-1.0 with that
notice, and the code that made it is Apache-2.0.

## Intended use and limits

Drafting answers to customers' questions about orders, shipping, returns, refunds, accounts and
payments, for a shop that fills the `{{{{placeholders}}}}` in answers with its own details
(`data/shop.yaml`), with a person able to take over (complaints, account deletion and requests for
an agent are handed over by the app). It is a 135M-parameter model: it does not know your orders,
policies or prices beyond what the shop file says, it can state wrong facts fluently, and it
answers in English. Do not let it make commitments (refunds, legal statements) without review.

## Evaluation

On {report.get("n_examples")} held-out test questions of `{report.get("dataset")}`
({report.get("split_reason")}), greedy, `max_new_tokens` {report["generation"]["max_new_tokens"]},
decoded by {report["engine"]["name"]}:

{_score_rows(report)}

Full report: `eval.md`, `eval.png`. Training: {metrics.get("global_step")} steps, validation loss
{metrics.get("eval_loss", float("nan")):.3f}, peak memory {metrics.get("peak_memory_mb", 0):.0f} MB,
{metrics.get("train_runtime_s", 0) / 60:.0f} min; `metrics.json`, `loss.png`, `data_report.md`.

## Reproduce

```bash
{command or "python finetune/train.py --config finetune/configs/release.yaml"}
```
"""
