"""The app on the tiny model, driven through `gradio_client` like any API user.

The tiny model writes gibberish, so these tests check mechanics a user would notice: streaming,
endpoint contracts, stored and redacted feedback, isolation of concurrent users, recovery from
errors, input caps and Stop really stopping the model.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from gradio_client.utils import StatusUpdate

from supportlm.engines.base import Engine, GenerationSettings, StreamEvent
from supportlm.engines.transformers import TransformersEngine
from supportlm.modeling import load_model
from supportlm.prompts import with_system_prompt
from supportlm.serve.assistant import Assistant
from supportlm.serve.settings import AppSettings
from supportlm.serve.ui import build_demo

TRIGGER = "PLEASE-FAIL"
MAX_INPUT_CHARS = 300


class FailingEngine(Engine):
    """The real tiny engine, except that a prompt containing `TRIGGER` fails mid-generation.

    It also remembers the stop event of the last request, so a test can see Stop arrive.
    """

    def __init__(self, engine: TransformersEngine) -> None:
        super().__init__()
        self.engine = engine
        self.name = engine.name
        self.description = engine.description
        self.tokenizer = engine.tokenizer
        self.context_length = engine.context_length
        self.adapter = engine.adapter
        self.max_concurrency = 2
        self.last_stop_event: threading.Event | None = None

    def _stream(self, request, stop_event):
        self.last_stop_event = stop_event
        events = self.engine.stream(request, stop_event=stop_event)
        if TRIGGER in self.tokenizer.decode(request.prompt_ids):
            return self._fail(events)
        return events

    def _fail(self, events: Iterator[StreamEvent]) -> Iterator[StreamEvent]:
        yield next(events)
        events.close()
        raise RuntimeError("the GPU caught fire")


@pytest.fixture(scope="module")
def app(tiny_chat_model_dir: str, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("app")
    plan = AppSettings(
        model=tiny_chat_model_dir,
        backend="transformers",
        feedback_db=folder / "feedback.sqlite3",
        max_input_chars=MAX_INPUT_CHARS,
        concurrency=2,
    ).resolve()
    engine = TransformersEngine.from_loaded(load_model(tiny_chat_model_dir), context_length=2048)
    forward_calls: list[int] = []
    engine.model.register_forward_hook(lambda *args: forward_calls.append(1))
    failing = FailingEngine(engine)
    assistant = Assistant(failing, plan)
    demo = build_demo(assistant=assistant)
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True)  # Gradio picks a free port
    yield {
        "url": url,
        "plan": plan,
        "assistant": assistant,
        "engine": failing,
        "forward_calls": forward_calls,
    }
    demo.close()


@pytest.fixture
def client(app) -> Client:
    return Client(app["url"], verbose=False)


def test_chat_streams_the_reply_token_by_token(client: Client) -> None:
    job = client.submit("Where is my order?", api_name="/chat", max_new_tokens=24)
    updates = list(job)
    result = job.result()
    assert isinstance(result, str) and result
    assert len(updates) > 2
    for before, after in itertools.pairwise(updates):
        assert after.startswith(before) and len(after) > len(before)
    assert updates[-1] == result


def test_chat_uses_the_history(app, client: Client) -> None:
    history = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
    ]
    with_history = client.predict("Refund please", history, api_name="/chat", max_new_tokens=12)
    engine = app["engine"]
    messages = with_system_prompt(
        [*history, {"role": "user", "content": "Refund please"}],
        app["assistant"].system_prompt,
    )
    request = engine.request(messages, GenerationSettings(max_new_tokens=12))
    expected = engine.generate(request).text
    assert with_history == expected


def test_summarize_and_translate_return_strings(client: Client) -> None:
    ticket = "Customer: my parcel #123 is late. Agent: I opened a claim with the carrier."
    summary = client.predict(ticket, api_name="/summarize", max_new_tokens=16)
    assert isinstance(summary, str) and summary
    translation = client.predict("Thank you for your order.", "French", api_name="/translate")
    assert isinstance(translation, str) and translation


def test_chat_replies_are_stored_with_their_reply_id_and_corrections_name_them(app, client):
    question = "I'm anna@example.com, call +1 415-555-0100, card 4111 1111 1111 1111."
    reply = client.predict(question, api_name="/chat", max_new_tokens=8)
    assistant = app["assistant"]
    (stored,) = [r for r in assistant.feedback.list_replies(limit=20) if "[CARD]" in str(r)][:1]
    assert stored["reply_id"].startswith("req-")
    assert stored["reply"] == reply  # what the client received is what the server logged
    assert stored["model_id"] == app["plan"].model and stored["backend"] == "transformers"
    assert stored["settings"]["max_new_tokens"] == 8
    assistant.record_feedback(
        "correction", stored["reply_id"], corrected_answer="Write to anna@example.com"
    )
    with sqlite3.connect(app["plan"].settings.feedback_db) as connection:
        row = connection.execute(
            "SELECT kind, conversation, corrected_answer, reply_id FROM feedback "
            "ORDER BY id DESC LIMIT 1"
        ).fetchone()
    kind, conversation, corrected, reply_id = row
    assert kind == "correction" and reply_id == stored["reply_id"]
    assert "[EMAIL]" in conversation and "[PHONE]" in conversation and "[CARD]" in conversation
    assert "anna@example.com" not in conversation and "4111" not in conversation
    assert corrected == "Write to [EMAIL]"


def test_concurrent_users_get_their_own_answers(app) -> None:
    questions = ["How do I return a jacket?", "Can I change my delivery address?"]

    def ask(question: str) -> str:
        client = Client(app["url"], verbose=False)
        return client.predict(question, api_name="/chat", max_new_tokens=20)

    alone = [ask(question) for question in questions]
    assert alone[0] != alone[1]
    with ThreadPoolExecutor(max_workers=2) as pool:
        together = list(pool.map(ask, questions))
    assert together == alone


def test_an_error_is_shown_and_the_next_request_works(client: Client) -> None:
    with pytest.raises(AppError, match="model failed to answer"):
        client.predict(f"{TRIGGER} where is my refund?", api_name="/chat", max_new_tokens=8)
    reply = client.predict("Where is my refund?", api_name="/chat", max_new_tokens=8)
    assert isinstance(reply, str) and reply


def test_over_long_input_is_cut_with_a_notice(client: Client) -> None:
    job = client.submit("refund " * 200, api_name="/chat", max_new_tokens=8)

    async def all_updates():
        return [update async for update in job]

    updates = asyncio.run(all_updates())
    warnings = [u.log for u in updates if isinstance(u, StatusUpdate) and u.log]
    assert (f"The input was cut to its first {MAX_INPUT_CHARS} characters.", "warning") in warnings
    assert isinstance(job.result(), str)


def test_stop_stops_the_model_not_just_the_stream(app, client: Client) -> None:
    max_new_tokens = 400
    question = "Tell me everything about your shipping policy."
    calls = app["forward_calls"]
    calls.clear()
    job = client.submit(question, api_name="/chat", max_new_tokens=max_new_tokens)
    next(iter(job))  # the first tokens arrived: generation is running
    job.cancel()
    engine = app["engine"]
    deadline = time.monotonic() + 60
    while not (engine.last_stop_event and engine.last_stop_event.is_set()):
        assert time.monotonic() < deadline, "Stop never reached the engine"
        time.sleep(0.05)
    # Wait until the model has been idle for a while: its forward calls stop growing.
    while True:
        seen = len(calls)
        time.sleep(1.0)
        if len(calls) == seen:
            break
    assert len(calls) < max_new_tokens
    # The same greedy request, left alone, really runs to max_new_tokens.
    generation = GenerationSettings(max_new_tokens=max_new_tokens)
    chat = app["assistant"].chat_request(question, [], None, generation)
    assert engine.generate(engine.request(chat.messages, generation)).finish_reason == "length"


def test_api_endpoints_are_documented(client: Client) -> None:
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/chat", "/summarize", "/translate"} <= set(endpoints)
    chat_parameters = [p["parameter_name"] for p in endpoints["/chat"]["parameters"]]
    assert chat_parameters[0] == "message"


def test_info_names_the_engine_and_why_without_server_paths(app, client: Client) -> None:
    info = client.predict(api_name="/info")
    assert info == {
        "engine": "transformers",
        "backend": "transformers",
        "why": "Backend transformers: set by SUPPORTLM_BACKEND.",
        "model": Path(app["plan"].model).name,  # the folder's name, not its path
        "adapter": None,
        "adapter_version": None,
        "adapter_shipped": False,
    }


def test_real_model_smoke(tmp_path: Path) -> None:
    """The three endpoints on the real embedded SmolLM2 (one launch, short replies)."""
    plan = AppSettings.from_env(
        {
            "SUPPORTLM_MODEL": "embedded",
            # The llama.cpp backend (auto's choice when installed) has its own tests.
            "SUPPORTLM_BACKEND": "transformers",
            "SUPPORTLM_FEEDBACK_DB": str(tmp_path / "fb.sqlite3"),
        }
    ).resolve()
    demo = build_demo(plan)
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True)  # Gradio picks a free port
    try:
        client = Client(url, verbose=False)
        reply = client.predict("How do I cancel my order?", api_name="/chat", max_new_tokens=24)
        summary = client.predict(
            "Customer: my parcel is two weeks late and I want a refund. Agent: I will open a "
            "claim with the carrier today.",
            api_name="/summarize",
            max_new_tokens=32,
        )
        translation = client.predict(
            "Thank you for your order.", "French", api_name="/translate", max_new_tokens=24
        )
    finally:
        demo.close()
    for text in (reply, summary, translation):
        assert isinstance(text, str)
        assert sum(character.isalpha() for character in text) >= 5


def run_load_benchmark(repo_root: Path, folder: Path, model: str, *flags: str) -> dict:
    """`bench/load.py` as a process on `model` (transformers, 2 clients, 1 question); its report."""
    result_file = folder / "load.json"
    command = [
        sys.executable,
        str(repo_root / "bench" / "load.py"),
        *("--model", model, "--backend", "transformers", "--clients", "2", "--questions", "1"),
        *flags,
        *("--json", str(result_file)),
    ]
    subprocess.run(command, check=True, cwd=folder, timeout=600)
    return json.loads(result_file.read_text())


def test_load_benchmark_on_the_tiny_model(tiny_chat_model_dir: str, repo_root, tmp_path) -> None:
    report = run_load_benchmark(repo_root, tmp_path, tiny_chat_model_dir, "--max_new_tokens", "8")
    assert report["errors"] == 0
    assert report["startup_s"] > 0 and report["aggregate_speedup"] > 0
    assert report["n_clients"]["clients"] == 2 and report["n_clients"]["requests"] == 2
    assert report["one_client"]["tokens"] > 0
    assert report["p95_ttft_s"] is not None
    assert report["n_clients"]["server_cpu_s"] > 0 and report["n_clients"]["client_cpu_s"] > 0
    # The caption's intent: the app's classifier (bundled data: no adapter), timed per request.
    intent = report["intent"]
    assert intent["classifier"].endswith("data/customer_support.jsonl")
    assert intent["ms_per_request"] > 0 and 0 < intent["share_of_request"] < 1
    # Both HTTP paths ran on the same app process, side by side: Gradio /chat and /v1.
    assert report["protocols"] == ["gradio", "v1"]
    for protocol in ("gradio", "v1"):
        summary = report["by_protocol"][protocol]
        assert summary["errors"] == 0, protocol
        assert summary["one_client"]["tokens"] > 0 and summary["n_clients"]["requests"] == 2
    assert report["one_client"] == report["by_protocol"]["gradio"]["one_client"]
    ratios = report["v1_vs_gradio"]
    assert set(ratios) == {"decode_one_client", "aggregate_one_client", "aggregate_n_clients"}
    by_protocol = report["by_protocol"]
    v1, gradio = (by_protocol[p]["n_clients"]["aggregate_tok_s"] for p in ("v1", "gradio"))
    assert ratios["aggregate_n_clients"] == pytest.approx(v1 / gradio)


def test_load_benchmark_through_a_remote_supportlm(tiny_chat_model_dir, repo_root, tmp_path):
    """--remote supportlm: the measured app is SUPPORTLM_BACKEND=openai in front of a second one."""
    report = run_load_benchmark(
        repo_root, tmp_path, tiny_chat_model_dir,
        *("--remote", "supportlm", "--protocol", "v1", "--max_new_tokens", "6"),
    )  # fmt: skip
    assert report["remote"] == "supportlm" and report["protocols"] == ["v1"]
    assert report["errors"] == 0 and report["one_client"]["tokens"] > 0
    assert report["v1_vs_gradio"] is None  # one protocol: nothing to compare


def test_the_api_guide_example_runs(app, repo_root) -> None:
    """The API guide's gradio_client example, run as written against this app."""
    readme = (repo_root / "docs" / "api.md").read_text()
    section = readme[readme.index("## Use the app from Python (API)") :]
    code = section[section.index("```python") + len("```python") : section.index("```\n", 10)]
    code = code.replace('"http://127.0.0.1:7860/"', repr(app["url"]))
    namespace: dict = {}
    exec(compile(code, "docs/api.md", "exec"), namespace)
    assert isinstance(namespace["reply"], str) and namespace["reply"]
    for name in ("follow_up", "summary", "actions", "french"):
        assert isinstance(namespace[name], str), name
