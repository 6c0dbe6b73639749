"""Continuing an adapter on exported feedback with replay (``--init_adapter``), and its lineage."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file
from test_training import REPO_ROOT, tiny_args

from supportlm.errors import SupportLMError
from supportlm.feedback.export import export_feedback
from supportlm.feedback.store import FeedbackStore, ReplyRecord
from supportlm.run_folder import RunFolder
from supportlm.train.fit.config import parse_config
from supportlm.train.fit.run import _load_model, _prepare_data, train

BUNDLED = str(REPO_ROOT / "data" / "customer_support.jsonl")


@pytest.fixture(scope="module")
def parent_run(tiny_model_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("parent") / "tiny-support"
    return train(parse_config(tiny_args(tiny_model_dir, output_dir, "--max_steps", "3")))


@pytest.fixture(scope="module")
def feedback_export(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("feedback")
    store = FeedbackStore(folder / "feedback.sqlite3")
    for i in range(30):
        question = [{"role": "user", "content": f"Can I return the blue kettle number {i}?"}]
        store.add_reply(ReplyRecord(f"r{i}", question, "I do not know.", adapter_version="v-x"))
        store.add_feedback(
            "correction", f"r{i}", corrected_answer="Yes, within 30 days.", trusted=True
        )
    export_feedback(store, folder / "export", heldout_share=0)
    return str(folder / "export" / "sft.jsonl")


def continue_args(tiny_model_dir, parent, output_dir, sft, *extra):
    argv = tiny_args(tiny_model_dir, output_dir, "--max_steps", "2", "--eval_strategy", "no")
    return [*argv, "--init_adapter", str(parent), "--dataset", sft, "--replay_dataset", BUNDLED,
            "--max_examples", "200", *extra]  # fmt: skip


def test_a_continued_run_starts_from_the_parent_and_records_its_lineage(
    parent_run,
    tiny_model_dir,
    feedback_export,
    tmp_path,
    monkeypatch,
):
    monkeypatch.chdir(tmp_path)  # outputs/latest of this test, not the repository's
    parent = RunFolder(parent_run.output_dir)
    config = parse_config(
        continue_args(tiny_model_dir, parent.path, tmp_path / "v2", feedback_export)
    )
    loaded = _load_model(config, parent)
    start = {k: v for k, v in loaded.model.state_dict().items() if "lora_B" in k}
    saved = load_file(parent.path / "adapter_model.safetensors")
    assert start and all(v.abs().sum() > 0 for v in start.values())  # not a fresh (zero) LoRA B
    assert sum(v.numel() for v in start.values()) == sum(
        v.numel() for k, v in saved.items() if "lora_B" in k
    )
    assert any(p.requires_grad for n, p in loaded.model.named_parameters() if "lora_" in n)

    result = train(config)
    run = RunFolder(result.output_dir)
    lineage = run.lineage()
    assert lineage["parent"]["adapter_version"] == parent.adapter_version()
    assert lineage["replay"] == {"dataset": BUNDLED, "share": 0.5}
    (export,) = lineage["feedback_exports"]
    assert export["rows"]["sft"] == 30 and len(export["export_hash"]) == 16
    assert run.adapter_version() != parent.adapter_version()
    assert not (tmp_path / "outputs" / "latest").exists()  # a candidate: promote.py moves latest
    trained = load_file(run.path / "adapter_model.safetensors")
    assert trained.keys() == saved.keys()
    assert any(not torch.equal(trained[k], saved[k]) for k in saved)


def test_replay_makes_up_its_share_of_the_training_split(
    parent_run,
    tiny_model_dir,
    feedback_export,
    tmp_path,
):
    parent = parent_run.output_dir
    for share in (0.5, 0.25):
        argv = continue_args(tiny_model_dir, parent, tmp_path, feedback_export)
        config = parse_config([*argv, "--replay_share", str(share)])
        loaded = _load_model(config, RunFolder(parent))
        train_split = _prepare_data(config, loaded).splits["train"]
        counts = Counter(e.meta["dataset"] for e in train_split)
        assert counts[BUNDLED] == round(counts[feedback_export] * share / (1 - share))


@pytest.mark.parametrize(
    ("extra", "message"),
    [(("--lora_r", "8"), "lora_r 16 \\(config 8\\)"),
     (("--lora_target_modules", "q_proj,v_proj"), "lora_target_modules")],
)  # fmt: skip
def test_another_lora_shape_is_refused(parent_run, tiny_model_dir, tmp_path, extra, message):
    argv = tiny_args(tiny_model_dir, tmp_path, "--init_adapter", str(parent_run.output_dir), *extra)
    config = parse_config(argv)
    with pytest.raises(SupportLMError, match=message):
        _load_model(config, RunFolder(parent_run.output_dir))


def test_a_folder_without_an_adapter_is_refused_before_loading(tiny_model_dir, tmp_path):
    with pytest.raises(SupportLMError, match="holds no adapter"):
        parse_config(tiny_args(tiny_model_dir, tmp_path / "out", "--init_adapter", str(tmp_path)))


def test_latest_names_the_served_run(parent_run, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "latest").write_text(str(parent_run.output_dir) + "\n")
    config = parse_config(tiny_args(tiny_model_dir, tmp_path / "v2", "--init_adapter", "latest"))
    assert config.model.init_adapter == "latest"
    record = json.loads((parent_run.output_dir / "supportlm_run.json").read_text())
    assert RunFolder.resolve("latest").adapter_version() == record["adapter_version"]
