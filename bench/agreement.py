"""Do the CTranslate2 engine's greedy answers equal PEFT's? One count per compute type.

    python bench/agreement.py --adapter models/supportlm-smollm2 --json docs/results/agreement.json

The adapter on the embedded SmolLM2, 20 held-out questions of the bundled data (its test split),
greedy, no repetition penalty, 32 new tokens: PEFT's answers (transformers, float32, adapter
unmerged) against CTranslate2's on the merged copy the engine converts, computed in each of
CTranslate2's CPU compute types. The engine's `COMPUTE_TYPE` is chosen from these counts and
`bench/generation.py`'s speeds (target of issue 27: the same 32 tokens on at least 18 of 20).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from supportlm.engines import ct2, registry
from supportlm.engines.base import GenerationSettings
from supportlm.engines.transformers import TransformersEngine
from supportlm.modeling import load_model, resolve_model
from supportlm.run_folder import RunFolder
from supportlm.train.data.dataset import split_examples
from supportlm.train.data.examples import load_examples

SETTINGS = GenerationSettings(max_new_tokens=32, repetition_penalty=1.0)


def questions(count: int) -> list[list[dict[str, str]]]:
    examples, _ = load_examples("data/customer_support.jsonl")
    test = split_examples(examples)["test"][:count]
    return [[{"role": "user", "content": example.first_user_message}] for example in test]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    asked = questions(args.questions)
    loaded = load_model("embedded", quantization="none", dtype="float32", adapter=args.adapter)
    RunFolder(args.adapter).prompt_style().apply(loaded.tokenizer)
    peft = TransformersEngine.from_loaded(loaded)
    reference = [peft.generate(peft.request(q, SETTINGS)).text for q in asked]
    options = registry.EngineOptions("embedded", resolve_model("embedded"), adapter=args.adapter)
    report = {"questions": len(asked), "settings": SETTINGS.to_dict(), "same_first_32": {}}
    for compute_type in ("float32", "int8_float32", "int8"):
        ct2.COMPUTE_TYPE = compute_type  # the engine reads it when it loads the generator
        with ct2.build(options) as engine:
            answers = [engine.generate(engine.request(q, SETTINGS)).text for q in asked]
        same = sum(a == b for a, b in zip(answers, reference, strict=True))
        report["same_first_32"][compute_type] = same
        print(f"{compute_type}: the same 32 tokens as PEFT on {same} of {len(asked)}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
