"""The transformers engine: streaming, stop event, adapter switch, errors."""

from __future__ import annotations

import dataclasses
import itertools
import threading

import pytest
import torch

from supportlm.engines.base import (
    AdapterRef,
    Engine,
    GenerationSettings,
    StreamEvent,
    cut_at_stop_strings,
)
from supportlm.engines.transformers import TransformersEngine
from supportlm.errors import SupportLMError
from supportlm.modeling import load_model
from supportlm.prompts import encode_chat

GREEDY = GenerationSettings(max_new_tokens=12, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> TransformersEngine:
    return TransformersEngine.from_loaded(load_model(tiny_model_dir))


@pytest.fixture(scope="module")
def prompt() -> list[dict[str, str]]:
    return [{"role": "user", "content": "Where is my parcel?"}]


def test_the_engine_encodes_the_messages_through_the_prompt_module(engine, prompt):
    request = engine.request(prompt, GREEDY)
    assert request.messages == prompt
    assert request.prompt_ids == encode_chat(engine.tokenizer, prompt)


def test_engine_satisfies_the_protocol(engine):
    assert isinstance(engine, Engine)
    assert engine.name == "transformers" and engine.context_length == 2048


def test_stream_grows_and_matches_generate(engine, prompt):
    events = list(engine.stream(engine.request(prompt, GREEDY)))
    texts = [e.text for e in events]
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(texts))
    final = events[-1]
    assert final.finished and final.finish_reason in {"length", "stop"}
    assert final.num_tokens <= GREEDY.max_new_tokens
    assert final.time_to_first_token is not None and final.time_to_first_token <= final.elapsed
    prompt_ids = encode_chat(engine.tokenizer, prompt)
    with torch.inference_mode():
        ids = engine.model.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=engine._eos_token_ids,
            pad_token_id=engine.tokenizer.pad_token_id,
        )
    expected = engine.tokenizer.decode(ids[0, len(prompt_ids) :], skip_special_tokens=True)
    assert final.text == expected
    assert engine.generate(engine.request(prompt, GREEDY)).text == expected


def test_stop_event_really_stops_generation(engine, prompt):
    stop = threading.Event()
    settings = GenerationSettings(max_new_tokens=400, repetition_penalty=1.0)
    events = []
    for event in engine.stream(engine.request(prompt, settings), stop_event=stop):
        events.append(event)
        if len(events) == 2:
            stop.set()
    assert events[-1].finish_reason == "cancelled"
    assert events[-1].num_tokens < 50


def test_closing_the_stream_stops_the_generation_thread(engine, prompt):
    stop = threading.Event()
    settings = GenerationSettings(max_new_tokens=400, repetition_penalty=1.0)
    stream = engine.stream(engine.request(prompt, settings), stop_event=stop)
    next(stream)
    stream.close()  # what a web server does when the client goes away
    assert stop.is_set()
    # The engine lock is free again: the next request runs.
    assert engine.generate(engine.request(prompt, GREEDY)).finished


def test_errors_reach_the_caller_and_the_engine_keeps_serving(engine, prompt):
    with pytest.raises(IndexError):
        forged = [engine.model.config.vocab_size + 10]  # no encoding makes this: a failing model
        engine.generate(dataclasses.replace(engine.request(prompt, GREEDY), prompt_ids=forged))
    assert engine.generate(engine.request(prompt, GREEDY)).finished


def test_settings_are_validated():
    with pytest.raises(SupportLMError):
        GenerationSettings(max_new_tokens=0)
    with pytest.raises(SupportLMError):
        GenerationSettings(top_p=0)


def test_tokens_per_second_excludes_the_first_token():
    event = StreamEvent(text="x", num_tokens=11, time_to_first_token=1.0, elapsed=2.0)
    assert event.tokens_per_second == pytest.approx(10.0)
    assert "tok/s" in event.caption()


def test_requests_carry_an_id_and_report_usage(engine, prompt):
    request = engine.request(prompt, GREEDY)
    final = engine.generate(request)
    assert request.request_id.startswith("req-") and final.request_id == request.request_id
    assert final.usage == {
        "prompt_tokens": len(request.prompt_ids),
        "completion_tokens": final.num_tokens,
        "total_tokens": len(request.prompt_ids) + final.num_tokens,
    }
    assert engine.request(prompt, GREEDY).request_id != request.request_id


def test_stop_strings_end_the_reply_and_are_not_part_of_it():
    texts = ["Your ord", "Your order ships. ##", "Your order ships. ##END more"]
    events = iter([StreamEvent(t, n, 0.1, 0.1 * n) for n, t in enumerate(texts, 1)])
    stop_event = threading.Event()
    shown = list(cut_at_stop_strings(events, ("##END",), stop_event))
    # "##" may start the stop string: held back while streaming, never shown.
    assert [e.text for e in shown] == ["Your ord", "Your order ships. ", "Your order ships. "]
    assert shown[-1].finished and shown[-1].finish_reason == "stop"
    assert stop_event.is_set()  # the model is told to stop at once


def test_a_reply_without_its_stop_string_is_shown_whole():
    events = iter(
        [StreamEvent("a #", 1, 0.1, 0.1), StreamEvent("a #b", 2, 0.1, 0.2, True, "length")]
    )
    shown = list(cut_at_stop_strings(events, ("##",), threading.Event()))
    assert [e.text for e in shown] == ["a ", "a #b"]


def test_abort_stops_a_running_request_by_its_id(engine, prompt):
    settings = GenerationSettings(max_new_tokens=400, repetition_penalty=1.0)
    request = engine.request(prompt, settings)
    events = engine.stream(request)
    next(events)
    assert engine.abort(request.request_id)
    final = list(events)[-1]
    assert final.finish_reason == "cancelled" and final.num_tokens < 50
    assert not engine.abort(request.request_id)  # finished: nothing left to stop


def test_a_request_for_an_adapter_the_engine_does_not_serve_is_refused(engine, prompt):
    request = engine.request(prompt, GREEDY)
    request.adapter = AdapterRef("someone-else", "v-0")
    with pytest.raises(SupportLMError, match="not loaded"):
        engine.generate(request)


def test_the_same_request_id_cannot_run_twice_at_once(engine, prompt):
    request = engine.request(prompt, GenerationSettings(max_new_tokens=400))
    running = engine.stream(request)
    next(running)
    with pytest.raises(SupportLMError, match="already running"):
        engine.generate(request)
    running.close()
