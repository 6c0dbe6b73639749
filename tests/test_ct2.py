"""The CTranslate2 engine on the real SmolLM2 and the shipped adapter: PEFT's greedy answers, the
`Engine` contract (request ids, abort, stop strings, adapter refs, live switch) and the order
``auto`` takes when llama.cpp is not installed."""

from __future__ import annotations

import itertools
import threading

import pytest
from helpers import save_random_adapter

from supportlm.engines import ct2, registry
from supportlm.engines.base import AdapterRef, GenerationSettings
from supportlm.engines.transformers import TransformersEngine
from supportlm.errors import SupportLMError
from supportlm.modeling import load_model, resolve_model
from supportlm.run_folder import SHIPPED_ADAPTER, RunFolder, point_latest
from supportlm.serve.assistant import Assistant
from supportlm.serve.backends import build_engine
from supportlm.serve.info import serving_info
from supportlm.serve.settings import AppSettings
from supportlm.serve.switching import AdapterSwitcher
from supportlm.train.data.dataset import split_examples
from supportlm.train.data.examples import load_examples

pytestmark = pytest.mark.skipif(not ct2.is_available(), reason="ctranslate2 is not installed")

GREEDY = GenerationSettings(max_new_tokens=32, repetition_penalty=1.0)
LONG = GenerationSettings(max_new_tokens=300, repetition_penalty=1.0)


def options(adapter=SHIPPED_ADAPTER) -> registry.EngineOptions:
    adapter = str(adapter) if adapter else None
    return registry.EngineOptions("embedded", resolve_model("embedded"), adapter=adapter)


@pytest.fixture(scope="module")
def engine():
    with registry.build("ctranslate2", options()) as engine:
        yield engine


@pytest.fixture(scope="module")
def questions() -> list[list[dict[str, str]]]:
    """20 held-out questions of the bundled data (its test split, which no adapter trains on)."""
    examples, _ = load_examples("data/customer_support.jsonl")
    test = split_examples(examples)["test"][:20]
    assert len(test) == 20
    return [[{"role": "user", "content": example.first_user_message}] for example in test]


def test_auto_serves_a_gguf_model_on_it_when_llamacpp_is_absent(monkeypatch):
    monkeypatch.setattr(registry, "llamacpp_installed", lambda: False)
    name, reason = registry.choose("auto", "embedded", "cpu", "SUPPORTLM_BACKEND")
    assert name == "ctranslate2"
    assert "no compiler" in reason and "llama-cpp-python is not installed" in reason
    # A folder of safetensors stays on transformers; without the wheel, so does a GGUF model.
    assert registry.choose("auto", "/models/qwen", "cpu", "X")[0] == "transformers"
    monkeypatch.setattr(registry, "ct2_installed", lambda: False)
    assert registry.choose("auto", "embedded", "cpu", "X")[0] == "transformers"


def test_its_greedy_answers_are_those_of_peft(engine, questions):
    # The bar: the same first 32 tokens as PEFT's greedy answers on at least 18 of 20.
    loaded = load_model(
        "embedded", quantization="none", dtype="float32", adapter=str(SHIPPED_ADAPTER)
    )
    RunFolder(SHIPPED_ADAPTER).prompt_style().apply(loaded.tokenizer)
    peft = TransformersEngine.from_loaded(loaded)
    ours = [engine.generate(engine.request(q, GREEDY)) for q in questions]
    theirs = [peft.generate(peft.request(q, GREEDY)) for q in questions]
    assert all(event.num_tokens == 32 or event.finish_reason == "stop" for event in ours)
    same = sum(a.text == b.text for a, b in zip(ours, theirs, strict=True))
    differ = [(a.text, b.text) for a, b in zip(ours, theirs, strict=True) if a.text != b.text]
    assert same >= 18, differ


def test_the_base_model_answers_without_the_adapter(engine, questions):
    tuned = engine.generate(engine.request(questions[0], GREEDY))
    base = engine.generate(engine.request(questions[0], GREEDY, use_adapter=False))
    assert base.finished and tuned.finished and base.text != tuned.text
    assert engine.adapter == RunFolder(SHIPPED_ADAPTER).adapter_ref()


def test_a_stream_grows_and_stops_at_max_new_tokens(engine, questions):
    settings = GenerationSettings(max_new_tokens=9, repetition_penalty=1.1)
    request = engine.request(questions[1], settings)
    events = list(engine.stream(request))
    texts = [event.text for event in events]
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(texts))
    final = events[-1]
    assert final.finish_reason == "length" and final.num_tokens == 9
    assert final.request_id == request.request_id
    assert final.usage["prompt_tokens"] == len(request.prompt_ids)


def test_abort_and_a_closed_stream_stop_the_model(engine, questions):
    request = engine.request(questions[2], LONG)
    events = engine.stream(request)
    next(events)
    assert engine.abort(request.request_id)
    final = list(events)[-1]
    assert final.finish_reason == "cancelled" and final.num_tokens < 20
    assert not engine.abort(request.request_id)
    stop = threading.Event()
    stream = engine.stream(engine.request(questions[2], LONG), stop_event=stop)
    next(stream)
    stream.close()  # what a web server does when the client goes away
    assert stop.is_set()
    assert engine.generate(engine.request(questions[2], GREEDY)).finished  # the lock is free


def test_stop_strings_and_adapter_refs_hold(engine, questions):
    whole = engine.generate(engine.request(questions[3], GREEDY)).text
    word = whole.split()[3]
    settings = GenerationSettings(max_new_tokens=32, repetition_penalty=1.0, stop=(word,))
    cut = engine.generate(engine.request(questions[3], settings))
    assert cut.finish_reason == "stop" and word not in cut.text and whole.startswith(cut.text)
    request = engine.request(questions[3], GREEDY)
    request.adapter = AdapterRef("someone-else", "v-0")
    with pytest.raises(SupportLMError, match="not loaded"):
        engine.generate(request)
    running = engine.stream(same := engine.request(questions[3], LONG))
    next(running)
    with pytest.raises(SupportLMError, match="already running"):
        engine.generate(same)
    running.close()


def test_a_promoted_adapter_is_served_live_and_info_says_which_engine(
    smollm2_dir, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(registry, "llamacpp_installed", lambda: False)  # a fresh clone's install
    runs = []
    for seed in (0, 1):
        folder = save_random_adapter(smollm2_dir, tmp_path / "outputs" / f"r{seed}", seed=seed,
                                     b_std=0.02)  # fmt: skip
        RunFolder(folder).write_record("embedded", {"method": "sft"})
        runs.append(RunFolder(folder))
    point_latest(runs[0])
    plan = AppSettings(feedback_db=tmp_path / "fb.sqlite3").resolve()  # what a fresh start serves
    assistant = Assistant(build_engine(plan), plan)
    info = serving_info(assistant)
    assert info["engine"] == "ctranslate2" and "no compiler" in info["why"]
    assert info["adapter_version"] == runs[0].adapter_version()
    point_latest(runs[1])  # what finetune/promote.py does
    switched = AdapterSwitcher(assistant).check()
    assert switched["to_version"] == runs[1].adapter_version()
    assert serving_info(assistant)["engine"] == "ctranslate2"
    assert assistant.engine.adapter.version == runs[1].adapter_version()
