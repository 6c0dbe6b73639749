"""Compare the base model with a fine-tuned LoRA adapter on held-out customer-service data.

    python finetune/evaluate.py --adapter outputs/smollm2-support --limit 30 \
        --output outputs/eval.json

Writes the report as JSON, Markdown (eval.md) and a bar chart (eval.png). By default the data is
the test split of what the adapter was trained on; see `supportlm.train.evaluation` for the choices.
Without --adapter only the base model is evaluated.
"""

from __future__ import annotations

import sys

from transformers import HfArgumentParser

from supportlm import setup_logging
from supportlm.errors import SupportLMError
from supportlm.train.eval_report import write_report
from supportlm.train.evaluation import evaluate
from supportlm.train.evaluation_args import EvaluationArguments


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    try:
        (args,) = HfArgumentParser(EvaluationArguments).parse_args_into_dataclasses(argv)
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


if __name__ == "__main__":
    sys.exit(main())
