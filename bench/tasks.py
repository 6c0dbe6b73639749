"""Summarise and Translate against public references: the app's own task code, base and tuned.

    python bench/tasks.py --adapter models/supportlm-smollm2 --summaries 40 --translations 40 \
        --json docs/results/tasks.json

Reads the reference sets in ``../shared/data/`` (see its ``tasks-README.md``; they are not part
of this repository, most are non-commercial): TweetSumm and DialogSum ``eval`` conversations,
summarised by `supportlm.serve.tasks.summarize.summarize` in the ``paragraph`` style (the same
map-reduce and call budget as the Summarise tab), scored with ROUGE-1/2/L against every human
summary (the best match, as rouge-score's ``score_multi``); NTREX-128 sentences translated by
`supportlm.serve.tasks.translate.translate` en->de/fr/es and back, scored with sacrebleu's chrF
and BLEU; and Bitext answers with ``{{placeholders}}``, numbers and URLs translated en->de,
where the check is that every such span survives exactly. The first items of each file are
taken, in file order (a fixed sample). Each model (the base without the adapter, then tuned)
runs on the engine the app would pick; wall time and model calls are reported per set.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import sacrebleu
from rouge_score import rouge_scorer
from tqdm.auto import tqdm

from supportlm.engines import registry
from supportlm.engines.base import GenerationSettings, final_event
from supportlm.modeling import resolve_model
from supportlm.run_folder import SHIPPED_ADAPTER
from supportlm.serve.tasks.common import PROTECTED
from supportlm.serve.tasks.summarize import summarize
from supportlm.serve.tasks.translate import translate
from supportlm.train.data.examples import REPO_ROOT

DATA = REPO_ROOT.parent / "shared" / "data"
LANGUAGES = {"en": "English", "de": "German", "fr": "French", "es": "Spanish"}
DIRECTIONS = [("en", "de"), ("en", "fr"), ("en", "es"), ("de", "en"), ("fr", "en"), ("es", "en")]


def read_jsonl(path: Path, limit: int) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as lines:
        return [json.loads(line) for _, line in zip(range(limit), lines, strict=False)]


def spans_sample(limit: int) -> list[str]:
    """Bitext answers holding placeholders, numbers or URLs: what must survive translation."""
    import csv

    texts = []
    with (DATA / "bitext-customer-support" / "train.csv").open(encoding="utf-8") as file:
        for row in csv.DictReader(file):
            answer = row["response"].split("\n")[0]
            if "{{" in answer and len(answer) < 400:
                texts.append(answer)
            if len(texts) == limit:
                break
    return texts


class CountingEngine:
    """The engine, with its model calls counted (every call is one `stream`)."""

    def __init__(self, engine) -> None:
        self.engine, self.calls = engine, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def stream(self, *args, **kwargs):
        self.calls += 1
        return self.engine.stream(*args, **kwargs)


def counts(engine: CountingEngine, outputs: list) -> dict[str, Any]:
    return {"calls": engine.calls, "items": len(outputs)}


def summaries(engine: CountingEngine, items: list[dict], settings) -> dict[str, Any]:
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    started, engine.calls, scores = time.perf_counter(), 0, []
    for item in tqdm(items, desc="Summaries", unit="conversation"):
        text = final_event(summarize(engine, item["dialogue"], "paragraph", settings)).text
        scores.append(scorer.score_multi(item["summaries"], text))
    wall = time.perf_counter() - started
    means = {name: 100 * sum(s[name].fmeasure for s in scores) / len(scores) for name in scores[0]}
    return {**means, "wall_s": wall, **counts(engine, scores)}


def translations(engine: CountingEngine, items: list[dict], settings) -> dict[str, Any]:
    result = {}
    for source, target in DIRECTIONS:
        started, engine.calls = time.perf_counter(), 0
        pair = {"source_language": LANGUAGES[source], "target_language": LANGUAGES[target]}
        outputs = [
            final_event(translate(engine, item[source], settings=settings, **pair)).text
            for item in tqdm(items, desc=f"{source}->{target}", unit="sentence")
        ]
        references = [[item[target] for item in items]]
        result[f"{source}-{target}"] = {
            "chrf": sacrebleu.corpus_chrf(outputs, references).score,
            "bleu": sacrebleu.corpus_bleu(outputs, references).score,
            "numbers_kept": kept_share([item[source] for item in items], outputs),
            "wall_s": time.perf_counter() - started,
            **counts(engine, outputs),
        }
    return result


def kept_share(sources: list[str], outputs: list[str]) -> float | None:
    """Share of the protected spans (placeholders, URLs, e-mails, numbers) found in the output."""
    spans = [(span, output) for source, output in zip(sources, outputs, strict=True)
             for span in PROTECTED.findall(source)]  # fmt: skip
    return sum(span in output for span, output in spans) / len(spans) if spans else None


def spans_survival(engine: CountingEngine, texts: list[str], settings) -> dict[str, Any]:
    started, engine.calls = time.perf_counter(), 0
    outputs = [final_event(translate(engine, text, "German", settings)).text for text in texts]
    return {"kept": kept_share(texts, outputs), "wall_s": time.perf_counter() - started,
            **counts(engine, outputs)}  # fmt: skip


def run_model(args, adapter: str | None) -> dict[str, Any]:
    options = registry.EngineOptions(args.model, resolve_model(args.model), adapter=adapter)
    name, reason = registry.choose(args.backend, args.model, "cpu", "--backend")
    engine = CountingEngine(registry.build(name, options))
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=0.0)
    try:
        report = {"engine": engine.description, "why": reason}
        for name in ("tweetsumm", "dialogsum"):
            items = read_jsonl(DATA / name / "eval.jsonl", args.summaries)
            report[name] = summaries(engine, items, settings)
        report["ntrex"] = translations(
            engine, read_jsonl(DATA / "ntrex" / "eval.jsonl", args.translations), settings
        )
        report["placeholders"] = spans_survival(engine, spans_sample(args.translations), settings)
    finally:
        engine.close()
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--adapter", default=str(SHIPPED_ADAPTER))
    parser.add_argument("--backend", default="auto", choices=registry.local_choices())
    parser.add_argument("--summaries", type=int, default=40, help="Conversations per set.")
    parser.add_argument("--translations", type=int, default=40, help="Sentences a direction.")
    parser.add_argument("--max_new_tokens", type=int, default=160)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    report = {"settings": vars(args) | {"json": None},
              "base": run_model(args, None), "tuned": run_model(args, args.adapter)}  # fmt: skip
    print(json.dumps({k: v for k, v in report.items() if k != "settings"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


if __name__ == "__main__":
    main()
