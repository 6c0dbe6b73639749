"""The README's result tables, written from the benchmark reports in ``docs/results/*.json``.

A figure in the README is a number some bench script printed and saved; writing the table from
that JSON (`supportlm.reference` puts it between ``<!-- generated:NAME -->`` marks, and a test
checks the two agree) means a figure cannot drift from its measurement, and re-running the bench
with ``--json`` then ``python -m supportlm.reference`` updates it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results"
#: The speed table's runs of ``bench/generation.py`` (each measures its own transformers baseline).
SPEED_RUNS = {
    "ctranslate2": "generation-ct2.json",  # --backend ctranslate2: what the default install serves
    "llama.cpp": "generation-llamacpp.json",  # --backend auto with llama-cpp-python installed
}
#: The quality table's runs of ``finetune/evaluate.py`` (repetition penalty 1.0, then 1.1).
QUALITY_RUNS = ("eval-bitext-rp1.0.json", "eval-bitext.json")


def _read(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / name).read_text(encoding="utf-8"))


def _machine(report: dict[str, Any]) -> str:
    machine = report["machine"]
    cpu = machine.get("cpu_model") or "CPU"
    return f"{cpu}, {machine['cpus']} cores, torch {machine['torch']}"


def speed_table() -> str:
    """transformers ``generate``, then the app on each engine, side by side per run."""
    runs = {engine: _read(name) for engine, name in SPEED_RUNS.items()}
    first = next(iter(runs.values()))
    rows = [
        "| SmolLM2-135M + shipped adapter, greedy, 64 tokens | decode tok/s | × transformers "
        "(same run) | time to first token | peak RSS |",
        "|---|---:|---:|---:|---:|",
        _speed_row("transformers `generate`, fp32 (the baseline of each run)", first["baseline"]),
    ]
    for engine, report in runs.items():
        how = "the default install" if engine == "ctranslate2" else "with the optional compile"
        label = f"**supportlm app**, {engine} engine ({how}), streaming"
        streaming = report["app_streaming"]
        ratio = streaming["decode_tok_s"] / report["baseline"]["decode_tok_s"]
        rows.append(_speed_row(label, streaming, ratio))
    machines = sorted({_machine(report) for report in runs.values()})
    files = ", ".join(f"[{name}](docs/results/{name})" for name in SPEED_RUNS.values())
    return "\n".join([*rows, "", f"Measured on {' and '.join(machines)}: {files}."])


def _speed_row(label: str, case: dict[str, Any], ratio: float | None = None) -> str:
    times = "1.00" if ratio is None else f"**{ratio:.2f}**"
    return (f"| {label} | {case['decode_tok_s']:.1f} | {times} | {case['ttft_s']:.2f} s | "
            f"{case['peak_rss_mb'] / 1024:.2f} GB |")  # fmt: skip


def quality_table() -> str:
    """Base and tuned at each repetition penalty, and the intent baseline."""
    rows = [
        "| | repetition penalty | ROUGE-L | chrF | BLEU | perplexity | answer length / "
        "reference's | intent accuracy (recall, F1) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    reports = [_read(name) for name in QUALITY_RUNS]
    for report in reports:
        penalty = report["generation"]["repetition_penalty"]
        base, tuned = report["base"], report["tuned"]
        rows.append(_quality_row("base SmolLM2", penalty, base))
        rows.append(_quality_row("**tuned**", penalty, tuned, tuned["rougeL"] / base["rougeL"]))
    baseline = reports[0]["intent_baseline"]
    rows.append(
        "| TF-IDF + logistic regression (what the app's intent caption uses) | | | | | | | "
        f"{_intents(baseline)} |"
    )
    return "\n".join(rows)


def _quality_row(label: str, penalty: float, scores: dict, gain: float | None = None) -> str:
    rouge = f"{scores['rougeL']:.1f}" + ("" if gain is None else f" ({gain:.2f}x)")
    cells = [
        label,
        f"{penalty:g}",
        rouge,
        f"{scores['chrf']:.1f}",
        f"{scores['bleu']:.1f}",
        f"{scores['perplexity']:.2f}",
        f"{scores['length_ratio']:.2f}",
        _intents(scores),
    ]
    return "| " + " | ".join(cells) + " |"


def _intents(scores: dict[str, Any]) -> str:
    return (f"{scores['intent_accuracy']:.3f} ({scores['intent_macro_recall']:.3f}, "
            f"{scores['intent_macro_f1']:.3f})")  # fmt: skip
