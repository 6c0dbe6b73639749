"""Load test of the app: start `python app.py`, then drive 1 and N concurrent chat clients.

    python bench/load.py --clients 4 --questions 3 --max_new_tokens 64 --json load.json

Each client is a separate `gradio_client.Client` (its own session) that asks K questions from a
fixed list with greedy decoding. Time to first token (TTFT) is measured around the client's
streamed chunks with `time.perf_counter`, tokens are counted with the model's tokenizer. The same
run with one client gives the baseline for `aggregate_speedup` (N clients' total tok/s / one
client's). Start-up time is from launching the process until the app answers HTTP.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
from gradio_client import Client

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "src"))

from supportlm.modeling import load_tokenizer  # noqa: E402

QUESTIONS = [
    "I want to cancel my order, how do I do that?",
    "My package hasn't arrived yet. Can you check where it is?",
    "How can I get a refund for a damaged item?",
    "I forgot my password and can't log in to my account.",
    "Can I change the delivery address of my order?",
    "Do you ship to Canada, and how long does it take?",
    "How do I update the credit card on my account?",
    "I was charged twice for the same order.",
]


@dataclass
class RequestResult:
    client: int
    question: str
    ttft_s: float | None
    total_s: float
    tokens: int
    error: str | None = None

    @property
    def decode_tok_s(self) -> float:
        if self.ttft_s is None or self.tokens < 2 or self.total_s <= self.ttft_s:
            return 0.0
        return (self.tokens - 1) / (self.total_s - self.ttft_s)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app(
    model: str | None,
    backend: str,
    port: int,
    env_overrides: dict[str, str],
    timeout_s: float,
    cwd: Path = REPO_ROOT,
) -> tuple[subprocess.Popen, float, Path]:
    """Launch app.py and wait until it answers HTTP; returns the process and start-up seconds.

    `model` None leaves ``SUPPORTLM_MODEL`` unset: the app's default (the promoted or shipped
    adapter on its base, followed live when a new one is promoted).
    """
    log_path = Path(tempfile.mkstemp(prefix="supportlm-app-", suffix=".log")[1])
    env = {
        **os.environ,
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "SUPPORTLM_BACKEND": backend,
        **({"SUPPORTLM_MODEL": model} if model else {}),
        **env_overrides,
    }
    start = time.perf_counter()
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "app.py")],
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"app.py exited with {process.returncode}:\n{log_path.read_text()}")
        if time.perf_counter() - start > timeout_s:
            process.terminate()
            raise TimeoutError(f"app.py was not ready after {timeout_s:.0f} s; see {log_path}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return process, time.perf_counter() - start, log_path
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)


def run_client(
    url: str, index: int, questions: list[str], max_new_tokens: int, tokenizer
) -> list[RequestResult]:
    client = Client(url, verbose=False)
    results = []
    for question in questions:
        start = time.perf_counter()
        first = None
        text = ""
        try:
            job = client.submit(
                question, api_name="/chat", temperature=0.0, max_new_tokens=max_new_tokens
            )
            for chunk in job:
                if first is None and chunk:
                    first = time.perf_counter() - start
                text = chunk
            text = job.result()
            error = None
        except Exception as exception:  # a benchmark reports failures instead of stopping
            error = f"{type(exception).__name__}: {exception}"
        total = time.perf_counter() - start
        tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0
        results.append(RequestResult(index, question, first, total, tokens, error))
    return results


def run_phase(
    url: str,
    n_clients: int,
    questions_per_client: int,
    max_new_tokens: int,
    tokenizer,
    server: psutil.Process,
) -> dict:
    """N clients at once, each asking its own slice of QUESTIONS; returns the summary.

    CPU seconds are counted for the app's process and for this one (the clients): both share
    the machine, so client-side work is time the server cannot use.
    """
    per_client: list[list[RequestResult]] = [[] for _ in range(n_clients)]

    def work(index: int) -> None:
        questions = [
            QUESTIONS[(index * questions_per_client + k) % len(QUESTIONS)]
            for k in range(questions_per_client)
        ]
        per_client[index] = run_client(url, index, questions, max_new_tokens, tokenizer)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_clients)]
    server_cpu, client_cpu = sum(server.cpu_times()[:2]), time.process_time()
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    server_cpu, client_cpu = (
        sum(server.cpu_times()[:2]) - server_cpu,
        time.process_time() - client_cpu,
    )
    results = [result for client in per_client for result in client]
    ok = [r for r in results if r.error is None]
    ttfts = sorted(r.ttft_s for r in ok if r.ttft_s is not None)
    client_tok_s = [
        sum(r.tokens for r in client) / sum(r.total_s for r in client) for client in per_client
    ]

    def percentile(values: list[float], q: float) -> float | None:
        if not values:
            return None
        if len(values) == 1:
            return values[0]
        return statistics.quantiles(values, n=100, method="inclusive")[q - 1]

    return {
        "clients": n_clients,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "error_messages": sorted({r.error for r in results if r.error}),
        "wall_s": wall,
        "server_cpu_s": server_cpu,
        "client_cpu_s": client_cpu,
        "tokens": sum(r.tokens for r in ok),
        "p50_ttft_s": percentile(ttfts, 50),
        "p95_ttft_s": percentile(ttfts, 95),
        "aggregate_tok_s": sum(r.tokens for r in ok) / wall,
        "per_client_tok_s": client_tok_s,
        "mean_decode_tok_s": statistics.fmean([r.decode_tok_s for r in ok]) if ok else 0.0,
        "requests_detail": [asdict(r) for r in results],
    }


def print_phase(name: str, phase: dict) -> None:
    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f} s"

    per_client = ", ".join(f"{x:.1f}" for x in phase["per_client_tok_s"])
    print(
        f"{name}: {phase['requests']} requests, {phase['errors']} errors, "
        f"TTFT p50 {seconds(phase['p50_ttft_s'])} / p95 {seconds(phase['p95_ttft_s'])}, "
        f"aggregate {phase['aggregate_tok_s']:.1f} tok/s, per client [{per_client}] tok/s, "
        f"wall {phase['wall_s']:.1f} s, CPU s app {phase['server_cpu_s']:.1f} / clients "
        f"{phase['client_cpu_s']:.1f}"
    )
    for message in phase["error_messages"]:
        print(f"  error: {message}")


def intent_cost(adapter: str | None, repeats: int = 50) -> dict:
    """What the Chat caption's intent costs a request: the app's router, timed in this process.

    The router is built as the app builds it (the adapter's intent questions, else the bundled
    data), so this is the classifier the app serves; each of `QUESTIONS` is routed `repeats` times.
    """
    from supportlm.run_folder import RunFolder
    from supportlm.serve.handover import IntentRouter
    from supportlm.serve.settings import AppSettings

    started = time.perf_counter()
    router = IntentRouter.from_settings(AppSettings(), RunFolder(adapter) if adapter else None)
    fit_s = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(repeats):
        for question in QUESTIONS:
            router.route(question)
    per_request = (time.perf_counter() - started) / (repeats * len(QUESTIONS))
    return {"classifier": router.description, "fit_s": fit_s, "ms_per_request": 1000 * per_request}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded", help="SUPPORTLM_MODEL for the app.")
    parser.add_argument("--adapter", default=None, help="SUPPORTLM_ADAPTER for the app.")
    parser.add_argument("--backend", default="auto", choices=["auto", "transformers", "llama.cpp"])
    parser.add_argument("--clients", type=int, default=4, help="Concurrent clients (N).")
    parser.add_argument("--questions", type=int, default=2, help="Questions per client (K).")
    parser.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=64)
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--json", type=Path, default=None, help="Write the results here.")
    args = parser.parse_args(argv)

    tokenizer = load_tokenizer(args.model)
    with tempfile.TemporaryDirectory() as scratch:
        overrides = {
            "SUPPORTLM_FEEDBACK_DB": str(Path(scratch) / "feedback.sqlite3"),
            "SUPPORTLM_CONCURRENCY": str(max(args.clients, 1)),
        }
        if args.adapter:
            overrides["SUPPORTLM_ADAPTER"] = args.adapter
        port = free_port()
        process, startup_s, log_path = start_app(
            args.model, args.backend, port, overrides, args.startup_timeout
        )
        url = f"http://127.0.0.1:{port}/"
        print(f"app ready in {startup_s:.1f} s (log: {log_path})")
        try:
            # One untimed request first: the first generate call pays one-off warm-up costs.
            run_client(url, -1, QUESTIONS[:1], args.max_new_tokens, tokenizer)
            server = psutil.Process(process.pid)
            one = run_phase(url, 1, args.questions, args.max_new_tokens, tokenizer, server)
            print_phase("1 client", one)
            many = run_phase(
                url, args.clients, args.questions, args.max_new_tokens, tokenizer, server
            )
            print_phase(f"{args.clients} clients", many)
        finally:
            process.terminate()
            process.wait(timeout=30)
    intent = intent_cost(args.adapter)
    mean_request_s = statistics.fmean(r["total_s"] for r in one["requests_detail"])
    intent["share_of_request"] = intent["ms_per_request"] / 1000 / mean_request_s
    print(
        f"intent ({intent['classifier']}): {intent['ms_per_request']:.2f} ms a request, "
        f"{intent['share_of_request']:.3%} of one client's request; "
        f"fitted in {intent['fit_s']:.2f} s"
    )
    report = {
        "model": args.model,
        "backend": args.backend,
        "intent": intent,
        "max_new_tokens": args.max_new_tokens,
        "startup_s": startup_s,
        "aggregate_speedup": many["aggregate_tok_s"] / one["aggregate_tok_s"]
        if one["aggregate_tok_s"]
        else None,
        "p95_ttft_s": many["p95_ttft_s"],
        "errors": one["errors"] + many["errors"],
        "one_client": one,
        "n_clients": many,
    }
    speedup = report["aggregate_speedup"]
    print(
        f"aggregate speed-up with {args.clients} clients: "
        + (f"{speedup:.2f}x" if speedup else "-")
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
