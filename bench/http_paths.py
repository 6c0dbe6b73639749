"""The app's two HTTP paths as benchmark clients, and the remote engines the app can front.

Used by `bench/load.py` and `bench/generation.py`: one streamed reply through Gradio's ``/chat``
endpoint (`gradio_client`, as the web page and Python users call it) or through
``/v1/chat/completions`` (the official `openai` client, as help-desk tools call it), timed on the
client's clock the same way, so the two paths can be compared side by side on one app process.

`start_llama_server` starts llama-cpp-python's own OpenAI server (``python -m llama_cpp.server``)
on a GGUF, the engine the app uses with ``SUPPORTLM_BACKEND=openai``.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import openai
from gradio_client import Client

PROTOCOLS = ("gradio", "v1")
#: The /v1 model id of the fine-tuned model (`supportlm.serve.v1.routes.TUNED_MODEL`).
TUNED_MODEL = "supportlm"
BASE_MODEL = "supportlm-base"


@dataclass
class StreamedReply:
    ttft_s: float | None
    total_s: float
    text: str
    error: str | None = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, timeout_s: float, log: Path) -> float:
    """Poll `url` until it answers 200; returns the seconds waited. Fails if the process dies."""
    start = time.perf_counter()
    while True:
        if process.poll() is not None:
            output = log.read_text()
            raise RuntimeError(f"{process.args} exited with {process.returncode}:\n{output}")
        if time.perf_counter() - start > timeout_s:
            process.terminate()
            raise TimeoutError(f"{url} did not answer after {timeout_s:.0f} s; see {log}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return time.perf_counter() - start
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)


def _timed(chunks: Callable[[], object]) -> StreamedReply:
    """Consume a stream of text pieces; TTFT is when the first non-empty piece arrives."""
    start = time.perf_counter()
    first, text = None, ""
    try:
        for piece, whole in chunks():
            if first is None and piece:
                first = time.perf_counter() - start
            text = whole
        error = None
    except Exception as exception:  # a benchmark reports failures instead of stopping
        error = f"{type(exception).__name__}: {exception}"
    return StreamedReply(first, time.perf_counter() - start, text, error)


def gradio_chat(client: Client, question: str, max_new_tokens: int) -> StreamedReply:
    """One greedy reply from the Chat endpoint; each update carries the whole text so far."""

    def chunks():
        job = client.submit(
            question, api_name="/chat", temperature=0.0, max_new_tokens=max_new_tokens
        )
        for update in job:
            yield update, update
        yield "", job.result()

    return _timed(chunks)


def v1_chat(
    client: openai.OpenAI, question: str, max_new_tokens: int, model: str = TUNED_MODEL
) -> StreamedReply:
    """One greedy streamed chat completion; each chunk carries the new text only."""

    def chunks():
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": question}],
            temperature=0.0,
            max_tokens=max_new_tokens,
            stream=True,
        )
        text = ""
        for chunk in stream:
            piece = chunk.choices[0].delta.content or "" if chunk.choices else ""
            text += piece
            yield piece, text

    return _timed(chunks)


def client_for(protocol: str, url: str) -> Callable[[str, int], StreamedReply]:
    """A reply function `(question, max_new_tokens) -> StreamedReply` with its own session."""
    if protocol == "gradio":
        gradio = Client(url, verbose=False)
        return lambda question, max_new_tokens: gradio_chat(gradio, question, max_new_tokens)
    if protocol == "v1":
        api = openai.OpenAI(base_url=f"{url.rstrip('/')}/v1", api_key="bench", max_retries=0)
        # The first listed model is the one the Chat tab answers with: tuned if there is one.
        model = api.models.list().data[0].id
        return lambda question, max_new_tokens: v1_chat(api, question, max_new_tokens, model)
    raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")


def start_llama_server(
    gguf: Path, port: int, *, lora: Path | None = None, threads: int = 2, timeout_s: float = 180
) -> tuple[subprocess.Popen, str]:
    """``python -m llama_cpp.server`` on `gguf` (and a LoRA GGUF); returns it and its /v1 URL.

    Its model alias is `TUNED_MODEL` with a LoRA, else `BASE_MODEL`: the id the app asks for.
    """
    log = Path(tempfile.mkstemp(prefix="llama-server-", suffix=".log")[1])
    alias = TUNED_MODEL if lora else BASE_MODEL
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf),
               "--model_alias", alias, "--host", "127.0.0.1", "--port", str(port),
               "--n_ctx", "2048", "--n_threads", str(threads),
               # Queue concurrent requests instead of cutting the running stream off.
               "--interrupt_requests", "False"]  # fmt: skip
    if lora:
        command += ["--lora_path", str(lora)]
    with log.open("w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    wait_until_up(f"{url}/models", process, timeout_s, log)
    return process, url
