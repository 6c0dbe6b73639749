"""Compare the base model with a fine-tuned LoRA adapter on held-out customer-service data.

    python finetune/evaluate.py --adapter outputs/smollm2-support --limit 30 \
        --output outputs/eval.json

Writes the report as JSON, Markdown (eval.md) and a bar chart (eval.png). By default the data is
the test split of what the adapter was trained on; see `supportlm.train.judge.evaluation` for
the choices.
Without --adapter only the base model is evaluated. With --against OLD the adapter is scored
against OLD instead, on OLD's held-out test split and on held-out feedback, for
finetune/promote.py (`supportlm.train.judge.versus`):

    python finetune/evaluate.py --adapter outputs/v2 --against latest
"""

from __future__ import annotations

import json
import sys

from transformers import HfArgumentParser

from supportlm import setup_logging
from supportlm.errors import SupportLMError
from supportlm.train.judge.arguments import EvaluationArguments
from supportlm.train.judge.evaluation import evaluate
from supportlm.train.judge.report import write_report
from supportlm.train.judge.versus import compare_adapters, plot_versus, versus_markdown


def against(args: EvaluationArguments) -> int:
    report = compare_adapters(args)
    output = args.output_path
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    output.with_suffix(".md").write_text(versus_markdown(report))
    plot_versus(report, output.with_suffix(".png"))
    print(versus_markdown(report))
    print(f"Report: {output} (and .md, .png); finetune/promote.py reads it from the new run folder")
    return 0


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    try:
        (args,) = HfArgumentParser(EvaluationArguments).parse_args_into_dataclasses(argv)
        if args.against:
            return against(args)
        report = evaluate(args)
        paths = write_report(report, args.output_path)
    except SupportLMError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for variant in ("base", "tuned"):
        if report[variant] is not None:
            scores = ", ".join(f"{name} {value:.3g}" for name, value in report[variant].items())
            print(f"{variant}: {scores}")
    print(f"Report: {paths['json']}, {paths['markdown']}, {paths['plot']}")
    return 0
