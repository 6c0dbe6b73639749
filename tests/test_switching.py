"""A promoted adapter served without a restart: in-flight requests finish on the old one."""

from __future__ import annotations

import gc
import weakref

import gradio as gr
import pytest
from helpers import save_random_adapter

from supportlm.engines.base import GenerationSettings
from supportlm.errors import SupportLMError
from supportlm.run_folder import RunFolder, point_latest
from supportlm.serve.assistant import Assistant
from supportlm.serve.backends import build_engine
from supportlm.serve.engine_slot import EngineSlot
from supportlm.serve.settings import AppSettings
from supportlm.serve.switching import AdapterSwitcher
from supportlm.serve.ui.api import reload_endpoint

SETTINGS = GenerationSettings(max_new_tokens=12, temperature=0.0)


class Closing:
    """A stand-in engine that only records being closed."""

    def __init__(self, name):
        self.description = name
        self.closed = False

    def close(self):
        self.closed = True


def test_a_replaced_engine_closes_after_its_last_lease():
    old, new = Closing("old"), Closing("new")
    slot = EngineSlot(old)
    with slot.lease() as leased:
        assert slot.replace(new) is old and slot.current is new
        assert leased is old and not old.closed  # still serving its request
        with slot.lease() as second:
            assert second is new
    assert old.closed and not new.closed
    slot.replace(Closing("newer"))
    assert new.closed  # nothing in flight: closed at once


def run_adapter(tiny_model_dir, folder, seed) -> RunFolder:
    save_random_adapter(tiny_model_dir, folder, seed=seed, b_std=0.5)
    run = RunFolder(folder)
    run.write_record(tiny_model_dir, {"method": "sft"})
    return run


@pytest.fixture
def served(tiny_model_dir, tmp_path, monkeypatch):
    """An assistant on the adapter outputs/latest names (a), a second adapter (b) to promote."""
    monkeypatch.chdir(tmp_path)
    a = run_adapter(tiny_model_dir, tmp_path / "outputs" / "a", 0)
    b = run_adapter(tiny_model_dir, tmp_path / "outputs" / "b", 1)
    point_latest(a)
    engines, closed = [], []

    def build(plan):
        engine = build_engine(plan)
        engines.append(weakref.ref(engine))
        close = engine.close
        engine.close = lambda: (closed.append(engine.adapter.version), close())
        return engine

    settings = AppSettings(backend="transformers", feedback_db=tmp_path / "fb.sqlite3")
    plan = settings.resolve()
    assistant = Assistant(build(plan), plan)
    return assistant, AdapterSwitcher(assistant, build), a, b, engines, closed


def test_a_switch_lets_the_running_reply_finish_on_the_old_adapter(served):
    assistant, switcher, a, b, engines, closed = served
    assert switcher.served_version() == a.adapter_version()
    assert switcher.check() is None  # nothing promoted yet
    running = assistant.chat(assistant.chat_request("Where is my order?", [], None, SETTINGS),
                             SETTINGS)  # fmt: skip
    first = next(running)
    point_latest(b)  # what finetune/promote.py does
    info = switcher.check()
    assert info["from_version"] == a.adapter_version()
    assert info["to_version"] == b.adapter_version() == switcher.served_version()
    assert info["old_in_flight"] == 1 and closed == []
    assert sum(ref() is not None for ref in engines) == 2  # the peak: two engines during a switch
    last = list(running)[-1]  # the old reply finishes, no error
    assert last.finished and closed == [a.adapter_version()]
    newer = list(assistant.chat(assistant.chat_request("And my refund?", [], None, SETTINGS),
                                SETTINGS))[-1]  # fmt: skip
    store = assistant.feedback
    versions = {r["reply_id"]: r["adapter_version"] for r in store.list_replies()}
    assert versions == {first.request_id: a.adapter_version(),
                        newer.request_id: b.adapter_version()}  # fmt: skip
    assistant.record_feedback("like", first.request_id)  # feedback after the switch
    assert store.list_feedback()[0]["adapter_version"] == a.adapter_version()
    del running
    gc.collect()
    assert sum(ref() is not None for ref in engines) == 1  # the old engine is freed


def test_a_pinned_adapter_is_never_switched(served, tmp_path):
    assistant, _, a, b, _, _ = served
    assistant.settings.adapter = str(a.path)
    point_latest(b)
    assert AdapterSwitcher(assistant).check() is None


def test_a_failed_build_keeps_serving_the_old_adapter(served):
    assistant, _, a, b, _, _ = served

    def broken(plan):
        raise SupportLMError("disk full")

    switcher = AdapterSwitcher(assistant, broken)
    point_latest(b)
    switcher.check_safely()  # logged, not raised
    assert switcher.served_version() == a.adapter_version()
    reply = list(assistant.chat(assistant.chat_request("Hi", [], None, SETTINGS), SETTINGS))
    assert reply[-1].finished


def test_the_reload_endpoint_needs_the_admin_token(served):
    assistant, switcher, _, b, _, _ = served
    reload = reload_endpoint(switcher)
    with pytest.raises(gr.Error, match="disabled"):
        reload("anything")
    assistant.settings.admin_token = "s3cret"
    with pytest.raises(gr.Error, match="Wrong admin token"):
        reload("guess")
    point_latest(b)
    result = reload("s3cret")
    assert result["switched"] and result["adapter_version"] == b.adapter_version()
    assert reload("s3cret")["switched"] is False  # already served
