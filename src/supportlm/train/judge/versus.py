"""A new adapter against the one it should replace (``finetune/evaluate.py --against OLD``).

Both adapters are scored the same way, greedy, through the app's engine (`train.judge.decoding`):

* on the **held-out test split** of the data the old adapter's line was trained on (the old
  run's ``training_config.yaml``, or its nearest ancestor's for a run that has none, e.g. a
  preference stage): ROUGE-L, chrF, BLEU, perplexity, as `finetune/evaluate.py` reports them;
* on the **held-out feedback** (``heldout.jsonl`` of a feedback export, never trained on): ROUGE-L
  and chrF to the corrected (or liked) answers, and pairwise wins: a question where the new
  answer's ROUGE-L to the reference is higher than the old answer's.

The report goes to ``--output`` and into the new run folder as ``versus.json``, where
`finetune/promote.py` reads it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from supportlm.errors import SupportLMError
from supportlm.modeling import load_model, load_tokenizer
from supportlm.prompts import with_system_prompt
from supportlm.run_folder import RunFolder
from supportlm.train.data.examples import Example, load_examples
from supportlm.train.fit.config import run_config
from supportlm.train.judge.arguments import EvaluationArguments
from supportlm.train.judge.decoding import open_decoder
from supportlm.train.judge.evaluation import answer_scores
from supportlm.train.judge.metrics import answer_nll, rouge_l, text_metrics
from supportlm.train.judge.selection import check_adapter, select_data

logger = logging.getLogger(__name__)

VERSUS_FILE = "versus.json"
SIDES = ("old", "new")


def held_out_run(run: RunFolder) -> RunFolder:
    """`run`, or its nearest ancestor, that records the data it was trained on."""
    seen = set()
    while run_config(run) is None:
        parent = (run.lineage().get("parent") or {}).get("path")
        if not parent or parent in seen:
            raise SupportLMError(
                f"{run.path} and its parents record no training data; pass --dataset."
            )
        seen.add(parent)
        run = RunFolder(parent)
    return run


def default_feedback(run: RunFolder) -> str | None:
    """The ``heldout.jsonl`` of the feedback export the new run was trained on, if any."""
    for export in run.lineage().get("feedback_exports") or []:
        candidate = Path(export["file"]).parent / "heldout.jsonl"
        if candidate.is_file():
            return str(candidate)
    return None


def read_feedback(path: str | None) -> list[Example]:
    if path is None:
        return []
    examples, _ = load_examples(path, strict=True)
    return examples


def answers_of(adapter: str, base: str, args, groups: dict[str, list[Example]]) -> dict:
    """Greedy answers and reference NLL of one adapter for each group of examples."""
    loaded = load_model(base, adapter=adapter)
    style = RunFolder(adapter).prompt_style()
    style.apply(loaded.tokenizer)
    decoder = open_decoder(args.engine, loaded, context_length=2048)
    settings = args.generation_settings()
    out: dict[str, Any] = {}
    try:
        for name, examples in groups.items():
            conversations = [with_system_prompt(e.messages, style.system_prompt) for e in examples]
            questions = [conversation[:-1] for conversation in conversations]
            events = decoder.decode(
                questions, settings, use_adapter=True, desc=f"{name} ({adapter})"
            )
            nll = answer_nll(
                loaded.model, loaded.tokenizer, conversations, batch_size=args.batch_size
            )
            out[name] = {"events": events, "nll": nll, "engine": decoder.name}
    finally:
        decoder.close()
    return out


def side_scores(result: dict, references: list[str]) -> dict[str, float]:
    events = result["events"]
    return answer_scores(
        [e.text.strip() for e in events],
        references,
        result["nll"],
        [e.elapsed for e in events],
        [e.num_tokens for e in events],
        [e.finish_reason == "length" for e in events],
    )


def pairwise(old: list[str], new: list[str], references: list[str]) -> dict[str, Any]:
    """Per question, whose answer has the higher ROUGE-L to the reference."""
    wins = losses = ties = 0
    for a, b, reference in zip(old, new, references, strict=True):
        old_score, new_score = rouge_l([a], [reference]), rouge_l([b], [reference])
        wins += new_score > old_score
        losses += new_score < old_score
        ties += new_score == old_score
    total = max(1, wins + losses + ties)
    return {"wins": wins, "losses": losses, "ties": ties, "win_rate": wins / total}


def compare_adapters(args: EvaluationArguments) -> dict[str, Any]:
    """Score ``args.adapter`` (new) against ``args.against`` (old); see the module doc."""
    new_run, old_run = RunFolder.resolve(args.adapter), RunFolder.resolve(args.against)
    base = check_adapter(str(new_run.path))
    if check_adapter(str(old_run.path)) != base:
        raise SupportLMError(f"{new_run.path} and {old_run.path} have different base models.")
    source = held_out_run(old_run)
    style = source.prompt_style()
    tokenizer = style.apply(load_tokenizer(base))  # the split needs token counts, not the model
    data = select_data(args, tokenizer, style.system_prompt, source, 2048)
    feedback_file = args.feedback or default_feedback(new_run)
    groups = {"test": data.examples, "feedback": read_feedback(feedback_file)}
    groups = {name: examples for name, examples in groups.items() if examples}
    runs = {"old": old_run, "new": new_run}
    results = {side: answers_of(str(runs[side].path), base, args, groups) for side in SIDES}
    report: dict[str, Any] = {
        side: {"path": str(runs[side].path), "adapter_version": runs[side].adapter_version()}
        for side in SIDES
    }
    report["test_source"], report["feedback_file"] = str(source.path), feedback_file
    report["dataset"], report["split"] = data.dataset, data.split
    report["generation"] = args.generation_settings().to_dict()
    report["engine"] = results["new"]["test"]["engine"]
    for name, examples in groups.items():
        references = [e.messages[-1]["content"] for e in examples]
        scores = {side: side_scores(results[side][name], references) for side in SIDES}
        answers = {side: [e.text.strip() for e in results[side][name]["events"]] for side in SIDES}
        report[name] = {"n": len(examples), **scores}
        report[name]["delta"] = {k: scores["new"][k] - scores["old"][k] for k in ("rougeL", "chrf")}
        if name == "feedback":
            report[name].update(pairwise(answers["old"], answers["new"], references))
            report[name]["text"] = {s: text_metrics(answers[s], references) for s in SIDES}
    report.setdefault("feedback", {"n": 0})
    (new_run.path / VERSUS_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def versus_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# {Path(report['new']['path']).name} against {Path(report['old']['path']).name}",
        "",
        f"New {report['new']['adapter_version']}, old {report['old']['adapter_version']}; "
        f"test split of {report['dataset']} (from {report['test_source']}), held-out feedback "
        f"{report['feedback_file'] or '(none)'}; engine {report['engine']}.",
        "",
        "| data | n | old ROUGE-L | new ROUGE-L | old chrF | new chrF |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in ("test", "feedback"):
        part = report[name]
        if part["n"]:
            old, new = part["old"], part["new"]
            lines.append(
                f"| {name} | {part['n']} | {old['rougeL']:.1f} | {new['rougeL']:.1f} | "
                f"{old['chrf']:.1f} | {new['chrf']:.1f} |"
            )
    if report["feedback"]["n"]:
        f = report["feedback"]
        lines += ["", f"Feedback, pairwise by ROUGE-L: {f['wins']} wins, {f['losses']} losses, "
                  f"{f['ties']} ties (win rate {f['win_rate']:.0%})."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot_versus(report: dict[str, Any], path: Path) -> None:
    """Old vs new bars: ROUGE-L and chrF on the test split and on the held-out feedback."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, old, new = [], [], []
    for name in ("test", "feedback"):
        if report[name]["n"]:
            for metric in ("rougeL", "chrf"):
                labels.append(f"{name}\n{metric}")
                old.append(report[name]["old"][metric])
                new.append(report[name]["new"][metric])
    figure, axis = plt.subplots(figsize=(7, 4))
    positions = range(len(labels))
    axis.bar([p - 0.2 for p in positions], old, width=0.4, label="old")
    axis.bar([p + 0.2 for p in positions], new, width=0.4, label="new")
    axis.set_xticks(list(positions), labels)
    axis.set_ylabel("score (0-100)")
    axis.legend()
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
