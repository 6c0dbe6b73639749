"""Are evaluation's greedy answers the same on every run? Two runs per concurrency, compared.

    python bench/repeatability.py --concurrency 8,2 --json docs/results/repeatability.json

The shipped adapter on the embedded SmolLM2, the first held-out test questions of the Bitext
sample, greedy (no repetition penalty, 120 new tokens), decoded by llama.cpp through
`finetune/evaluate.py`'s decoder with that many requests in flight: each concurrency decodes
the same questions twice, and the count of answers that differ between its two runs is printed
with each run's wall time. With more requests than lanes, a lane decodes several sequences in
one batch, and which ones share a batch depends on timing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from supportlm.engines.base import GenerationSettings
from supportlm.modeling import load_model
from supportlm.prompts import with_system_prompt
from supportlm.run_folder import SHIPPED_ADAPTER, RunFolder
from supportlm.train.data.dataset import split_examples
from supportlm.train.data.examples import REPO_ROOT, load_examples
from supportlm.train.judge.decoding import open_decoder

BITEXT = REPO_ROOT.parent / "shared" / "data" / "bitext-customer-support" / "train.csv"
SETTINGS = GenerationSettings(max_new_tokens=120, repetition_penalty=1.0)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--concurrency", default="8,2", help="Comma-separated counts.")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    loaded = load_model("embedded", adapter=str(SHIPPED_ADAPTER))
    style = RunFolder(SHIPPED_ADAPTER).prompt_style()
    style.apply(loaded.tokenizer)
    examples, _ = load_examples(str(BITEXT))
    test = split_examples(examples)["test"][: args.questions]
    questions = [with_system_prompt(e.messages, style.system_prompt)[:-1] for e in test]
    report = {"questions": len(questions), "settings": SETTINGS.to_dict(), "runs": {}}
    for concurrency in (int(count) for count in args.concurrency.split(",")):
        decoder = open_decoder("llama.cpp", loaded, concurrency=concurrency)
        answers, walls = [], []
        try:
            for _ in range(2):
                started = time.perf_counter()
                events = decoder.decode(questions, SETTINGS, use_adapter=True)
                walls.append(round(time.perf_counter() - started, 1))
                answers.append([event.text for event in events])
        finally:
            decoder.close()
        differ = sum(a != b for a, b in zip(*answers, strict=True))
        report["runs"][concurrency] = {"differ": differ, "wall_s": walls}
        print(f"{concurrency} at once: {differ} of {len(questions)} answers differ between two "
              f"runs; wall {walls[0]} s, {walls[1]} s", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
