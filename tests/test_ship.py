"""The shipped adapter: a run folder in float16 with its evaluation report and model card."""

from __future__ import annotations

import json

import torch
from helpers import save_random_adapter
from safetensors.torch import load_file

from supportlm.run_folder import RunFolder
from supportlm.train.release.ship import ship


def test_ship_halves_the_weights_and_writes_the_card(tiny_model_dir, tmp_path):
    run_dir = save_random_adapter(tiny_model_dir, tmp_path / "run")
    run = RunFolder(run_dir)
    datasets = ["data/customer_support.jsonl", "../shared/data/bitext-customer-support/train.csv"]
    run.write_record(tiny_model_dir, {"method": "sft", "datasets": datasets})
    report = {"n_examples": 3, "dataset": "x", "split_reason": "held out",
              "generation": {"max_new_tokens": 300}, "engine": {"name": "transformers"},
              "base": {"rougeL": 15.0, "chrf": 26.0, "bleu": 2.0, "perplexity": 6.0},
              "tuned": {"rougeL": 30.0, "chrf": 40.0, "bleu": 15.0, "perplexity": 3.3}}  # fmt: skip
    (tmp_path / "eval.json").write_text(json.dumps(report))
    shipped = RunFolder(ship(run, tmp_path / "models" / "shipped", tmp_path / "eval.json"))
    old = load_file(run_dir / "adapter_model.safetensors")
    new = load_file(shipped.path / "adapter_model.safetensors")
    assert all(t.dtype == torch.float16 for t in new.values())
    for name, tensor in old.items():
        torch.testing.assert_close(new[name].float(), tensor, rtol=1e-3, atol=1e-4)
    assert shipped.lineage()["shipped_from"] == run.adapter_version()
    card = (shipped.path / "README.md").read_text()
    assert "CDLA-Sharing-1.0" in card and "Apache-2.0" in card and "| tuned | 30.0 |" in card
    assert json.loads((shipped.path / "eval.json").read_text()) == report
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), shipped.path)
