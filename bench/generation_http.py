"""The generation benchmark's HTTP cases: the app as its clients reach it.

`bench/generation.py` calls `bench_http` after its in-process cases. It starts ``python app.py``
on the same model, adapter and backend (one request at a time, as the other cases run), and
times the same question, greedy and with the same token budget, through

* http_gradio: Gradio's ``/chat`` endpoint with `gradio_client` (the web page's path);
* http_v1: ``/v1/chat/completions`` streamed with the official `openai` client;
* http_remote (``--http all``): ``/v1`` of a second app whose engine is the first app's ``/v1``
  (``SUPPORTLM_BACKEND=openai``): what the scale-out hop costs on top of http_v1.

The runs of http_gradio and http_v1 alternate on one server (`timing.measure_cases`), so
``v1_vs_gradio`` is a side-by-side ratio. Tokens are counted with the model's tokenizer on the
text each client received; the peak RSS is the serving process's (the front app's for
http_remote). Prompt speed is timed once per server, as a one-token /v1 reply to the long prompt.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from http_paths import BASE_MODEL, TUNED_MODEL, client_for, free_port
from load import start_app
from timing import Measurement, PeakRSS, Run, decode_rate, measure_cases

HTTP_CHOICES = ("none", "direct", "all")
GRADIO_CASE = "app over HTTP: Gradio /chat (gradio_client, streamed)"
V1_CASE = "app over HTTP: /v1/chat/completions (openai, streamed)"
REMOTE_CASE = "front app's /v1, engine: the first app's /v1 (SUPPORTLM_BACKEND=openai)"


@contextmanager
def running_app(args: argparse.Namespace, scratch: Path, **env: str) -> Iterator[Any]:
    """``python app.py`` for the benchmark's model and adapter; yields its process and URL."""
    port = free_port()
    overrides = {
        "SUPPORTLM_ADAPTER": args.adapter or "none",
        "SUPPORTLM_FEEDBACK_DB": str(scratch / f"feedback-{port}.sqlite3"),
        "SUPPORTLM_CONCURRENCY": "1",
        # The long prompt must reach the engine whole for the prompt-speed figure.
        "SUPPORTLM_MAX_INPUT_CHARS": "1000000",
        "SUPPORTLM_MAX_INPUT_TOKENS": str(args.prompt_tokens + 200),
        "SUPPORTLM_CONTEXT_LENGTH": str(max(2048, args.prompt_tokens + 512)),
        **env,
    }
    backend = env.get("SUPPORTLM_BACKEND", args.backend)
    process, startup_s, log = start_app(args.model, backend, port, overrides, timeout_s=300)
    print(f"app ({backend}) ready in {startup_s:.1f} s on port {port} (log: {log})", flush=True)
    try:
        yield process, f"http://127.0.0.1:{port}/"
    finally:
        process.terminate()
        process.wait(timeout=30)


def http_case(
    protocol: str, url: str, question: str, max_new_tokens: int, tokenizer: Any
) -> Callable[[], Run]:
    """One streamed reply through `protocol`, timed on the client's clock, as a `Run`."""
    reply = client_for(protocol, url)

    def run() -> Run:
        answer = reply(question, max_new_tokens)
        if answer.error or answer.ttft_s is None:
            raise RuntimeError(f"{protocol} request failed: {answer.error or 'empty reply'}")
        tokens = len(tokenizer(answer.text, add_special_tokens=False)["input_ids"])
        return Run(answer.ttft_s, decode_rate(tokens, answer.total_s, answer.ttft_s), tokens)

    return run


def measure_server(
    process: Any,
    cases: dict[str, Callable[[], Run]],
    url: str,
    long_question: str,
    long_prompt_tokens: int,
    runs: int,
) -> dict[str, Measurement]:
    """`measure_cases` on a server process: its RSS, and prompt speed from a one-token reply."""
    prefill = client_for("v1", url)

    def prefill_seconds() -> float:
        return prefill(long_question, 1).total_s

    memory = PeakRSS(process.pid)
    return measure_cases(cases, prefill_seconds, long_prompt_tokens, runs, memory)


def bench_http(
    args: argparse.Namespace,
    tokenizer: Any,
    question: str,
    long_question: str,
    long_prompt_tokens: int,
) -> dict[str, Measurement | None]:
    """http_gradio and http_v1 on one app, then (``--http all``) http_remote in front of it."""
    results: dict[str, Measurement | None] = dict.fromkeys(
        ("http_gradio", "http_v1", "http_remote")
    )
    if args.http == "none":
        return results
    budget = args.max_new_tokens
    with tempfile.TemporaryDirectory() as scratch, running_app(args, Path(scratch)) as (app, url):
        cases = {
            GRADIO_CASE: http_case("gradio", url, question, budget, tokenizer),
            V1_CASE: http_case("v1", url, question, budget, tokenizer),
        }
        measured = measure_server(app, cases, url, long_question, long_prompt_tokens, args.runs)
        results["http_gradio"], results["http_v1"] = measured[GRADIO_CASE], measured[V1_CASE]
        if args.http == "all":
            remote = {
                "SUPPORTLM_BACKEND": "openai",
                "SUPPORTLM_OPENAI_BASE_URL": f"{url}v1",
                "SUPPORTLM_OPENAI_MODEL": TUNED_MODEL if args.adapter else "none",
                "SUPPORTLM_OPENAI_BASE_MODEL": BASE_MODEL,
            }
            with running_app(args, Path(scratch), **remote) as (front, front_url):
                case = {REMOTE_CASE: http_case("v1", front_url, question, budget, tokenizer)}
                results["http_remote"] = measure_server(
                    front, case, front_url, long_question, long_prompt_tokens, args.runs
                )[REMOTE_CASE]
    return results
