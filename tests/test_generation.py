"""The transformers engine: streaming, stop event, adapter switch, errors."""

from __future__ import annotations

import itertools
import threading

import pytest
import torch

from supportlm.errors import SupportLMError
from supportlm.generation import Engine, GenerationSettings, StreamEvent, TransformersEngine
from supportlm.modeling import load_model
from supportlm.prompts import encode_chat

GREEDY = GenerationSettings(max_new_tokens=12, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> TransformersEngine:
    return TransformersEngine.from_loaded(load_model(tiny_model_dir))


@pytest.fixture(scope="module")
def prompt(engine) -> list[int]:
    return encode_chat(engine.tokenizer, [{"role": "user", "content": "Where is my parcel?"}])


def test_engine_satisfies_the_protocol(engine):
    assert isinstance(engine, Engine)
    assert engine.name == "transformers" and engine.context_length == 2048


def test_stream_grows_and_matches_generate(engine, prompt):
    events = list(engine.stream(prompt, GREEDY))
    texts = [e.text for e in events]
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(texts))
    final = events[-1]
    assert final.finished and final.finish_reason in {"length", "stop"}
    assert final.num_tokens <= GREEDY.max_new_tokens
    assert final.time_to_first_token is not None and final.time_to_first_token <= final.elapsed
    with torch.inference_mode():
        ids = engine.model.generate(
            torch.tensor([prompt]),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=engine._eos_token_ids,
            pad_token_id=engine.tokenizer.pad_token_id,
        )
    expected = engine.tokenizer.decode(ids[0, len(prompt) :], skip_special_tokens=True)
    assert final.text == expected
    assert engine.generate(prompt, GREEDY).text == expected


def test_stop_event_really_stops_generation(engine, prompt):
    stop = threading.Event()
    settings = GenerationSettings(max_new_tokens=400, repetition_penalty=1.0)
    events = []
    for event in engine.stream(prompt, settings, stop_event=stop):
        events.append(event)
        if len(events) == 2:
            stop.set()
    assert events[-1].finish_reason == "cancelled"
    assert events[-1].num_tokens < 50


def test_closing_the_stream_stops_the_generation_thread(engine, prompt):
    stop = threading.Event()
    settings = GenerationSettings(max_new_tokens=400, repetition_penalty=1.0)
    stream = engine.stream(prompt, settings, stop_event=stop)
    next(stream)
    stream.close()  # what a web server does when the client goes away
    assert stop.is_set()
    # The engine lock is free again: the next request runs.
    assert engine.generate(prompt, GREEDY).finished


def test_errors_reach_the_caller_and_the_engine_keeps_serving(engine, prompt):
    with pytest.raises(IndexError):
        engine.generate([engine.model.config.vocab_size + 10], GREEDY)
    assert engine.generate(prompt, GREEDY).finished


def test_settings_are_validated():
    with pytest.raises(SupportLMError):
        GenerationSettings(max_new_tokens=0)
    with pytest.raises(SupportLMError):
        GenerationSettings(top_p=0)


def test_tokens_per_second_excludes_the_first_token():
    event = StreamEvent(text="x", num_tokens=11, time_to_first_token=1.0, elapsed=2.0)
    assert event.tokens_per_second == pytest.approx(10.0)
    assert "tok/s" in event.caption()
