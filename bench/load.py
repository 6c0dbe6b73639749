"""Load test of the app: start `python app.py`, then drive 1 and N concurrent chat clients.

    python bench/load.py --clients 4 --questions 3 --max_new_tokens 64 --json load.json

Each client has its own session and asks K questions from a fixed list with greedy decoding,
through Gradio's ``/chat`` (a `gradio_client.Client`), through ``/v1/chat/completions`` (an
`openai.OpenAI` client), or, by default, both in turn on the same app process: their ratio is
``v1_vs_gradio``. ``--remote supportlm|llama_cpp`` serves through ``SUPPORTLM_BACKEND=openai`` in
front of a second app or of ``python -m llama_cpp.server``: the scale-out path.

Time to first token (TTFT) is measured around the client's streamed chunks with
`time.perf_counter`, tokens are counted with the model's tokenizer (the same count on both paths).
The same run with one client gives the baseline for `aggregate_speedup` (N clients' total tok/s /
one client's). Start-up time is from launching the process until the app answers HTTP.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "src"))
sys.path.insert(0, str(REPO_ROOT / "bench"))

from http_paths import (  # noqa: E402
    PROTOCOLS,
    client_for,
    free_port,
    start_llama_server,
    wait_until_up,
)

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
    wait_until_up(f"http://127.0.0.1:{port}/", process, timeout_s, log_path)
    return process, time.perf_counter() - start, log_path


def run_client(
    url: str,
    index: int,
    questions: list[str],
    max_new_tokens: int,
    tokenizer,
    protocol: str = "gradio",
) -> list[RequestResult]:
    reply = client_for(protocol, url)
    results = []
    for question in questions:
        answer = reply(question, max_new_tokens)
        tokens = (
            len(tokenizer(answer.text, add_special_tokens=False)["input_ids"]) if answer.text else 0
        )
        results.append(
            RequestResult(index, question, answer.ttft_s, answer.total_s, tokens, answer.error)
        )
    return results


def run_phase(
    url: str,
    n_clients: int,
    questions_per_client: int,
    max_new_tokens: int,
    tokenizer,
    server: psutil.Process,
    protocol: str = "gradio",
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
        per_client[index] = run_client(url, index, questions, max_new_tokens, tokenizer, protocol)

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
        "protocol": protocol,
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


def start_remote(kind: str, args: argparse.Namespace, scratch: Path) -> tuple[list, dict]:
    """The engine server the app fronts with ``SUPPORTLM_BACKEND=openai``, and the app's env.

    ``supportlm``: a second app.py (the `--backend` engine) whose /v1 the first one calls, so the
    remote path's cost is the hop alone; ``llama_cpp``: llama-cpp-python's OpenAI server on the
    model's GGUF, with the adapter as a runtime LoRA when one is served.
    """
    port = free_port()
    if kind == "supportlm":
        env = {"SUPPORTLM_FEEDBACK_DB": str(scratch / "upstream.sqlite3"),
               "SUPPORTLM_CONCURRENCY": str(max(args.clients, 1))}  # fmt: skip
        if args.adapter:
            env["SUPPORTLM_ADAPTER"] = args.adapter
        upstream, seconds, _ = start_app(args.model, args.backend, port, env, args.startup_timeout)
        print(f"upstream app ready in {seconds:.1f} s")
        # Without an adapter the upstream serves its base model only (GET /v1/models).
        url, tuned = f"http://127.0.0.1:{port}/v1", "supportlm" if args.adapter else "none"
    else:
        from supportlm.engines.llamacpp.gguf import cached_lora_gguf
        from supportlm.modeling import resolve_model

        gguf = resolve_model(args.model).gguf_path
        if gguf is None:
            raise SystemExit(f"--remote llama_cpp needs a GGUF model; {args.model!r} is not one.")
        lora = cached_lora_gguf(args.adapter, gguf) if args.adapter else None
        upstream, url = start_llama_server(gguf, port, lora=lora, timeout_s=args.startup_timeout)
        tuned = "supportlm" if lora else "none"
    env = {"SUPPORTLM_OPENAI_BASE_URL": url, "SUPPORTLM_OPENAI_MODEL": tuned}
    env["SUPPORTLM_OPENAI_BASE_MODEL"] = "supportlm-base" if kind == "supportlm" else ""
    return [upstream], env


def measure_protocols(url: str, process: subprocess.Popen, args, tokenizer) -> dict[str, dict]:
    """One client, then N, on each protocol in turn, so drift falls on both alike."""
    for protocol in args.protocols:
        # One untimed request first: the first generate call pays one-off warm-up costs.
        run_client(url, -1, QUESTIONS[:1], args.max_new_tokens, tokenizer, protocol)
    server = psutil.Process(process.pid)
    phases: dict[str, dict] = {protocol: {} for protocol in args.protocols}
    for clients, key in ((1, "one_client"), (args.clients, "n_clients")):
        for protocol in args.protocols:
            phase = run_phase(
                url, clients, args.questions, args.max_new_tokens, tokenizer, server, protocol
            )
            print_phase(f"{protocol}, {clients} client{'s' if clients > 1 else ''}", phase)
            phases[protocol][key] = phase
    return phases


def summarize(phases: dict[str, dict]) -> dict:
    """Per protocol: the speed-up of N clients over one, p95 TTFT and errors."""
    summary = {}
    for protocol, phase in phases.items():
        one, many = phase["one_client"], phase["n_clients"]
        summary[protocol] = {
            "aggregate_speedup": many["aggregate_tok_s"] / one["aggregate_tok_s"]
            if one["aggregate_tok_s"]
            else None,
            "p95_ttft_s": many["p95_ttft_s"],
            "errors": one["errors"] + many["errors"],
            **phase,
        }
    return summary


def protocol_ratios(by_protocol: dict[str, dict]) -> dict | None:
    """/v1 over Gradio /chat: one client's decode tok/s, and aggregate tok/s at 1 and N."""
    if set(by_protocol) != set(PROTOCOLS):
        return None
    v1, gradio = by_protocol["v1"], by_protocol["gradio"]

    def ratio(key: str, value: str) -> float | None:
        return v1[key][value] / gradio[key][value] if gradio[key][value] else None

    return {
        "decode_one_client": ratio("one_client", "mean_decode_tok_s"),
        "aggregate_one_client": ratio("one_client", "aggregate_tok_s"),
        "aggregate_n_clients": ratio("n_clients", "aggregate_tok_s"),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded", help="SUPPORTLM_MODEL for the app.")
    parser.add_argument("--adapter", default=None, help="SUPPORTLM_ADAPTER for the app.")
    parser.add_argument("--backend", default="auto", choices=["auto", "transformers", "llama.cpp"])
    parser.add_argument(
        "--protocol", default="both", choices=[*PROTOCOLS, "both"],
        help="Gradio's /chat (gradio_client), /v1/chat/completions (openai), or both in turn.",
    )  # fmt: skip
    parser.add_argument(
        "--remote", default="none", choices=["none", "supportlm", "llama_cpp"],
        help="Serve through SUPPORTLM_BACKEND=openai in front of this engine server.",
    )  # fmt: skip
    parser.add_argument("--clients", type=int, default=4, help="Concurrent clients (N).")
    parser.add_argument("--questions", type=int, default=2, help="Questions per client (K).")
    parser.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=64)
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--json", type=Path, default=None, help="Write the results here.")
    args = parser.parse_args(argv)
    args.protocols = list(PROTOCOLS) if args.protocol == "both" else [args.protocol]
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    tokenizer = load_tokenizer(args.model)
    processes: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory() as scratch:
        overrides = {
            "SUPPORTLM_FEEDBACK_DB": str(Path(scratch) / "feedback.sqlite3"),
            "SUPPORTLM_CONCURRENCY": str(max(args.clients, 1)),
        }
        if args.adapter:
            overrides["SUPPORTLM_ADAPTER"] = args.adapter
        backend = args.backend
        try:
            if args.remote != "none":
                processes, remote_env = start_remote(args.remote, args, Path(scratch))
                overrides.update(remote_env)
                backend = "openai"
            port = free_port()
            process, startup_s, log_path = start_app(
                args.model, backend, port, overrides, args.startup_timeout
            )
            processes.append(process)
            print(f"app ready in {startup_s:.1f} s (log: {log_path})")
            phases = measure_protocols(f"http://127.0.0.1:{port}/", process, args, tokenizer)
        finally:
            for process in reversed(processes):
                process.terminate()
                process.wait(timeout=30)
    by_protocol = summarize(phases)
    first = by_protocol[args.protocols[0]]
    intent = intent_cost(args.adapter)
    mean_request_s = statistics.fmean(r["total_s"] for r in first["one_client"]["requests_detail"])
    intent["share_of_request"] = intent["ms_per_request"] / 1000 / mean_request_s
    print(
        f"intent ({intent['classifier']}): {intent['ms_per_request']:.2f} ms a request, "
        f"{intent['share_of_request']:.3%} of one client's request; "
        f"fitted in {intent['fit_s']:.2f} s"
    )
    report = {
        "model": args.model,
        "backend": args.backend,
        "remote": args.remote,
        "protocols": args.protocols,
        "intent": intent,
        "max_new_tokens": args.max_new_tokens,
        "startup_s": startup_s,
        # The first protocol's figures at the top level (the keys before /v1 existed).
        **{key: first[key] for key in ("aggregate_speedup", "p95_ttft_s", "one_client")},
        "n_clients": first["n_clients"],
        "errors": sum(summary["errors"] for summary in by_protocol.values()),
        "by_protocol": by_protocol,
        "v1_vs_gradio": protocol_ratios(by_protocol),
    }
    for protocol, summary in by_protocol.items():
        speedup = summary["aggregate_speedup"]
        print(
            f"{protocol}: aggregate speed-up with {args.clients} clients: "
            + (f"{speedup:.2f}x" if speedup else "-")
        )
    if report["v1_vs_gradio"]:
        ratios = ", ".join(f"{k} {v:.3f}" for k, v in report["v1_vs_gradio"].items() if v)
        print(f"/v1 / Gradio /chat: {ratios}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
