"""Training: exact labels reach the loss, the fast loss equals the standard one, tiny runs work."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from supportlm.embedded import EMBEDDED_UPSTREAM_ID
from supportlm.errors import SupportLMError
from supportlm.modeling import check_adapter_base, resolve_model
from supportlm.prompts import DEFAULT_SYSTEM_PROMPT, IGNORE_INDEX, tokenize_conversation
from supportlm.run_folder import (
    LATEST_FILE,
    RunFolder,
    compute_adapter_version,
    latest_run,
    update_latest,
)
from supportlm.train.data.dataset import prepare_dataset, question_hash
from supportlm.train.data.examples import Example
from supportlm.train.fit.config import parse_config, run_config
from supportlm.train.fit.run import train
from supportlm.train.fit.trainer import (
    CpuDropout,
    SupportLMTrainer,
    supervised_lm_loss,
    tokenize_examples,
    use_cpu_dropout,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO_ROOT / "finetune" / "train.py"


def tiny_args(model_dir: str, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", model_dir,
        "--output_dir", str(output_dir),
        "--max_examples", "48",
        "--max_seq_length", "256",
        "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "8",
        "--learning_rate", "1e-2",
        "--logging_steps", "1",
        "--eval_steps", "3",
        "--report_to", "none",
        "--disable_tqdm", "true",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory):
    output_dir = tmp_path_factory.mktemp("run") / "tiny-support"
    config = parse_config(tiny_args(tiny_model_dir, output_dir, "--max_steps", "6"))
    return train(config)


def test_labels_survive_into_the_trainer_batches(tiny_model_dir: str, smollm2_tokenizer, tmp_path):
    conversations = [
        [
            {"role": "user", "content": "Where is my order?"},
            {"role": "assistant", "content": "Hi!"},
        ],
        [
            {"role": "user", "content": "Cancel it, please."},
            {"role": "assistant", "content": "Which order number?"},
            {"role": "user", "content": "Order 12345."},
            {"role": "assistant", "content": "Done: order 12345 is cancelled."},
        ],
    ]
    examples = [Example(messages=m) for m in conversations]
    dataset = tokenize_examples(examples, smollm2_tokenizer, system_prompt=DEFAULT_SYSTEM_PROMPT)
    config = parse_config(
        tiny_args(tiny_model_dir, tmp_path, "--max_steps", "1", "--eval_strategy", "no")
    )
    trainer = SupportLMTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=config.training,
        train_dataset=dataset,
        processing_class=smollm2_tokenizer,
        peft_config=config.lora.to_peft_config(),
    )
    batch = next(iter(trainer.get_train_dataloader()))
    expected = {
        tuple(e["input_ids"]): e["labels"]
        for e in (
            tokenize_conversation(
                smollm2_tokenizer, [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, *m]
            )
            for m in conversations
        )
    }
    assert len(batch["input_ids"]) == 2
    for input_ids, labels, mask in zip(
        batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True
    ):
        n = int(mask.sum())
        assert expected[tuple(input_ids[:n].tolist())] == labels[:n].tolist()
        assert (labels[n:] == IGNORE_INDEX).all()
    # The second conversation supervises both answers, never the user turns.
    multi = expected[max(expected, key=len)]
    supervised = smollm2_tokenizer.decode([t for t in multi if t != IGNORE_INDEX])
    assert "Which order number?" in supervised and "Done: order 12345" in supervised
    assert "Cancel it" not in supervised and "Order 12345." not in supervised


def test_micro_batches_with_accumulation_take_the_same_step_as_one_batch(tiny_model_dir, tmp_path):
    # Issue 10, part 2: the default trains batches of 8 as 8 micro-batches of 1 (a fifth of the
    # memory); the optimizer step must be the one a batch of 8 takes.
    def adapter_after_one_step(batch: int, accumulation: int) -> dict:
        output_dir = tmp_path / f"b{batch}"
        # SGD: its step scales with the gradient (Adam's first step would hide a wrong scale).
        flags = [
            "--max_steps",
            "1",
            "--eval_strategy",
            "no",
            "--lora_dropout",
            "0",
            "--optim",
            "sgd",
        ]
        flags += ["--per_device_train_batch_size", str(batch)]
        flags += ["--gradient_accumulation_steps", str(accumulation), "--warmup_steps", "0"]
        train(parse_config(tiny_args(tiny_model_dir, output_dir, *flags)))
        return load_file(output_dir / "adapter_model.safetensors")

    one_batch, micro_batches = adapter_after_one_step(8, 1), adapter_after_one_step(1, 8)
    assert one_batch.keys() == micro_batches.keys()
    changed = [k for k in one_batch if "lora_B" in k and one_batch[k].abs().sum() > 0]
    assert changed
    for name in one_batch:
        torch.testing.assert_close(micro_batches[name], one_batch[name], rtol=1e-3, atol=1e-5)


def random_batch(vocab_size: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab_size, (3, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0  # padding
    labels = input_ids.clone()
    labels[:, :5] = IGNORE_INDEX  # the prompt
    labels[attention_mask == 0] = IGNORE_INDEX
    labels[2, 7] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": attention_mask}, labels


def test_supervised_logits_loss_equals_the_full_loss(tiny_model_dir: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(
        model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    )
    inputs, labels = random_batch(model.config.vocab_size)
    reference = model(**inputs, labels=labels).loss
    loss, count = supervised_lm_loss(model, inputs, labels)
    assert count == int((labels[:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(loss, reference)
    # Under gradient accumulation both divide the summed loss by the tokens of all micro-batches.
    reference = model(**inputs, labels=labels, num_items_in_batch=40).loss
    torch.testing.assert_close(supervised_lm_loss(model, inputs, labels, 40)[0], reference)
    # Same gradients, too.
    model.zero_grad()
    model(**inputs, labels=labels).loss.backward()
    expected = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    supervised_lm_loss(model, inputs, labels)[0].backward()
    actual = [p.grad for p in model.parameters() if p.requires_grad]
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e)


def test_packed_conversations_do_not_attend_to_each_other(tiny_model_dir: str) -> None:
    """TRL's packing (best-fit, position ids, no attention mask) with our loss: each packed
    conversation is scored exactly as it is alone, so no token sees another conversation."""
    from trl import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    examples = [
        Example(
            messages=[
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
        )
        for question, answer in (
            ("Where is my parcel?", "It left our warehouse today."),
            ("Can I pay by card?", "Yes, every major card."),
            ("How do I return a pan?", "Print the label from your account and drop it off."),
        )
    ]
    rows = tokenize_examples(examples, tokenizer, system_prompt=DEFAULT_SYSTEM_PROMPT)
    packed = pack_dataset(rows, seq_length=1024, strategy="bfd")
    assert len(packed) == 1  # all three in one sequence
    collator = DataCollatorForLanguageModeling(
        pad_token_id=tokenizer.pad_token_id, padding_free=True
    )
    batch = collator([packed[0]])
    assert "attention_mask" not in batch
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    with torch.no_grad():
        loss, count = supervised_lm_loss(model, inputs, batch["labels"])
        total, expected_count = 0.0, 0
        for row in rows:
            alone, n = supervised_lm_loss(
                model,
                {"input_ids": torch.tensor([row["input_ids"]])},
                torch.tensor([row["labels"]]),
            )
            total, expected_count = total + float(alone) * n, expected_count + n
        # The same tokens without their position ids: one long causal sequence.
        unbounded, _ = supervised_lm_loss(model, {"input_ids": batch["input_ids"]}, batch["labels"])
    expected = total / expected_count
    assert count == expected_count
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert abs(float(unbounded) - expected) > 10 * abs(float(loss) - expected)


def test_cpu_dropout_drops_each_element_with_probability_p() -> None:
    dropout = CpuDropout(0.1).train()
    x = torch.ones(400, 1000, requires_grad=True)
    torch.manual_seed(0)
    y = dropout(x)
    dropped = y == 0
    # 400k independent draws: the rate is within 5 standard deviations (0.0024) of p.
    assert abs(dropped.float().mean().item() - 0.1) < 0.0024
    # No lane of the four 16-bit draws per 64-bit number is biased, nor any column.
    lanes = dropped.flatten().view(-1, 4).float().mean(0)
    assert torch.all((lanes - 0.1).abs() < 0.005)
    torch.testing.assert_close(y[~dropped], torch.full_like(y[~dropped], 1 / 0.9))
    y.sum().backward()
    torch.testing.assert_close(x.grad, (~dropped).float() / 0.9)
    torch.manual_seed(0)
    assert torch.equal(dropout(x), y)  # seeded like nn.Dropout
    assert torch.equal(dropout.eval()(x), x)


@pytest.mark.parametrize("cpu_dropout", ["true", "false"])
def test_the_cpu_dropout_setting_decides_the_dropout_module(tiny_model_dir, tmp_path, cpu_dropout):
    config = parse_config(
        tiny_args(tiny_model_dir, tmp_path, "--eval_strategy", "no", "--cpu_dropout", cpu_dropout)
    )
    trainer = SupportLMTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=config.training,
        train_dataset=tokenize_examples(
            [Example([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])],
            AutoTokenizer.from_pretrained(tiny_model_dir),
            system_prompt=None,
        ),
        peft_config=config.lora.to_peft_config(),
    )
    dropouts = [
        m.lora_dropout["default"] for m in trainer.model.modules() if hasattr(m, "lora_dropout")
    ]
    assert dropouts and all(isinstance(d, CpuDropout) == (cpu_dropout == "true") for d in dropouts)


def test_trainer_uses_cpu_dropout_for_lora_layers(tiny_model_dir: str) -> None:
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, lora_dropout=0.05, target_modules="all-linear"),
    )
    lora_layers = sum(1 for m in model.modules() if hasattr(m, "lora_dropout"))
    assert use_cpu_dropout(model) == lora_layers > 0
    assert all(
        isinstance(m.lora_dropout["default"], CpuDropout)
        for m in model.modules()
        if hasattr(m, "lora_dropout")
    )
    assert use_cpu_dropout(model) == 0  # already swapped
    inputs, labels = random_batch(model.config.vocab_size)
    model.train()
    supervised_lm_loss(model, inputs, labels)[0].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_loss_falls_on_a_repeated_batch(tiny_model_dir: str) -> None:
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
    )
    inputs, labels = random_batch(model.config.vocab_size)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss, _ = supervised_lm_loss(model, inputs, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05


def test_tiny_run_writes_a_self_describing_folder(tiny_run, tiny_model_dir: str) -> None:
    folder = tiny_run.output_dir
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "chat_template.jinja",
        "supportlm_prompt.json",
        "training_config.yaml",
        "metrics.json",
        "loss.png",
        "data_report.json",
        "data_report.md",
        "intent_questions.jsonl",
        "split.json",
        "README.md",
    ):
        assert (folder / name).is_file(), name
    metrics = json.loads((folder / "metrics.json").read_text())
    for key in (
        "train_loss",
        "eval_loss",
        "eval_perplexity",
        "train_runtime_s",
        "train_supervised_tokens_per_second",
        "peak_memory_mb",
        "dataset_sizes",
    ):
        assert metrics[key] is not None, key
    assert metrics["global_step"] == 6
    assert metrics["eval_perplexity"] == pytest.approx(torch.tensor(metrics["eval_loss"]).exp())
    assert (folder / "loss.png").read_bytes().startswith(b"\x89PNG")
    adapter_config = json.loads((folder / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == resolve_model(tiny_model_dir).name
    check_adapter_base(str(folder), resolve_model(tiny_model_dir))
    run = RunFolder(folder)
    assert run.adapter_version() == compute_adapter_version(folder)  # recorded = the files'
    typed = run_config(run)
    assert run.lineage() == {
        "method": "sft", "datasets": [typed.data.dataset], "replay": None, "parent": None,
        "feedback_exports": [],
    }  # fmt: skip
    assert typed.training.max_steps == 6
    # The split is recorded: the hashes of exactly the questions the data module held out.
    tokenizer = AutoTokenizer.from_pretrained(folder)  # as trained: template saved beside
    system_prompt = typed.model.system_prompt
    splits = prepare_dataset(typed.data, tokenizer, system_prompt=system_prompt).splits
    assert run.split() == {
        name: {question_hash(example) for example in splits[name]}
        for name in ("validation", "test")
    }
    assert run.split()["test"] and not run.split()["test"] & run.split()["validation"]
    assert not list(folder.parent.glob(".*.partial"))  # written whole, then renamed
    saved = parse_config(["--config", str(folder / "training_config.yaml")])
    assert saved.training.max_steps == 6 and saved.model.model_name_or_path == tiny_model_dir
    assert "SUPPORTLM_ADAPTER=" in (folder / "README.md").read_text()


def test_evaluations_score_a_fixed_sample_and_the_last_one_is_not_repeated(
    tiny_model_dir, tmp_path, monkeypatch
):
    calls, losses = [], []
    evaluate = SupportLMTrainer.evaluate

    def counting(self, *args, **kwargs):
        calls.append(len(self.eval_dataset))
        metrics = evaluate(self, *args, **kwargs)
        losses.append(metrics["eval_loss"])
        return metrics

    monkeypatch.setattr(SupportLMTrainer, "evaluate", counting)
    argv = tiny_args(tiny_model_dir, tmp_path / "run", "--max_steps", "6")
    result = train(parse_config([*argv, "--max_eval_examples", "3"]))
    # Evaluations at steps 3 and 6 only: metrics.json takes the best one's loss, not a third pass.
    assert calls == [3, 3]
    metrics = result.metrics
    assert metrics["eval_examples"] == 3 < metrics["dataset_sizes"]["validation"]
    assert metrics["eval_loss"] == min(losses)


def test_a_run_on_two_datasets_records_both(tiny_model_dir, tmp_path) -> None:
    extra = tmp_path / "extra.jsonl"
    extra.write_text(
        "".join(
            json.dumps({"instruction": f"Is gift wrap {i} free?", "response": "Yes, always."})
            + "\n"
            for i in range(12)
        )
    )
    bundled = str(REPO_ROOT / "data" / "customer_support.jsonl")
    argv = tiny_args(tiny_model_dir, tmp_path / "run", "--max_steps", "1")
    argv += ["--dataset", f"{bundled},{extra}", "--dataset_weights", "1,2"]
    result = train(parse_config([*argv, "--eval_strategy", "no"]))
    run = RunFolder(result.output_dir)
    assert run.lineage()["datasets"] == [bundled, str(extra)]
    report = json.loads((result.output_dir / "data_report.json").read_text())
    assert report["source"] == f"{bundled} + {extra}"
    assert run_config(run).data.dataset_weights == "1,2"


def test_the_run_folder_loads_with_plain_peft(tiny_run, tiny_model_dir: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, str(tiny_run.output_dir))
    assert model.peft_config["default"].base_model_name_or_path == str(Path(tiny_model_dir))


def test_lora_weights_change_and_base_weights_do_not(tiny_run, tiny_model_dir: str) -> None:
    adapter = load_file(tiny_run.output_dir / "adapter_model.safetensors")
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)  # LoRA B starts at zero
    base = load_file(Path(tiny_model_dir) / "model.safetensors")
    trained = tiny_run.model.get_base_model().state_dict()
    for name, tensor in base.items():
        key = name.replace(".weight", ".base_layer.weight")
        torch.testing.assert_close(trained.get(key, trained.get(name)), tensor, rtol=0, atol=0)


def test_resume_continues_from_the_checkpoint(tiny_run, tiny_model_dir: str, tmp_path) -> None:
    checkpoint = RunFolder(tiny_run.output_dir).checkpoints_dir / "checkpoint-6"
    assert checkpoint.is_dir()
    assert not list(tiny_run.output_dir.glob("checkpoint-*"))  # never inside the run folder
    output_dir = tmp_path / "resumed"
    args = tiny_args(tiny_model_dir, output_dir, "--max_steps", "8")
    result = train(parse_config([*args, "--resume_from_checkpoint", str(checkpoint)]))
    assert result.metrics["global_step"] == 8
    checkpoints = RunFolder(output_dir).checkpoints_dir
    history = json.loads((checkpoints / "checkpoint-8" / "trainer_state.json").read_text())
    steps = [entry["step"] for entry in history["log_history"] if "loss" in entry]
    assert steps[:6] == [1, 2, 3, 4, 5, 6] and steps[6:] == [7, 8]


def test_wrong_base_adapter_is_refused(tiny_run) -> None:
    with pytest.raises(SupportLMError, match="trained on base model"):
        check_adapter_base(str(tiny_run.output_dir), resolve_model("embedded"))


def test_default_adapter_dir_follows_latest(tmp_path: Path) -> None:
    assert latest_run(tmp_path) is None
    run = tmp_path / "my-run"
    run.mkdir()
    (run / "adapter_config.json").write_text("{}")
    (tmp_path / LATEST_FILE).write_text("my-run\n")
    assert latest_run(tmp_path).path == run


def test_latest_is_replaced_atomically_and_never_written_through_a_symlink(tmp_path: Path):
    outputs = tmp_path / "outputs"
    (outputs / "v1").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("keep me")
    (outputs / LATEST_FILE).symlink_to(elsewhere)
    assert update_latest(RunFolder(outputs / "v1"), outputs)
    assert elsewhere.read_text() == "keep me"
    assert not (outputs / LATEST_FILE).is_symlink()
    assert (outputs / LATEST_FILE).read_text() == "v1\n"
    assert not update_latest(RunFolder(tmp_path / "not-under-outputs"), outputs)


@pytest.mark.parametrize(
    ("make_dataset", "message"),
    [
        (lambda d: d / "missing.jsonl", "does not exist"),
        (lambda d: _write(d / "bad.jsonl", '{"messages": [\n'), "line 1"),
        (lambda d: _write(d / "odd.jsonl", '{"question": "a", "reply": "b"}\n'), "shape"),
    ],
)
def test_bad_input_ends_in_one_sentence(tiny_model_dir, tmp_path, capsys, make_dataset, message):
    from finetune_train import main

    # setup_logging() keeps its first stdout; under capsys that one is closed by the next test.
    logging.getLogger("supportlm").handlers.clear()

    dataset = make_dataset(tmp_path)
    argv = tiny_args(
        tiny_model_dir, tmp_path / "out", "--dataset", str(dataset), "--strict", "true"
    )
    assert main(argv) == 2
    err = capsys.readouterr().err
    last_line = err.strip().splitlines()[-1]  # after the model-loading progress bar
    assert last_line.startswith("error: ") and message in last_line and "Traceback" not in err


def test_unknown_model_fails_through_the_script(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, str(TRAIN_SCRIPT), "--model_name_or_path", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: Unknown model")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(autouse=True, scope="module")
def _finetune_train_importable():
    # finetune/ is a folder of scripts, not a package: import train.py under its own name.
    import importlib.util

    spec = importlib.util.spec_from_file_location("finetune_train", TRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["finetune_train"] = module
    yield
    sys.modules.pop("finetune_train", None)


def test_smoke_run_on_the_real_smollm2(smollm2_dir: str, tmp_path: Path) -> None:
    config = parse_config(
        [
            "--model_name_or_path",
            "embedded",
            "--output_dir",
            str(tmp_path / "smollm2"),
            "--max_examples",
            "16",
            "--max_seq_length",
            "192",
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "2",
            "--eval_strategy",
            "no",
            "--early_stopping_patience",
            "0",
            "--report_to",
            "none",
        ]
    )
    result = train(config)
    metrics = result.metrics
    assert metrics["global_step"] == 2 and metrics["train_supervised_tokens"] > 0
    adapter_config = json.loads((result.output_dir / "adapter_config.json").read_text())
    # Plain PEFT names the upstream Hub model; supportlm's own record names the embedded GGUF,
    # and both resolve to the embedded model for serving.
    assert adapter_config["base_model_name_or_path"] == EMBEDDED_UPSTREAM_ID
    run = RunFolder(result.output_dir)
    assert run.record()["base_model"] == "embedded" and run.base_model() == "embedded"


def test_bench_runs_and_writes_json(tiny_model_dir: str, tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "bench" / "train.py"),
            "--model",
            tiny_model_dir,
            "--dataset",
            str(REPO_ROOT / "data" / "customer_support.jsonl"),
            "--steps",
            "2",
            "--batch_size",
            "2",
            "--max_examples",
            "40",
            "--eval_examples",
            "4",
            "--eval_steps",
            "2",
            "--json",
            str(output),
        ],
        check=True,
        capture_output=True,
        cwd=REPO_ROOT,
    )
    report = json.loads(output.read_text())
    for key in ("speedup_vs_naive", "speedup_vs_trl", "eval_loss_delta", "packed_speedup"):
        assert isinstance(report[key], float)
    for variant in ("naive", "trl", "ours", "packed"):
        assert report[variant]["supervised_tokens"] > 0
        assert report[variant]["eval_loss"] > 0
        assert report[variant]["eval_seconds_per_batch"] > 0
        assert report[variant]["train_seconds_per_step"] > 0
    ours = report["ours"]
    # One validation at step 2 of 2 (eval_steps 2), inside the training wall time.
    assert 0 < report["eval_time_fraction"] == ours["eval_time_fraction"] < 1
    assert report["eval_cost_ratio"] == pytest.approx(
        ours["eval_seconds_per_batch"] / ours["train_seconds_per_step"]
    )
    assert (ours["micro_batch"], ours["accumulation"]) == (1, 2)
    assert report["packed"]["micro_batch"] == 1


def test_yaml_safe_dump_of_config_has_no_python_objects(tiny_run) -> None:
    text = (tiny_run.output_dir / "training_config.yaml").read_text()
    assert "!!python" not in text
    assert yaml.safe_load(text)["lora_r"] == 16


def test_bench_memory_variants_compare_qlora_with_lora16(tiny_model_dir: str, tmp_path) -> None:
    # On a GPU this reports QLoRA's peak CUDA memory against 16-bit LoRA's; here on the CPU it
    # checks the plumbing (4-bit through bitsandbytes, peak RSS) and the report's keys.
    output = tmp_path / "memory.json"
    command = [sys.executable, str(REPO_ROOT / "bench" / "train.py"), "--model", tiny_model_dir]
    command += ["--dataset", str(REPO_ROOT / "data" / "customer_support.jsonl")]
    command += ["--variants", "qlora,lora16", "--steps", "2", "--batch_size", "2"]
    command += ["--max_examples", "40", "--eval_examples", "4", "--json", str(output)]
    subprocess.run(command, check=True, capture_output=True, cwd=REPO_ROOT)
    report = json.loads(output.read_text())
    assert report["qlora"]["quantization"] == "4bit" and report["lora16"]["quantization"] == "none"
    assert report["memory_kind"] == "peak RSS"
    assert report["qlora_memory_ratio"] == pytest.approx(
        report["qlora"]["peak_memory_mb"] / report["lora16"]["peak_memory_mb"], abs=1e-3
    )
    assert "speedup_vs_naive" not in report
