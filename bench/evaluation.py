"""Evaluation decoding speed: sequential transformers `generate` vs the app's engine, batched.

    python bench/evaluation.py --adapter outputs/latest --limit 24 --json docs/bench/evaluation.json

Both decode the same held-out prompts (base, then tuned) with the greedy settings of
`finetune/evaluate.py`, one after the other in one process on one loaded model, so the ratio is
measured side by side. `transformers` is what `evaluate.py` did before (one answer at a time);
`fast` is what `evaluate.py --engine auto` picks (llama.cpp, many answers at once, the adapter
applied as the app serves it). `speedup` is the fast engine's answers per second over
transformers'; `same_answers` is the share of answers that are identical text and
`shared_words_median` how many words an answer pair shares before it first differs (llama.cpp
multiplies Q8_0 weights, the adapter merged in, with 8-bit activations; transformers the
de-quantised weights in fp32: greedy decoding turns such small differences into other words once
two tokens are nearly tied).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", required=True, help="Adapter folder (run folder or latest).")
    parser.add_argument("--dataset", help="Default: the adapter's training data (test split).")
    parser.add_argument("--limit", type=int, default=24, help="Held-out examples.")
    parser.add_argument("--max_new_tokens", type=int, default=None, help="Default: evaluate.py's.")
    parser.add_argument("--json", type=Path, help="Write the results here.")
    return parser.parse_args(argv)


def _timed(decoder, prompts, settings) -> dict[str, Any]:
    started = time.perf_counter()
    answers, tokens = {}, 0
    for variant in ("base", "tuned"):
        events = decoder.decode(prompts, settings, use_adapter=variant == "tuned", desc=variant)
        answers[variant] = [event.text.strip() for event in events]
        tokens += sum(event.num_tokens for event in events)
    wall = time.perf_counter() - started
    return {
        "engine": decoder.engine.description,
        "concurrency": decoder.concurrency,
        "wall_s": wall,
        "answers_per_s": 2 * len(prompts) / wall,
        "tok_s": tokens / wall,
        "new_tokens": tokens,
        "answers": answers,
    }


def shared_words(a: str, b: str) -> int:
    """How many words `a` and `b` share from their start."""
    count = 0
    for x, y in zip(a.split(), b.split(), strict=False):
        if x != y:
            break
        count += 1
    return count


def run(args: argparse.Namespace) -> dict[str, Any]:
    from supportlm.prompts import with_system_prompt
    from supportlm.train.judge.arguments import EvaluationArguments
    from supportlm.train.judge.decoding import open_decoder
    from supportlm.train.judge.evaluation import evaluation_inputs

    options = {"adapter": args.adapter, "dataset": args.dataset, "limit": args.limit}
    if args.max_new_tokens is not None:
        options["max_new_tokens"] = args.max_new_tokens
    eval_args = EvaluationArguments(**options)
    inputs = evaluation_inputs(eval_args)
    loaded: Any = inputs.loaded
    conversations = [
        with_system_prompt(e.messages, inputs.system_prompt) for e in inputs.data.examples
    ]
    prompts = [conversation[:-1] for conversation in conversations]
    settings = eval_args.generation_settings()
    results = {}
    for name, choice in (("transformers", "transformers"), ("fast", "llama.cpp")):
        decoder = open_decoder(choice, loaded)
        try:
            results[name] = _timed(decoder, prompts, settings)
        finally:
            decoder.close()
    pairs = [
        (a, b)
        for variant in ("base", "tuned")
        for a, b in zip(
            results["transformers"]["answers"][variant],
            results["fast"]["answers"][variant],
            strict=True,
        )
    ]
    return {
        **results,
        "n_examples": len(prompts),
        "max_new_tokens": settings.max_new_tokens,
        "speedup": results["fast"]["answers_per_s"] / results["transformers"]["answers_per_s"],
        "same_answers": sum(a == b for a, b in pairs) / len(pairs),
        "shared_words_median": statistics.median(shared_words(a, b) for a, b in pairs),
    }


def main(argv: list[str] | None = None) -> int:
    from supportlm import setup_logging

    setup_logging()
    args = parse_args(argv)
    report = run(args)
    print("| engine | answers at once | wall s | answers/s | tok/s |")
    print("|---|---:|---:|---:|---:|")
    for name in ("transformers", "fast"):
        row = report[name]
        print(
            f"| {row['engine']} | {row['concurrency']} | {row['wall_s']:.1f} | "
            f"{row['answers_per_s']:.2f} | {row['tok_s']:.1f} |"
        )
    print(
        f"speedup {report['speedup']:.2f}x, same answers {report['same_answers']:.0%}, "
        f"words shared before the first difference: median {report['shared_words_median']}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
