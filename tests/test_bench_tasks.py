"""bench/tasks.py runs the app's summarise and translate code on the reference sets, base and
tuned, on the tiny model, and writes every metric (the figures themselves are the real run's)."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
from helpers import save_random_adapter

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH = REPO_ROOT / "bench" / "tasks.py"
DATA = REPO_ROOT.parent / "shared" / "data"

pytestmark = pytest.mark.skipif(
    not (DATA / "tweetsumm" / "eval.jsonl").is_file(), reason="the reference sets are in ../shared"
)


def test_every_metric_of_both_models_is_reported(tiny_model_dir, tmp_path):
    adapter = save_random_adapter(tiny_model_dir, tmp_path / "adapter", seed=0)
    output = tmp_path / "tasks.json"
    main = runpy.run_path(str(BENCH), run_name="bench_tasks")["main"]
    argv = ["--model", tiny_model_dir, "--adapter", str(adapter), "--backend", "transformers"]
    main([*argv, "--summaries", "2", "--translations", "2", "--max_new_tokens", "8",
          "--json", str(output)])  # fmt: skip
    report = json.loads(output.read_text())
    for model in ("base", "tuned"):
        scores = report[model]
        for name in ("tweetsumm", "dialogsum"):
            assert {"rouge1", "rouge2", "rougeL", "wall_s", "calls"} <= scores[name].keys()
            assert scores[name]["items"] == 2 and scores[name]["calls"] >= 2
        assert sorted(scores["ntrex"]) == ["de-en", "en-de", "en-es", "en-fr", "es-en", "fr-en"]
        for direction in scores["ntrex"].values():
            assert {"chrf", "bleu", "numbers_kept", "calls"} <= direction.keys()
            assert 0 <= direction["chrf"] <= 100
        assert 0 <= scores["placeholders"]["kept"] <= 1
    assert "transformers" in report["tuned"]["engine"]
