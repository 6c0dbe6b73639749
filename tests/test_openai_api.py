"""The OpenAI-compatible ``/v1`` API, driven by clients nobody here wrote.

The official ``openai`` package, ``curl -N`` for the raw SSE framing and `gr.load_chat` as a
second UI, against the app's own server (uvicorn, Gradio mounted at ``/``) on the tiny model with
a random adapter; the cases follow llama.cpp's ``tools/server/tests/unit/test_chat_completion.py``
and vLLM's ``tests/entrypoints/openai/``. The last test streams a fine-tuned answer of the real
SmolLM2 from ``python app.py``.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from gradio_client import Client
from helpers import save_random_adapter, serving
from test_app_api import TRIGGER, FailingEngine

from supportlm.run_folder import RunFolder
from supportlm.serve.assistant import Assistant
from supportlm.serve.backends import build_engine
from supportlm.serve.settings import AppSettings
from supportlm.serve.ui import build_demo
from supportlm.serve.ui.server import create_server

QUESTION = [{"role": "user", "content": "Where is my order?"}]


def start(tiny_chat_model_dir, folder: Path, **settings):
    """An assistant on the tiny model and a random adapter, its engine failing on `TRIGGER`."""
    adapter = folder / "adapter"
    if not adapter.exists():
        save_random_adapter(tiny_chat_model_dir, adapter, b_std=0.5)
        RunFolder(adapter).write_record(tiny_chat_model_dir, {"method": "sft"})
    plan = AppSettings(
        model=tiny_chat_model_dir, adapter=str(adapter), backend="transformers",
        feedback_db=folder / "feedback.sqlite3", **settings,
    ).resolve()  # fmt: skip
    assistant = Assistant(FailingEngine(build_engine(plan)), plan)
    return assistant, create_server(build_demo(assistant=assistant), assistant)


@pytest.fixture(scope="module")
def server(tiny_chat_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("v1")
    assistant, app = start(tiny_chat_model_dir, folder, api_store=1, concurrency=2,
                           max_upload_bytes=20_000, max_input_chars=500)  # fmt: skip
    with serving(app) as url:
        yield {"url": url, "assistant": assistant}


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server['url']}/v1", api_key="unused", max_retries=0)


def test_models_lists_the_fine_tuned_model_first_then_the_base(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == ["supportlm", "supportlm-base"]
    version = server["assistant"].engine.adapter.version
    assert models[0].model_extra["adapter_version"] == version
    assert models[1].model_extra["adapter_version"] is None


def test_a_completion_has_the_openai_shape_and_counts_its_tokens(client):
    reply = client.chat.completions.create(model="supportlm", messages=QUESTION, max_tokens=6)
    # The completion id is the stored reply's id, as the Gradio API's /reply gives it.
    assert reply.object == "chat.completion" and reply.id.startswith("req-")
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 6
    assert (
        reply.usage.total_tokens == reply.usage.prompt_tokens + 6 and reply.usage.prompt_tokens > 5
    )


def test_max_completion_tokens_is_honoured_too(client):
    reply = client.chat.completions.create(
        model="supportlm", messages=QUESTION, max_completion_tokens=3
    )
    assert reply.usage.completion_tokens == 3


def test_a_stream_has_the_chunks_of_a_completion_and_the_same_text(client):
    whole = client.chat.completions.create(model="supportlm", messages=QUESTION, max_tokens=12)
    chunks = list(client.chat.completions.create(
        model="supportlm", messages=QUESTION, max_tokens=12, stream=True,
        stream_options={"include_usage": True},
    ))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and {c.object for c in chunks} == {
        "chat.completion.chunk"
    }
    assert {c.model for c in chunks} == {"supportlm"}
    with_choices = [c for c in chunks if c.choices]
    assert [c.choices[0].finish_reason for c in with_choices][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == whole.choices[0].message.content  # greedy: the same answer either way
    assert len(with_choices) > 3  # token by token, not one piece


def test_the_base_model_answers_otherwise_than_the_adapter(client):
    def text(model: str) -> str:
        reply = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=12)
        return reply.choices[0].message.content

    assert text("supportlm") != text("supportlm-base")


def test_stop_strings_end_the_reply_and_are_left_out(client):
    free = client.chat.completions.create(model="supportlm", messages=QUESTION, max_tokens=16)
    text = free.choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    for stops in (stop, [stop, "never-there"]):
        reply = client.chat.completions.create(
            model="supportlm", messages=QUESTION, max_tokens=16, stop=stops
        )
        assert reply.choices[0].message.content == text[: text.index(stop)]
        assert reply.choices[0].finish_reason == "stop"


def test_a_seed_makes_sampling_repeatable(client):
    def sample() -> str:
        return (
            client.chat.completions.create(
                model="supportlm", messages=QUESTION, max_tokens=10, temperature=1.0, seed=7
            )
            .choices[0]
            .message.content
        )

    assert sample() == sample()


def test_system_and_earlier_turns_reach_the_prompt(client, server):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi, how can I help?"},
        {"role": "user", "content": [{"type": "text", "text": "Where is my order?"}]},
    ]
    reply = client.chat.completions.create(model="supportlm", messages=messages, max_tokens=4)
    alone = client.chat.completions.create(
        model="supportlm", messages=[messages[0], *QUESTION], max_tokens=4
    )
    default = client.chat.completions.create(model="supportlm", messages=QUESTION, max_tokens=4)
    assert reply.usage.prompt_tokens > alone.usage.prompt_tokens + 10  # the earlier turns
    assert default.usage.prompt_tokens > alone.usage.prompt_tokens  # the adapter's own prompt


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"n": 2}, "n"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"presence_penalty": 1.0}, "presence_penalty"),
        ({"temperature": 5}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages"),
        ({"messages": [{"role": "tool", "content": "hi"}]}, "messages[0]"),
    ],
)
def test_what_is_not_supported_is_a_400_that_names_the_field(server, fields, param):
    body = {"model": "supportlm", "messages": QUESTION, **fields}
    response = httpx.post(f"{server['url']}/v1/chat/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert param.split("[")[0] in error["message"]


def test_errors_are_openai_errors_in_the_client_too(client):
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="supportlm", messages=QUESTION, n=3)
    assert bad.value.param == "n"


def test_malformed_and_oversized_bodies_are_refused(server):
    url = f"{server['url']}/v1/chat/completions"
    broken = httpx.post(
        url,
        content=b'{"model": "supportlm", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]
    huge = {"model": "supportlm", "messages": [{"role": "user", "content": "x" * 30_000}]}
    assert httpx.post(url, json=huge).status_code == 413


def test_long_messages_are_capped_like_the_ui_s(client):
    long = [{"role": "user", "content": "where is my order " * 100}]  # 1,800 chars, cap 500
    reply = client.chat.completions.create(model="supportlm", messages=long, max_tokens=2)
    assert reply.usage.prompt_tokens < 250


def test_an_error_mid_stream_is_an_error_event_then_done(server):
    body = {"model": "supportlm", "messages": [{"role": "user", "content": TRIGGER}],
            "stream": True, "max_tokens": 8}  # fmt: skip
    with httpx.stream("POST", f"{server['url']}/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "reference" in error["message"]
    assert "GPU" not in error["message"]  # the detail is logged, not sent


def test_the_app_serves_on_after_a_failed_stream(client, server):
    test_an_error_mid_stream_is_an_error_event_then_done(server)
    reply = client.chat.completions.create(model="supportlm", messages=QUESTION, max_tokens=3)
    assert reply.usage.completion_tokens == 3


def test_two_streams_at_once_both_finish_with_their_own_ids(client):
    def stream(question: str) -> tuple[set[str], str]:
        chunks = list(client.chat.completions.create(
            model="supportlm", messages=[{"role": "user", "content": question}], max_tokens=10,
            stream=True,
        ))  # fmt: skip
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return {c.id for c in chunks}, text

    with ThreadPoolExecutor(2) as pool:
        (ids_a, text_a), (ids_b, text_b) = pool.map(stream, ["Where is my order?", "Refund?"])
    assert len(ids_a) == len(ids_b) == 1 and ids_a != ids_b
    assert (text_a, text_b) == (stream("Where is my order?")[1], stream("Refund?")[1])


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_sees_plain_sse_framing(server):
    body = json.dumps({"model": "supportlm", "messages": QUESTION, "stream": True, "max_tokens": 4})
    raw = subprocess.run(
        ["curl", "-sN", f"{server['url']}/v1/chat/completions", "-H",
         "Content-Type: application/json", "-d", body, "-D", "-"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    head, _, stream = raw.replace("\r\n", "\n").partition("\n\n")
    assert "content-type: text/event-stream" in head.lower()
    frames = stream.split("\n\n")
    assert frames[-1] == "" and frames[-2] == "data: [DONE]"
    assert all(frame.startswith("data: {") for frame in frames[:-2])


def test_api_replies_take_feedback_by_completion_id(client, server):
    reply = client.chat.completions.create(model="supportlm", messages=QUESTION, max_tokens=4)
    url = f"{server['url']}/v1/feedback"
    saved = httpx.post(url, json={"id": reply.id, "correction": "It ships tomorrow."})
    assert saved.status_code == 200
    store = server["assistant"].feedback
    with store.connect() as connection:  # the stored reply and its correction, by the same id
        rows = connection.execute(
            "SELECT r.reply, f.kind, f.corrected_answer FROM feedback f "
            "JOIN replies r USING (reply_id) WHERE r.reply_id = ?",
            (reply.id,),
        ).fetchall()
    assert [tuple(row) for row in rows] == [
        (reply.choices[0].message.content, "correction", "It ships tomorrow.")
    ]
    unknown = httpx.post(url, json={"id": "req-nope", "rating": "like"})
    assert unknown.status_code == 400
    assert (
        httpx.post(url, json={"id": reply.id, "rating": "meh"}).json()["error"]["param"] == "rating"
    )


def test_health_says_what_serves(server):
    health = httpx.get(f"{server['url']}/health").json()
    assert health["status"] == "ok" and health["engine"] == "transformers"
    assert health["adapter_version"] == server["assistant"].engine.adapter.version


def test_cors_is_off_by_default(server):
    response = httpx.get(f"{server['url']}/v1/models", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in response.headers


def test_gradio_load_chat_is_a_second_ui_on_v1(server):
    import gradio as gr

    second = gr.load_chat(
        f"{server['url']}/v1/", model="supportlm", token="unused", file_types=None, api_name="chat"
    )
    _, url, _ = second.launch(prevent_thread_lock=True, quiet=True)
    try:
        reply = Client(url, verbose=False).predict("Where is my order?", api_name="/chat")
    finally:
        second.close()
    direct = openai.OpenAI(base_url=f"{server['url']}/v1", api_key="x").chat.completions.create(
        model="supportlm", messages=QUESTION)  # fmt: skip
    assert reply == direct.choices[0].message.content


@pytest.fixture(scope="module")
def locked(tiny_chat_model_dir, tmp_path_factory):
    """A server with an API key, a login, a rate limit of 3 a minute and one allowed origin."""
    folder = tmp_path_factory.mktemp("v1-locked")
    _, app = start(tiny_chat_model_dir, folder, api_key="sk-test", auth="ana:pw1",
                   rate_limit=3, cors_origins="https://desk.example")  # fmt: skip
    with serving(app) as url:
        yield url


def test_the_api_key_or_the_login_is_required(locked):
    def models(key: str) -> list[str]:
        client = openai.OpenAI(base_url=f"{locked}/v1", api_key=key, max_retries=0)
        return [m.id for m in client.models.list().data]

    with pytest.raises(openai.AuthenticationError) as refused:
        models("sk-wrong")
    assert refused.value.code == "invalid_api_key"
    assert models("sk-test")[0] == "supportlm"
    assert models("ana:pw1")[0] == "supportlm"  # the app's login as a bearer token
    basic = base64.b64encode(b"ana:pw1").decode()
    assert (
        httpx.get(f"{locked}/v1/models", headers={"Authorization": f"Basic {basic}"}).status_code
        == 200
    )
    assert httpx.get(f"{locked}/v1/models").status_code == 401
    # Load balancers need no key, and learn nothing else without one.
    assert httpx.get(f"{locked}/health").json() == {"status": "ok"}
    details = httpx.get(f"{locked}/health", headers={"Authorization": "Bearer sk-test"}).json()
    assert details["status"] == "ok" and "engine" in details and "running" in details


def test_the_rate_limit_is_a_429(locked):
    client = openai.OpenAI(base_url=f"{locked}/v1", api_key="sk-test", max_retries=0)
    for _ in range(3):
        client.chat.completions.create(model="supportlm", messages=QUESTION, max_tokens=1)
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(model="supportlm", messages=QUESTION, max_tokens=1)
    assert limited.value.code == "rate_limit_exceeded"


def test_cors_answers_only_the_configured_origin(locked):
    def allowed(origin: str) -> str | None:
        preflight = httpx.options(f"{locked}/v1/chat/completions", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization"})  # fmt: skip
        return preflight.headers.get("access-control-allow-origin")

    assert allowed("https://desk.example") == "https://desk.example"
    assert allowed("https://evil.example") is None


def test_the_openai_client_streams_a_fine_tuned_answer_from_app_py(repo_root, tmp_path):
    """`python app.py` as shipped (the shipped adapter on the embedded SmolLM2)."""
    sys.path.insert(0, str(repo_root / "bench"))
    from load import free_port, start_app

    port = free_port()
    env = {"SUPPORTLM_FEEDBACK_DB": str(tmp_path / "fb.sqlite3"), "HF_HUB_OFFLINE": "1"}
    process, _, log = start_app(None, os.environ.get("SUPPORTLM_BACKEND", "auto"), port, env,
                                600, cwd=tmp_path)  # fmt: skip
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        assert client.models.list().data[0].id == "supportlm"
        chunks = list(client.chat.completions.create(
            model="supportlm", stream=True, max_tokens=48,
            messages=[{"role": "user", "content": "How do I cancel my order?"}],
        ))  # fmt: skip
    finally:
        process.terminate()
        process.wait(30)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "cancel" in text.lower(), (text, log.read_text()[-2000:])
    assert len(chunks) > 10
