"""Plot the JSON files written by the benchmarks (for docs/benchmarks.md).

    python bench/plot.py --generation docs/bench/generation.json --train docs/bench/train.json \
        --load docs/bench/load.json --output_dir docs/bench

Each given file becomes one PNG next to the others; a missing file is skipped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _bars(
    axis, labels: list[str], values: list[float], title: str, unit: str, fmt: str = "%.1f"
) -> None:
    bars = axis.bar(labels, values, color=["#9aa5b1"] + ["#3b7dd8"] * (len(values) - 1))
    axis.bar_label(bars, fmt=fmt)
    axis.set_title(title)
    axis.set_ylabel(unit)
    axis.tick_params(axis="x", labelrotation=20)
    axis.set_ylim(0, max(values) * 1.2 if values and max(values) > 0 else 1)


def plot_generation(results: dict, path: Path) -> None:
    cases = [
        (name, results[key])
        for name, key in [
            ("generate fp32\n(baseline)", "baseline"),
            ("llama.cpp\n(same GGUF)", "llamacpp"),
            ("app", "app"),
            ("app streaming", "app_streaming"),
            ("app, adapter off", "app_no_adapter"),
        ]
        if results.get(key)
    ]
    labels = [name for name, _ in cases]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    _bars(axes[0], labels, [c["decode_tok_s"] for _, c in cases], "Decode speed", "tokens/s")
    _bars(axes[1], labels, [c["ttft_s"] for _, c in cases], "Time to first token", "s", "%.2f")
    figure.suptitle("Generation: SmolLM2-135M-Instruct, greedy, same prompt")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_train(results: dict, path: Path) -> None:
    names = [
        ("naive loop", "naive"),
        ("TRL defaults", "trl"),
        ("supportlm", "ours"),
        ("supportlm\npacked", "packed"),
    ]
    cases = [(label, results[key]) for label, key in names if results.get(key)]
    labels = [label for label, _ in cases]
    figure, axes = plt.subplots(1, 4, figsize=(16, 4))
    _bars(
        axes[0],
        labels,
        [c["supervised_tokens_per_second"] for _, c in cases],
        "Training speed",
        "supervised tokens/s",
    )
    _bars(axes[1], labels, [c["eval_loss"] for _, c in cases], "Held-out loss at the end", "loss")
    _bars(axes[2], labels, [c["peak_rss_mb"] / 1024 for _, c in cases], "Peak RSS", "GiB")
    ratios = [c.get("eval_seconds_per_batch", 0) / c["train_seconds_per_step"] for _, c in cases]
    _bars(axes[3], labels, ratios, "Validation batch / training step", "ratio", "%.2f")
    figure.suptitle(
        f"LoRA training: {results['steps']} steps of {results['batch_size']} conversations"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_load(results: dict, path: Path) -> None:
    one, many = results["one_client"], results["n_clients"]
    clients = results.get("clients", many.get("clients", "N"))
    labels = ["1 client", f"{clients} clients"]
    figure, axes = plt.subplots(1, 2, figsize=(9, 4))
    _bars(
        axes[0],
        labels,
        [one["aggregate_tok_s"], many["aggregate_tok_s"]],
        "Aggregate decode speed",
        "tokens/s",
    )
    _bars(axes[1], labels, [one["p95_ttft_s"], many["p95_ttft_s"]], "p95 time to first token", "s")
    figure.suptitle("Serving under concurrent chat clients (gradio_client)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generation", type=Path)
    parser.add_argument("--train", type=Path)
    parser.add_argument("--load", type=Path)
    parser.add_argument("--output_dir", type=Path, default=Path("docs/bench"))
    args = parser.parse_args()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for source, plot in [
        (args.generation, plot_generation),
        (args.train, plot_train),
        (args.load, plot_load),
    ]:
        if source is not None and source.is_file():
            target = args.output_dir / f"{source.stem}.png"
            plot(json.loads(source.read_text()), target)
            print(f"wrote {target}")


if __name__ == "__main__":
    main()
