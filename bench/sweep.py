"""A recipe sweep's table and plot, from the `finetune/evaluate.py` reports of its runs.

    python bench/sweep.py "lr 2e-4, 30 steps=docs/results/eval-a.json" "lr 3e-4, 150 steps=b.json" \
        --markdown docs/recipe-sweep.md --plot docs/recipe-sweep.png

Each argument is ``LABEL=REPORT``. The table has one row per run: the tuned ROUGE-L, chrF, BLEU
and perplexity, ROUGE-L over the base's, answer length over the references', the share of
answers cut by ``max_new_tokens``, intent accuracy, the decoding settings and the wall time.
Runs are only comparable on the same examples: the table says how many each used.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

COLUMNS = (
    ("ROUGE-L", lambda r: r["tuned"]["rougeL"], "{:.1f}"),
    ("chrF", lambda r: r["tuned"]["chrf"], "{:.1f}"),
    ("BLEU", lambda r: r["tuned"]["bleu"], "{:.1f}"),
    ("ROUGE-L / base", lambda r: r["tuned"]["rougeL"] / r["base"]["rougeL"], "{:.2f}x"),
    ("perplexity", lambda r: r["tuned"]["perplexity"], "{:.2f}"),
    ("length / reference", lambda r: r["tuned"].get("length_ratio"), "{:.2f}"),
    ("answers cut", lambda r: r["tuned"].get("answers_cut_share"), "{:.0%}"),
    ("intent accuracy", lambda r: r["tuned"].get("intent_accuracy"), "{:.3f}"),
    ("max_new_tokens", lambda r: r["generation"]["max_new_tokens"], "{}"),
    ("repetition penalty", lambda r: r["generation"]["repetition_penalty"], "{}"),
    ("examples", lambda r: r["n_examples"], "{}"),
    ("eval wall s", lambda r: r.get("wall_s"), "{:.0f}"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="LABEL=REPORT.json, one per run")
    parser.add_argument("--markdown", type=Path, help="Write the table here.")
    parser.add_argument("--plot", type=Path, help="Write the bar chart here.")
    return parser.parse_args(argv)


def load_runs(specs: list[str]) -> list[tuple[str, dict[str, Any]]]:
    runs = []
    for spec in specs:
        label, sep, path = spec.rpartition("=")
        if not sep or not label:
            raise SystemExit(f"error: {spec!r} is not LABEL=REPORT.json")
        report = json.loads(Path(path).read_text())
        if report.get("tuned") is None:
            raise SystemExit(f"error: {path} has no tuned model (evaluated without an adapter)")
        runs.append((label, report))
    return runs


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def table(runs: list[tuple[str, dict[str, Any]]]) -> str:
    header = "| run | " + " | ".join(name for name, _, _ in COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(COLUMNS)
    rows = [
        f"| {label} | " + " | ".join(_cell(get(r), fmt) for _, get, fmt in COLUMNS) + " |"
        for label, r in runs
    ]
    return "\n".join([header, rule, *rows]) + "\n"


def plot(runs: list[tuple[str, dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Horizontal bars: run labels are long, and on an x axis they overlap past a few runs.
    labels = [label for label, _ in runs]
    figure, axes = plt.subplots(1, 2, figsize=(14, 1.5 + 0.55 * len(runs)), sharey=True)
    for axis, metric, title in zip(axes, ("rougeL", "chrf"), ("ROUGE-L", "chrF"), strict=True):
        base = [r["base"][metric] for _, r in runs]
        tuned = [r["tuned"][metric] for _, r in runs]
        positions = range(len(runs))
        axis.barh([p + 0.2 for p in positions], base, 0.4, label="base", color="#9aa5b1")
        bars = axis.barh([p - 0.2 for p in positions], tuned, 0.4, label="tuned", color="#3b7dd8")
        axis.bar_label(bars, fmt="%.1f", padding=2)
        axis.set_yticks(list(positions), labels, fontsize=8)
        axis.set_title(f"{title} (0-100)")
        axis.set_xlim(0, 1.12 * max(tuned + base))
    axes[0].invert_yaxis()  # the first run on top, as in the table
    handles, names = axes[0].get_legend_handles_labels()
    figure.legend(handles, names, loc="upper right", ncols=2, frameon=False)
    figure.suptitle("Recipe sweep: held-out answers, greedy")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = load_runs(args.runs)
    text = table(runs)
    print(text, end="")
    if args.markdown:
        args.markdown.write_text(text)
    if args.plot:
        plot(runs, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
