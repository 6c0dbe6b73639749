"""Run folders and feedback databases written before the architecture change still load.

The fixtures in tests/fixtures/ were written by main at commit bffc39b (see its README).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM

from supportlm.engines.base import GenerationSettings
from supportlm.prompts import DEFAULT_SYSTEM_PROMPT
from supportlm.run_folder import RunFolder, compute_adapter_version
from supportlm.serve.assistant import Assistant
from supportlm.serve.backends import build_engine
from supportlm.serve.settings import AppSettings
from supportlm.train.fit.config import run_config

FIXTURES = Path(__file__).parent / "fixtures"
OLD_RUN = FIXTURES / "v0-run-folder"


@pytest.fixture
def old_run(tmp_path: Path) -> RunFolder:
    return RunFolder(shutil.copytree(OLD_RUN, tmp_path / "v0-run"))


def test_an_old_run_folder_reads_through_run_folder(old_run: RunFolder) -> None:
    assert old_run.record() == {}  # no supportlm_run.json yet
    assert old_run.base_model() == "embedded"  # as that version rewrote adapter_config.json
    assert old_run.adapter_version() == compute_adapter_version(old_run.path)
    assert old_run.prompt_style().system_prompt == DEFAULT_SYSTEM_PROMPT
    assert old_run.prompt_style().chat_template
    assert old_run.metrics()["global_step"] == 2
    config = run_config(old_run)  # the old YAML re-parsed with today's dataclasses
    assert (config.lora.lora_r, config.training.max_steps) == (1, 2)
    assert config.data.dataset == "data/customer_support.jsonl"


def test_the_app_serves_an_old_run_folder(old_run: RunFolder, tmp_path: Path) -> None:
    plan = AppSettings(
        adapter=str(old_run.path),
        backend="transformers",
        feedback_db=tmp_path / "feedback.sqlite3",
    ).resolve()
    assert plan.model == "embedded"
    assistant = Assistant(build_engine(plan), plan)
    assert assistant.engine.adapter == old_run.adapter_ref()
    settings = GenerationSettings(max_new_tokens=8)
    chat = assistant.chat_request("Where is my order?", [], None, settings)
    final = list(assistant.chat(chat, settings))[-1]
    assert final.finished and final.text
    stored = assistant.feedback.get_reply(final.request_id)
    assert stored["adapter_version"] == old_run.adapter_version()


def test_an_old_adapter_loads_with_plain_peft(old_run: RunFolder, smollm2_dir: str) -> None:
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    model = PeftModel.from_pretrained(base, str(old_run.path))
    assert model.peft_config["default"].r == 1
