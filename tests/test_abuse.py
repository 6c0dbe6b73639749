"""Faults and abuse (issue 9): what a hostile visitor or a careless operator meets.

One test (or a few) per row of the issue; each asserts what a user sees: a clear message,
bounded work counted in tokenizer or model calls (never wall-clock), and nothing lost. The rows
covered elsewhere: redaction in `test_redaction`, crash-safe training in `test_crash_safety`, the
llama.cpp adapter switch in `test_llamacpp`, one admission bound for every listener in
`test_admission`, the atomic ``latest`` pointer in `test_training`.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import gradio as gr
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from helpers import call_event
from test_tasks import FakeEngine

from supportlm.engines.base import Engine, GenerationSettings, StreamEvent
from supportlm.errors import SupportLMError
from supportlm.feedback.retention import erase_conversation, purge_older_than
from supportlm.feedback.store import FeedbackStore
from supportlm.prompts import encode_chat
from supportlm.serve.assistant import Assistant
from supportlm.serve.settings import AppSettings
from supportlm.serve.ui import build_demo, launch_options
from supportlm.serve.ui.about import adapter_report
from supportlm.serve.ui.common import read_upload, user_facing
from supportlm.train.data.examples import load_examples

REPO_ROOT = Path(__file__).resolve().parents[1]
SETTINGS = GenerationSettings(max_new_tokens=8, temperature=0.0)


class EchoEngine(Engine):
    """Answers every chat with a fixed reply, streamed word by word; counts its calls."""

    name = "echo"
    description = "echo engine"

    def __init__(self, tokenizer, reply: str = "Your order ships today.") -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.context_length = 2048
        self.reply = reply
        self.calls = 0

    def _stream(self, request, stop_event):
        self.calls += 1
        words = self.reply.split()
        rid = request.request_id
        for count in range(1, len(words) + 1):
            yield StreamEvent(" ".join(words[:count]), count, 0.001, 0.001, request_id=rid)
        text = " ".join(words)
        yield StreamEvent(text, len(words), 0.001, 0.01, True, "stop", request_id=rid)


def make_assistant(tokenizer, tmp_path, *, engine=None, feedback=None, **settings):
    values = {"model": "echo", "backend": "transformers", "feedback_db": tmp_path / "fb.sqlite3"}
    plan = AppSettings(**{**values, **settings}).resolve()
    return Assistant(engine or EchoEngine(tokenizer), plan, feedback=feedback)


def chat(assistant, message="Where is my order?", history=None, system_prompt=None, **kwargs):
    request = assistant.chat_request(message, history, system_prompt, SETTINGS)
    *_, final = assistant.chat(request, SETTINGS, **kwargs)
    return request, final


class CountingTokenizer:
    """Counts the calls that tokenise or render text, and forwards everything else."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self._tokenizer(*args, **kwargs)

    def apply_chat_template(self, *args, **kwargs):
        self.calls += 1
        return self._tokenizer.apply_chat_template(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


# -- /chat: history, system prompt -----------------------------------------------------------


def test_a_400_turn_history_costs_as_many_tokenizer_calls_as_a_short_one(
    smollm2_tokenizer, tmp_path
):
    # The first version re-encoded the whole conversation per dropped exchange: 400 turns cost
    # 81k tokenizer calls. Now the calls depend on the turns kept, not on the history's length.
    def fit(turns: int) -> tuple[int, list]:
        counting = CountingTokenizer(smollm2_tokenizer)
        assistant = make_assistant(
            counting, tmp_path, engine=EchoEngine(counting), max_history_messages=1000
        )
        history = [
            {"role": role, "content": f"message {i % 10} about my parcel " * 20}
            for i in range(turns)
            for role in ("user", "assistant")
        ]
        request = assistant.chat_request("And now?", history, None, SETTINGS)
        budget = assistant.context_length - SETTINGS.max_new_tokens
        assert len(encode_chat(smollm2_tokenizer, request.messages)) <= budget
        assert any("oldest turns were left out" in notice for notice in request.notices)
        return counting.calls, request.messages

    calls_400, kept = fit(400)
    calls_40, kept_40 = fit(40)
    assert len(kept) == len(kept_40) and 3 < len(kept) < 100 and kept[-1]["content"] == "And now?"
    assert kept[1]["role"] == "user"  # whole exchanges only
    assert calls_400 == calls_40 < 200


def test_history_is_capped_in_messages_and_characters_with_notices(smollm2_tokenizer, tmp_path):
    assistant = make_assistant(smollm2_tokenizer, tmp_path, max_history_messages=4)
    history = [{"role": "user", "content": "x" * 50_000}, {"role": "assistant", "content": "ok"}]
    request = assistant.chat_request("Hi", history * 50, None, SETTINGS)
    notices = " ".join(request.notices)
    assert "newest 4 messages" in notices and "first 4000 characters" in notices
    assert all(len(m["content"]) <= 4000 for m in request.messages)


def test_an_oversized_system_prompt_is_cut_and_said(smollm2_tokenizer, tmp_path):
    assistant = make_assistant(smollm2_tokenizer, tmp_path, max_system_prompt_chars=100)
    request = assistant.chat_request("Hi", [], "Be kind. " * 5_000, SETTINGS)
    assert len(request.messages[0]["content"]) == 100
    assert any("system prompt was cut" in notice for notice in request.notices)


@pytest.mark.parametrize("history", ["not a list", [3, 4], [{"role": "user"}]])
def test_a_malformed_history_is_one_clear_message(smollm2_tokenizer, tmp_path, history):
    assistant = make_assistant(smollm2_tokenizer, tmp_path)
    if history == [{"role": "user"}]:  # a message without content is empty, not an error
        assert assistant.chat_request("Hi", history, None, SETTINGS).messages[-1]["content"]
        return
    with pytest.raises(SupportLMError, match="history"):
        assistant.chat_request("Hi", history, None, SETTINGS)


# -- feedback: one checked write path -----------------------------------------------------------


def test_feedback_is_taken_only_for_replies_the_server_issued(smollm2_tokenizer, tmp_path):
    assistant = make_assistant(smollm2_tokenizer, tmp_path)
    _, final = chat(assistant)
    assert assistant.record_feedback("like", final.request_id) > 0
    for reply_id in ("never-issued", "", 12, "x" * 10_000):
        with pytest.raises(SupportLMError, match="unknown"):
            assistant.record_feedback("like", reply_id)
    with pytest.raises(SupportLMError, match="Unknown feedback kind"):
        assistant.record_feedback("love", final.request_id)
    assert len(assistant.feedback.list_feedback()) == 1


def test_an_oversized_correction_is_refused_and_nothing_is_stored(smollm2_tokenizer, tmp_path):
    assistant = make_assistant(smollm2_tokenizer, tmp_path, max_correction_chars=500)
    _, final = chat(assistant)
    with pytest.raises(SupportLMError, match="too long"):
        assistant.record_feedback("correction", final.request_id, corrected_answer="a" * 501)
    assert assistant.feedback.list_feedback() == []
    assistant.record_feedback("correction", final.request_id, corrected_answer="a" * 500)
    assert len(assistant.feedback.list_feedback()) == 1


def test_feedback_writes_are_rate_limited_per_client(smollm2_tokenizer, tmp_path):
    assistant = make_assistant(smollm2_tokenizer, tmp_path, feedback_rate_limit=3)
    _, final = chat(assistant)
    for _ in range(3):
        assistant.record_feedback("like", final.request_id, client_id="10.0.0.1")
    with pytest.raises(SupportLMError, match="Too many feedback"):
        assistant.record_feedback("like", final.request_id, client_id="10.0.0.1")
    assistant.record_feedback("like", final.request_id, client_id="10.0.0.2")
    assert len(assistant.feedback.list_feedback()) == 4


def test_every_stored_column_is_redacted_the_system_prompt_included(smollm2_tokenizer, tmp_path):
    assistant = make_assistant(smollm2_tokenizer, tmp_path)
    _, final = chat(assistant, "I am ann@example.com", system_prompt="Escalate to boss@shop.com")
    assistant.record_feedback("correction", final.request_id, corrected_answer="Mail ann@x.org")
    with sqlite3.connect(assistant.feedback.path) as connection:
        dump = "\n".join(connection.iterdump())
    assert "@" not in dump.replace("[EMAIL]", "")
    assert dump.count("[EMAIL]") >= 3


# -- a store that cannot be used ------------------------------------------------------------------


def test_a_corrupt_database_leaves_the_app_serving_with_feedback_off(
    smollm2_tokenizer, tmp_path, caplog
):
    database = tmp_path / "fb.sqlite3"
    database.write_bytes(b"this is not a database" * 100)
    assistant = make_assistant(smollm2_tokenizer, tmp_path)
    assert assistant.feedback is None and "switched off" in assistant.feedback_notice
    assert sum("Feedback is off" in r.message for r in caplog.records) == 1
    _, final = chat(assistant)
    assert final.text == "Your order ships today."
    with pytest.raises(SupportLMError, match="switched off"):
        assistant.record_feedback("like", final.request_id)
    demo = build_demo(assistant=assistant)  # the UI builds, with the notice shown
    assert any(getattr(b, "elem_id", None) == "feedback-off" for b in demo.blocks.values())


def test_an_unwritable_database_folder_leaves_the_app_serving(smollm2_tokenizer, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the store's folder should be")
    assistant = make_assistant(smollm2_tokenizer, tmp_path, feedback_db=blocker / "fb.sqlite3")
    assert assistant.feedback is None
    assert chat(assistant)[1].text == "Your order ships today."


class FullDiskStore(FeedbackStore):
    """A store whose file may not grow past its current size: SQLite's "disk is full"."""

    full = False

    def connect(self):
        context = super().connect()
        connection = context.__enter__()
        if self.full:
            pages = connection.execute("PRAGMA page_count").fetchone()[0]
            connection.execute(f"PRAGMA max_page_count = {pages}")
        return _Entered(context, connection)


class _Entered:
    def __init__(self, context, connection):
        self.context, self.connection = context, connection

    def __enter__(self):
        return self.connection

    def __exit__(self, *exc):
        return self.context.__exit__(*exc)


def test_a_full_disk_during_a_like_is_a_clear_message_and_the_app_serves_on(
    smollm2_tokenizer, tmp_path
):
    store = FullDiskStore(tmp_path / "fb.sqlite3")
    assistant = make_assistant(smollm2_tokenizer, tmp_path, feedback=store)
    _, first = chat(assistant)
    assistant.record_feedback("like", first.request_id)
    store.full = True
    with pytest.raises(SupportLMError, match="storage is full.*keeps answering"):
        assistant.record_feedback("correction", first.request_id, corrected_answer="x" * 3000)
    _, second = chat(assistant)  # the reply is served even though it cannot be stored
    assert second.text == "Your order ships today."
    store.full = False
    assert [row["kind"] for row in store.list_feedback()] == ["like"]  # nothing lost


def test_a_corrupt_metrics_file_does_not_stop_the_app(
    smollm2_tokenizer, tiny_adapter_dir, tmp_path
):
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter_dir, adapter)
    (adapter / "metrics.json").write_text("{ not json")
    assistant = make_assistant(smollm2_tokenizer, tmp_path, adapter=str(adapter))
    metrics, _ = adapter_report(assistant)
    assert metrics is None
    build_demo(assistant=assistant)


# -- uploads, long tasks, errors -------------------------------------------------------------------


def test_uploads_are_bounded_text_only_and_deleted_once_read(tmp_path):
    cases = {
        "ticket.txt": (b"Customer: where is my parcel?", None),
        "bom.txt": (b"\xef\xbb\xbfHello", None),
        "binary.txt": (b"\x89PNG\r\n\x1a\n\x00\x00\x00", "not UTF-8|binary"),
        "nul.txt": (b"hello\x00world", "binary"),
        "big.txt": (b"a" * 2_000, "larger than"),
    }
    for name, (data, error) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        if error is None:
            assert read_upload(path, 1_000).startswith(("Customer", "Hello"))
        else:
            with pytest.raises(SupportLMError, match=error):
                read_upload(path, 1_000)
        assert not path.exists()
    assert launch_options(AppSettings(max_upload_bytes=1234))["max_file_size"] == 1234


def test_a_merging_model_cannot_turn_a_long_translation_into_hundreds_of_calls(smollm2_tokenizer):
    from supportlm.serve.tasks.translate import translate

    def merge_lines(kind, text):  # the model joins every line into one
        return " ".join(text.split())

    text = "\n".join(f"Line {i} says hello." for i in range(600))
    engine = FakeEngine(smollm2_tokenizer, reply=merge_lines)
    settings = GenerationSettings(max_new_tokens=384, temperature=0.0)  # the app's default
    events = list(translate(engine, text, "French", settings, max_calls=48))
    assert len(engine.requests) <= 48 and events[-1].finished  # 520+ calls before the budget
    engine = FakeEngine(smollm2_tokenizer, reply=merge_lines)
    with pytest.raises(SupportLMError, match="model calls"):
        translate(engine, text, "French", settings, max_calls=3)
    assert engine.requests == []  # refused before the first call


def test_a_summary_over_the_call_budget_is_refused_before_the_first_call(smollm2_tokenizer):
    from supportlm.serve.tasks.summarize import summarize

    engine = FakeEngine(smollm2_tokenizer, context_length=300)
    with pytest.raises(SupportLMError, match="model calls"):
        summarize(engine, "The parcel is late. " * 400, "paragraph", SETTINGS, max_calls=2)
    assert engine.requests == []


def test_a_failed_generation_shows_no_exception_text_or_server_path(caplog):
    def failing():
        yield "partial"
        raise RuntimeError("cannot open /srv/models/secret-adapter/adapter_model.safetensors")

    with pytest.raises(gr.Error) as raised:
        list(user_facing(failing()))
    message = str(raised.value)
    assert "/srv" not in message and "RuntimeError" not in message and "reference" in message
    reference = re.search(r"reference ([0-9a-f]{8})", message).group(1)
    assert any(reference in r.getMessage() and r.exc_info for r in caplog.records)


# -- access control and data rights ---------------------------------------------------------------


def test_auth_setting_requires_a_login_on_every_route(smollm2_tokenizer, tmp_path):
    settings = AppSettings(model="echo", auth="agent:s3cret", feedback_db=tmp_path / "fb.sqlite3")
    assistant = Assistant(EchoEngine(smollm2_tokenizer), settings.resolve())
    demo = build_demo(assistant=assistant)
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, **launch_options(settings))
    try:
        with pytest.raises(Exception):  # noqa: B017 (the client refuses in several ways)
            Client(url, verbose=False).predict("Hi", api_name="/chat")
        client = Client(url, auth=("agent", "s3cret"), verbose=False)
        assert client.predict("Hi", api_name="/chat") == "Your order ships today."
    finally:
        demo.close()
    with pytest.raises(SupportLMError, match="SUPPORTLM_AUTH"):
        AppSettings(auth="no-password-here")


def test_the_feedback_endpoint_takes_issued_reply_ids_only(smollm2_tokenizer, tmp_path):
    assistant = make_assistant(smollm2_tokenizer, tmp_path, max_correction_chars=100)
    demo = build_demo(assistant=assistant)
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True)
    try:
        client = Client(url, verbose=False)
        reply = client.predict("Where is my order?", api_name="/reply")
        assert reply["text"] == "Your order ships today." and reply["reply_id"]
        saved = client.predict(reply["reply_id"], "dislike", api_name="/feedback")
        assert saved["saved"] is True
        with pytest.raises(AppError, match="unknown"):
            client.predict("made-up-id", "like", api_name="/feedback")
        with pytest.raises(AppError, match="too long"):
            client.predict(reply["reply_id"], "correction", "x" * 101, api_name="/feedback")
    finally:
        demo.close()
    rows = assistant.feedback.list_feedback()
    assert [row["kind"] for row in rows] == ["dislike"]


def test_retention_deletes_old_rows_with_their_feedback(smollm2_tokenizer, tmp_path):
    assistant = make_assistant(smollm2_tokenizer, tmp_path)
    _, final = chat(assistant, conversation_id="session-a")
    assistant.record_feedback("like", final.request_id)
    store = assistant.feedback
    nothing = {"exports_scrubbed": {}, "exports_expired": []}
    assert purge_older_than(store, 30) == {"feedback": 0, "votes": 0, "replies": 0, **nothing}
    later = datetime.now(timezone.utc) + timedelta(days=31)
    purged = purge_older_than(store, 30, now=later)
    assert purged == {"feedback": 1, "votes": 0, "replies": 1, **nothing}
    assert store.list_replies() == [] and store.list_feedback() == []


def test_one_conversation_can_be_erased_from_the_command_line(smollm2_tokenizer, tmp_path):
    assistant = make_assistant(smollm2_tokenizer, tmp_path)
    _, kept = chat(assistant, conversation_id="session-keep")
    _, erased = chat(assistant, conversation_id="session-erase")
    chat(assistant, conversation_id="session-erase")
    assistant.record_feedback("like", erased.request_id)
    result = subprocess.run(
        [sys.executable, REPO_ROOT / "finetune" / "feedback.py", "--db", assistant.feedback.path,
         "erase", "--reply", erased.request_id],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "2 replies" in result.stdout and "1 feedback" in result.stdout
    assert [r["reply_id"] for r in assistant.feedback.list_replies()] == [kept.request_id]
    assert erase_conversation(assistant.feedback, "session-keep")["replies"] == 1


def test_an_opted_out_conversation_is_not_stored(smollm2_tokenizer, tmp_path):
    assistant = make_assistant(smollm2_tokenizer, tmp_path)
    _, final = chat(assistant, store=False)
    assert final.text and assistant.feedback.list_replies() == []


# -- training data files ------------------------------------------------------------------------

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


@pytest.mark.parametrize(
    ("name", "data", "examples", "malformed"),
    [
        ("nested.jsonl", json.dumps(GOOD) + "\n" + "[" * 100_000 + "\n", 1, 1),
        ("nan.jsonl", json.dumps(GOOD) + '\n{"instruction": NaN, "response": "x"}\n', 1, 1),
        ("crlf.jsonl", (json.dumps(GOOD) + "\r\n") * 2, 2, 0),
        ("bom.jsonl", "\ufeff" + json.dumps(GOOD) + "\n", 1, 0),
        ("big.csv", 'instruction,response\n"hi","' + "x" * 200_000 + '"\n"a","b"\n', 2, 0),
    ],
)
def test_awkward_dataset_files_load_or_name_the_bad_line(tmp_path, name, data, examples, malformed):
    path = tmp_path / name
    path.write_text(data, encoding="utf-8")
    loaded, stats = load_examples(path)
    assert (len(loaded), stats.num_malformed) == (examples, malformed)
    if malformed:
        with pytest.raises(SupportLMError, match="line 2"):
            load_examples(path, strict=True)


def test_utf16_and_invalid_utf8_dataset_files(tmp_path):
    utf16 = tmp_path / "excel.jsonl"
    utf16.write_text(json.dumps(GOOD) + "\n", encoding="utf-16")
    assert len(load_examples(utf16)[0]) == 1
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(json.dumps(GOOD).encode() + b"\n\xff\xfe\xfa\n")
    with pytest.raises(SupportLMError, match="line 2: not UTF-8"):
        load_examples(broken)


def test_private_events_called_by_index_are_checked_like_any_input(smollm2_tokenizer, tmp_path):
    # Hiding an event from the API page is no protection: Gradio runs it by index for anyone.
    assistant = make_assistant(smollm2_tokenizer, tmp_path)
    demo = build_demo(assistant=assistant)
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True)
    try:
        index = next(i for i, fn in demo.fns.items() if fn.api_name == "correct")
        forged = [{"1": "made-up-reply-id"}, "x" * 1_000_000]  # state is server-side: ignored
        messages = call_event(url, index, forged, "attacker-session")
    finally:
        demo.close()
    final = messages[-1]
    assert final["msg"] == "process_completed" and not final["success"]
    assert "no answer to correct" in json.dumps(final)
    assert assistant.feedback.list_feedback() == []


def test_the_app_purges_rows_past_the_retention_at_start_up(smollm2_tokenizer, tmp_path):
    assistant = make_assistant(smollm2_tokenizer, tmp_path)
    chat(assistant)
    with sqlite3.connect(assistant.feedback.path) as connection:
        connection.execute("UPDATE replies SET created_at = '2020-01-01T00:00:00+00:00'")
    assert len(assistant.feedback.list_replies()) == 1
    restarted = make_assistant(smollm2_tokenizer, tmp_path, retention_days=30)
    assert restarted.feedback.list_replies() == []


def test_a_required_hugging_face_sign_in_refuses_anonymous_requests():
    from supportlm.serve.ui.common import client_id

    with pytest.raises(gr.Error, match="sign in with Hugging Face"):
        client_id(None, AppSettings(hf_oauth=1))
    assert client_id(None, AppSettings()) is None
