"""finetune/evaluate.py end to end on the tiny model with a random (non-zero) LoRA adapter."""

from __future__ import annotations

import json
import runpy
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from supportlm.engines import available_cpus, llamacpp
from supportlm.prompts import save_prompt_style
from supportlm.run_folder import SHIPPED_ADAPTER, RunFolder
from supportlm.train.data.dataset import question_hash, split_examples
from supportlm.train.data.examples import load_examples
from supportlm.train.data.sampling import sample_examples
from supportlm.train.judge.evaluation import METRICS, TRAINING_CONFIG_FILE

EVALUATE = Path(__file__).resolve().parents[1] / "finetune" / "evaluate.py"
SYSTEM_PROMPT = "You are the support assistant of a small kitchenware shop."
RECORDS = [
    ("How do I cancel my order?", "Open My Orders, pick the order and press Cancel.", "chat"),
    ("Where is my parcel?", "Your tracking link is in the shipping confirmation email.", "chat"),
    ("Can I pay with PayPal?", "Yes, we accept PayPal, cards and bank transfer.", "chat"),
    ("Do you ship to Norway?", "Yes, delivery to Norway takes four to six working days.", "chat"),
    (
        "Summarise the following customer-service text in one short paragraph.\n\nText:\n"
        "Customer: my pan arrived dented. Agent: sorry, we will send a new one today.",
        "A customer's pan arrived dented and the agent promised a replacement today.",
        "summarize",
    ),
    (
        "Translate the following text into French. Reply with the translation only.\n\nText:\n"
        "Your refund has been issued.",
        "Votre remboursement a été effectué.",
        "translate",
    ),
]


def _write_jsonl(path: Path) -> Path:
    lines = [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer},
                ],
                "task": task,
            }
        )
        for question, answer, task in RECORDS
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return _write_jsonl(tmp_path_factory.mktemp("data") / "support.jsonl")


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir, smollm2_tokenizer, dataset) -> Path:
    """A LoRA adapter as finetune/train.py writes it, with random B so that tuned != base."""
    folder = tmp_path_factory.mktemp("adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)  # the same random adapter on every run
    # init_lora_weights=False keeps B random instead of zero: the adapter changes the output.
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    get_peft_model(base, config).save_pretrained(folder)
    save_prompt_style(folder, smollm2_tokenizer, SYSTEM_PROMPT)
    training_config = {
        "model_name_or_path": tiny_model_dir,
        "dataset": str(dataset),
        "max_seq_length": 256,
        "validation_ratio": 0.0,
        "test_ratio": 0.5,
    }
    (folder / TRAINING_CONFIG_FILE).write_text(yaml.safe_dump(training_config))
    return folder


@pytest.fixture(scope="module")
def evaluate_main():
    return runpy.run_path(str(EVALUATE), run_name="evaluate_cli")["main"]


def test_adapter_is_compared_with_base_on_its_held_out_split(
    evaluate_main, adapter_dir, dataset, tmp_path
):
    output = tmp_path / "eval.json"
    status = evaluate_main(
        ["--adapter", str(adapter_dir), "--output", str(output), "--max_new_tokens", "8"]
    )
    assert status == 0
    report = json.loads(output.read_text())

    # The same hash split training used: test_ratio 0.5 of the adapter's data, nothing else.
    examples, _ = load_examples(dataset)
    held_out = split_examples(examples, validation_ratio=0.0, test_ratio=0.5)["test"]
    assert 0 < report["n_examples"] == len(held_out) < len(RECORDS)
    assert report["split"] == "test"
    assert {e["question"] for e in report["examples"]} == {
        e.messages[0]["content"] for e in held_out
    }
    assert report["adapter"] == str(adapter_dir)
    assert report["dataset"] == str(dataset)
    assert report["system_prompt"] == SYSTEM_PROMPT

    for variant in ("base", "tuned"):
        assert set(METRICS) <= set(report[variant])
        assert all(isinstance(report[variant][m], float) for m in METRICS)
    # The adapter really is switched on for "tuned" and off for "base".
    assert report["base"]["perplexity"] != report["tuned"]["perplexity"]
    assert any(e["base"] != e["tuned"] for e in report["examples"])
    assert set(report["by_task"]) <= {"chat", "summarize", "translate"}
    assert sum(task["n_examples"] for task in report["by_task"].values()) == report["n_examples"]

    # The tiny model is no GGUF file: the transformers engine decodes, and the report says why.
    assert report["engine"]["name"] == "transformers"
    assert (
        "not a GGUF model" in report["engine"]["reason"]
        or "not installed" in (report["engine"]["reason"])
    )
    assert report["wall_s"] > 0
    for variant in ("base", "tuned"):
        scores = report[variant]
        # 8 new tokens at most against the references' own length (from the perplexity counts).
        assert scores["new_tokens_mean"] <= 8 < scores["reference_tokens_mean"]
        assert scores["length_ratio"] == pytest.approx(
            scores["new_tokens_mean"] / scores["reference_tokens_mean"]
        )
        assert 0 <= scores["answers_cut_share"] <= 1

    markdown = output.with_suffix(".md").read_text()
    assert "| perplexity |" in markdown and "**Tuned**" in markdown
    assert "- Engine: transformers" in markdown
    assert output.with_suffix(".png").read_bytes().startswith(b"\x89PNG")


def test_the_split_the_run_recorded_is_scored_not_one_re_derived(
    evaluate_main, adapter_dir, dataset, tmp_path
):
    # A run whose split.json held out two questions the ratios (test 0.5) would not pick alone:
    # evaluation scores exactly those, whatever the recorded ratios say.
    folder = tmp_path / "adapter"
    shutil.copytree(adapter_dir, folder)
    examples, _ = load_examples(dataset)
    by_ratio = split_examples(examples, validation_ratio=0.0, test_ratio=0.5)
    chosen = [by_ratio["train"][0], by_ratio["test"][0]]
    RunFolder(folder).write_split(
        {"validation": [], "test": sorted(question_hash(example) for example in chosen)}
    )
    output = tmp_path / "eval.json"
    argv = ["--adapter", str(folder), "--output", str(output), "--max_new_tokens", "2"]
    assert evaluate_main(argv) == 0
    report = json.loads(output.read_text())
    assert {e["question"] for e in report["examples"]} == {e.first_user_message for e in chosen}
    assert "the questions its run recorded" in report["split_reason"]


def test_base_only_with_limit_takes_a_deterministic_sample(
    evaluate_main, tiny_model_dir, dataset, tmp_path
):
    output = tmp_path / "base.json"
    argv = ["--model_name_or_path", tiny_model_dir, "--dataset", str(dataset), "--limit", "3"]
    argv += ["--max_new_tokens", "4", "--output", str(output)]
    assert evaluate_main(argv) == 0
    report = json.loads(output.read_text())
    assert report["tuned"] is None and report["adapter"] is None
    # No training data to hold out: every example is eligible, and --limit picks 3 of them.
    assert report["split"] == "all"
    assert report["n_available"] == len(RECORDS)
    assert report["n_examples"] == 3
    expected = sample_examples(load_examples(dataset)[0], 3)
    assert [e["question"] for e in report["examples"]] == [
        e.messages[0]["content"] for e in expected
    ]
    markdown = output.with_suffix(".md").read_text()
    assert "| metric | base |\n" in markdown and "**Tuned**" not in markdown


def test_missing_adapter_is_a_clear_error(evaluate_main, tmp_path, capsys):
    status = evaluate_main(["--adapter", str(tmp_path / "no-such-run"), "--limit", "2"])
    assert status == 2
    assert capsys.readouterr().err.startswith(f"error: Adapter folder {tmp_path / 'no-such-run'}")


def test_llamacpp_engine_on_a_model_it_cannot_serve_is_a_clear_error(
    evaluate_main, tiny_model_dir, dataset, capsys
):
    argv = ["--model_name_or_path", tiny_model_dir, "--dataset", str(dataset), "--limit", "1"]
    assert evaluate_main([*argv, "--engine", "llama.cpp"]) == 2
    error = capsys.readouterr().err
    assert "error: --engine=llama.cpp: the llama.cpp engine cannot serve here" in error


def _without_timings(value):
    """A report with every timing left out (seconds and rates differ from run to run)."""
    if isinstance(value, dict):
        return {
            key: _without_timings(item)
            for key, item in value.items()
            if not (key.endswith("_s") or "latency" in key or "per_second" in key)
        }
    if isinstance(value, list):
        return [_without_timings(item) for item in value]
    return value


@pytest.mark.skipif(not llamacpp.is_available(), reason="llama-cpp-python is not installed")
def test_the_report_is_the_same_on_every_run(evaluate_main, tmp_path):
    # The shipped adapter on the real SmolLM2, decoded by llama.cpp as the app serves it: greedy
    # answers batched with others used to change with the batch (4 of 32 between two runs).
    reports = []
    for run in ("first", "second"):
        output = tmp_path / f"{run}.json"
        argv = ["--adapter", str(SHIPPED_ADAPTER), "--limit", "12", "--max_new_tokens", "48"]
        assert evaluate_main([*argv, "--output", str(output)]) == 0
        reports.append(json.loads(output.read_text()))
    assert reports[0]["engine"]["name"] == "llama.cpp"
    assert reports[0]["engine"]["concurrency"] == available_cpus()
    assert _without_timings(reports[0]) == _without_timings(reports[1])
    assert reports[0]["tuned"]["rougeL"] != reports[0]["base"]["rougeL"]  # real answers
