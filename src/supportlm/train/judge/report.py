"""The evaluation report: Markdown with answers side by side, and a bar chart of the scores."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from supportlm.train.judge.evaluation import METRICS, VARIANTS


def _format(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def _change(metric: str, base: float, tuned: float) -> str:
    better = (tuned > base) == METRICS[metric] if tuned != base and metric in METRICS else None
    mark = "" if better is None else (" ✓" if better else " ✗")
    return f"{tuned - base:+.3g}{mark}"


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: settings, a metric table, per-task tables and sample answers."""
    base, tuned = report["base"], report["tuned"]
    engine = report["engine"]
    split = "test split" if report["split"] == "test" else "all examples"
    lines = [
        "# Evaluation: base vs fine-tuned" if tuned else "# Evaluation: base model",
        "",
        f"- Model: {report['model_description']}",
        f"- Adapter: {report['adapter'] or 'none'}",
        f"- Data: {report['dataset']}, {split}: {report['split_reason']}",
        f"- Examples: {report['n_examples']} of {report['n_available']}",
        f"- Decoding: greedy, max_new_tokens {report['generation']['max_new_tokens']}, "
        f"repetition_penalty {report['generation']['repetition_penalty']}",
        f"- Engine: {engine['description']} ({engine['reason']}), {engine['concurrency']} answers "
        f"at once; wall time {report['wall_s']:.0f} s",
        "",
        "ROUGE-L, chrF and BLEU: 0-100, higher is better. Perplexity on the reference answers and "
        "latency: lower is better. new_tokens_mean: answer length (reference_tokens_mean: the "
        "references'; length_ratio: the two's ratio); answers_cut_share: answers max_new_tokens "
        "cut.",
        "",
    ]
    lines += _metric_table(base, tuned)
    if report.get("intent_baseline"):
        scores = report["intent_baseline"]
        lines += [
            "",
            "Intent baseline (TF-IDF + logistic regression on the training split's questions): "
            f"accuracy {scores['intent_accuracy']:.3f}, macro recall "
            f"{scores['intent_macro_recall']:.3f}, macro F1 {scores['intent_macro_f1']:.3f}.",
        ]
    for task, scores in report["by_task"].items():
        count = scores["n_examples"]
        lines += ["", f"## Task: {task} ({count} example{'s' if count != 1 else ''})", ""]
        lines += _metric_table(scores["base"], scores["tuned"])
    lines += ["", "## Sample answers", ""]
    for number, example in enumerate(report["examples"], start=1):
        task = f" ({example['task']})" if example.get("task") else ""
        lines += [f"### {number}{task}", "", "**Question**", "", _quote(example["question"])]
        lines += ["", "**Reference**", "", _quote(example["reference"])]
        lines += ["", "**Base**", "", _quote(example["base"])]
        if example.get("tuned") is not None:
            lines += ["", "**Tuned**", "", _quote(example["tuned"])]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _metric_table(base: dict[str, float], tuned: dict[str, float] | None) -> list[str]:
    # Answer length is context for the latencies, neither better nor worse.
    metrics = [*METRICS, "new_tokens_mean", "reference_tokens_mean", "length_ratio"]
    metrics += ["answers_cut_share"]
    if tuned is None:
        rows = ["| metric | base |", "|---|---:|"]
        return rows + [f"| {metric} | {_format(base[metric])} |" for metric in metrics]
    rows = ["| metric | base | tuned | change |", "|---|---:|---:|---:|"]
    return rows + [
        f"| {metric} | {_format(base[metric])} | {_format(tuned[metric])} | "
        f"{_change(metric, base[metric], tuned[metric])} |"
        for metric in metrics
    ]


def _quote(text: str) -> str:
    return "\n".join(f"> {line}" if line else ">" for line in (text or "(empty)").splitlines())


def plot_report(report: dict[str, Any], path: str | Path) -> None:
    """A bar chart of every metric, base vs tuned side by side, one panel per metric."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt

    variants = [variant for variant in VARIANTS if report[variant] is not None]
    colors = {"base": "#9e9e9e", "tuned": "#1f77b4"}
    figure, axes = plt.subplots(1, len(METRICS), figsize=(2.4 * len(METRICS), 3.2))
    for axis, (metric, higher_is_better) in zip(axes, METRICS.items(), strict=True):
        values = [report[variant][metric] for variant in variants]
        bars = axis.bar(variants, values, color=[colors[v] for v in variants])
        axis.bar_label(bars, labels=[_format(v) for v in values], fontsize=8)
        axis.set_title(f"{metric}\n({'higher' if higher_is_better else 'lower'} is better)")
        # Every metric is >= 0; headroom above the tallest bar for its label.
        axis.set_ylim(0, max(values) * 1.2 or 1.0)
        axis.tick_params(axis="y", labelsize=8)
    figure.suptitle(f"{report['model']} · {report['n_examples']} examples ({report['split']})")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(report: dict[str, Any], output: str | Path) -> dict[str, Path]:
    """Write FILE.json, FILE.md and FILE.png; returns the three paths."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": output,
        "markdown": output.with_suffix(".md"),
        "plot": output.with_suffix(".png"),
    }
    paths["json"].write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    paths["markdown"].write_text(render_markdown(report), encoding="utf-8")
    plot_report(report, paths["plot"])
    intents = report.get("intents")
    if intents:
        from supportlm.train.judge.intents import plot_confusion

        variant = "tuned" if "tuned" in intents["predictions"] else "base"
        paths["intents"] = plot_confusion(
            intents["truth"],
            intents["predictions"][variant],
            output.with_name(output.stem + "-intents.png"),
            f"Intents named by the {variant} model",
        )
    return paths
