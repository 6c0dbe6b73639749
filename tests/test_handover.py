"""Intents in the app: the classifier, the hand-over notice, the stored flag and its listing."""

from __future__ import annotations

import json
import runpy
import sqlite3
from pathlib import Path

import pytest
from test_abuse import chat, make_assistant

from supportlm.errors import SupportLMError
from supportlm.intent_classifier import (
    IntentClassifier,
    read_intent_questions,
    write_intent_questions,
)
from supportlm.run_folder import INTENT_QUESTIONS_FILE, RunFolder
from supportlm.serve.handover import BUNDLED_DATA, IntentRouter
from supportlm.serve.settings import AppSettings
from supportlm.train.data.examples import Example

FEEDBACK_CLI = Path(__file__).resolve().parents[1] / "finetune" / "feedback.py"


@pytest.fixture(scope="module")
def bundled_classifier() -> IntentClassifier:
    return IntentClassifier.from_file(BUNDLED_DATA)


def test_the_bundled_data_trains_a_classifier_of_its_customer_intents(bundled_classifier):
    # 31 customer intents in the one vocabulary; the summarise/translate tasks are left out.
    intents = bundled_classifier.intents
    assert len(intents) == 31 and "summarize" not in intents
    assert "contact_human_agent" in intents and "contact_human" not in intents
    guess = bundled_classifier.guess("Can I please talk to a real person, a human agent?")
    assert guess.intent == "contact_human_agent" and 0 < guess.confidence <= 1
    assert bundled_classifier.predict(["I forgot my password"]) == ["recover_password"]
    assert bundled_classifier.description.endswith("data/customer_support.jsonl")


def test_intent_files_name_the_line_of_a_malformed_row(tmp_path):
    path = tmp_path / "intents.jsonl"
    path.write_text('{"question": "Where is it?", "intent": "track_order"}\n{not json\n')
    with pytest.raises(SupportLMError, match=r"intents.jsonl, line 2: not JSON"):
        read_intent_questions(path)
    path.write_text('{"question": "q", "intent": "track_order"}\n["a list"]\n')
    with pytest.raises(SupportLMError, match="line 2: expected a JSON object"):
        read_intent_questions(path)


def test_written_intent_questions_read_back_without_task_or_intent_rows(tmp_path):
    def example(question, intent, task=None):
        meta = {"intent": intent} | ({"task": task} if task else {})
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": "."}]
        return Example(messages=messages, meta=meta)

    examples = [
        example("Where is my parcel?", "track_order"),
        example("I want a human", "contact_human"),
        example("Which intent is this?", "track_order", task="intent"),  # a training aid
        example("Summarise this", "summarize", task="summarize"),
    ]
    path = tmp_path / INTENT_QUESTIONS_FILE
    assert write_intent_questions(path, examples) == 2
    assert read_intent_questions(path) == (
        ["Where is my parcel?", "I want a human"],
        ["track_order", "contact_human_agent"],
    )


def test_router_hands_over_only_the_configured_intents_when_confident(bundled_classifier):
    # The bundled data has ~9 questions an intent: its probabilities are low (Bitext's: ~0.94).
    handover = frozenset({"complaint", "contact_human_agent"})
    router = IntentRouter(bundled_classifier, handover, min_confidence=0.2)
    human = router.route("I want to speak to a human agent right now, not a bot")
    assert human.intent == "contact_human_agent" and human.handover
    assert "Handed over to a person" in human.notice
    parcel = router.route("Where is my parcel? It has not arrived.")
    assert not parcel.handover and parcel.notice is None
    strict = IntentRouter(bundled_classifier, router.handover_intents, min_confidence=1.01)
    assert not strict.route("I want to speak to a human agent right now, not a bot").handover
    assert IntentRouter(None, frozenset()).route("anything") is None


def test_router_prefers_the_named_file_then_the_adapters(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / INTENT_QUESTIONS_FILE).write_text(
        "".join(
            json.dumps({"question": f"{word} question {i}", "intent": intent}) + "\n"
            for word, intent in (("parcel", "track_order"), ("refund", "get_refund"))
            for i in range(3)
        )
    )
    router = IntentRouter.from_settings(AppSettings(), RunFolder(run))
    assert router.classifier.intents == ["get_refund", "track_order"]
    assert router.description.endswith("run/intent_questions.jsonl")  # folder and file, no path
    assert len(IntentRouter.from_settings(AppSettings(), None).classifier.intents) == 31
    missing = AppSettings(intent_data=tmp_path / "nope.jsonl")
    with pytest.raises(SupportLMError, match="SUPPORTLM_INTENT_DATA"):
        IntentRouter.from_settings(missing, None)


def test_a_handed_over_message_gets_the_notice_and_is_stored_as_such(
    smollm2_tokenizer, tmp_path, capsys
):
    assistant = make_assistant(smollm2_tokenizer, tmp_path, handover_min_confidence=0.2)
    request, final = chat(assistant, "I am very unhappy, I want to file a complaint about you")
    assert request.routing.intent == "complaint" and request.routing.handover
    assert any("Handed over to a person" in notice for notice in request.notices)
    _, other = chat(assistant, "How long does delivery to Norway take?")
    rows = {row["reply_id"]: row for row in assistant.feedback.list_replies()}
    assert (rows[final.request_id]["intent"], rows[final.request_id]["handover"]) == (
        "complaint",
        1,
    )
    assert rows[other.request_id]["handover"] == 0 and rows[other.request_id]["intent"]
    assert assistant.feedback.handover_counts() == {"complaint": 1}

    main = runpy.run_path(str(FEEDBACK_CLI), run_name="feedback_cli")["main"]
    assert main(["--db", str(assistant.settings.feedback_db), "handovers"]) == 0
    out = capsys.readouterr().out
    assert "handed over: 1" in out and "complaint: 1" in out
    assert "file a complaint" in out


def test_hand_over_intents_are_a_setting(smollm2_tokenizer, tmp_path):
    assistant = make_assistant(
        smollm2_tokenizer, tmp_path, handover_intents="", handover_min_confidence=0.0
    )
    request, _ = chat(assistant, "I want to file a complaint about you")
    assert request.routing.intent == "complaint" and not request.routing.handover
    environ = {"SUPPORTLM_HANDOVER_MIN_CONFIDENCE": "0.8"}
    assert AppSettings.from_env(environ).handover_min_confidence == 0.8
    with pytest.raises(SupportLMError, match="must be a number"):
        AppSettings.from_env({"SUPPORTLM_HANDOVER_MIN_CONFIDENCE": "high"})


def test_a_schema_3_store_gains_the_intent_columns(tmp_path):
    from supportlm.feedback.store import MIGRATIONS, FeedbackStore

    path = tmp_path / "feedback.sqlite3"
    with sqlite3.connect(path) as connection:
        for number, migration in enumerate(MIGRATIONS[:3], start=1):
            connection.executescript(migration)
            connection.execute(f"PRAGMA user_version = {number}")
    store = FeedbackStore(path)
    with sqlite3.connect(path) as connection:
        columns = {row[1] for row in connection.execute("PRAGMA table_info(replies)")}
    assert {"intent", "handover"} <= columns
    assert store.handover_counts() == {}


def test_the_reply_endpoint_names_the_intent_and_the_hand_over(smollm2_tokenizer, tmp_path):
    from gradio_client import Client

    from supportlm.serve.ui import build_demo

    assistant = make_assistant(smollm2_tokenizer, tmp_path, handover_min_confidence=0.2)
    demo = build_demo(assistant=assistant)
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True)
    try:
        client = Client(url, verbose=False)
        reply = client.predict("I want to talk to a human agent, a real person", api_name="/reply")
        plain = client.predict("Do you ship to Norway?", api_name="/reply")
    finally:
        demo.close()
    assert (reply["intent"], reply["handover"]) == ("contact_human_agent", True)
    assert "Handed over to a person" in reply["notices"]
    assert reply["text"] == "Your order ships today."  # the first reply is still given
    assert plain["handover"] is False and "Handed over" not in plain["notices"]
