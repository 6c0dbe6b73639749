"""Generation speed: the app's serving path against plain `model.generate` and llama.cpp.

    python bench/generation.py --adapter outputs/smollm2-support \
        --json outputs/bench-generation.json

On one model (default: the embedded SmolLM2-135M-Instruct), one fixed prompt and greedy decoding,
it measures

* baseline: plain `model.generate` in float32 (transformers, no adapter, no streamer);
* app / app_streaming: the app's engine (`supportlm.serve.backends.build_engine`: llama.cpp when
  it is installed and the model is a GGUF, else transformers) with the adapter, called like the app
  calls it: `generate` (whole reply) and `stream` (every event consumed, timed by the consumer);
* app_no_adapter: the same engine with the adapter switched off for the request;
* app_merged: transformers only, the adapter merged into the weights;
* app_unmerged: llama.cpp only, when the app serves the adapter merged into a Q8_0 copy (its
  default for 4-bit GGUFs): the same Q8_0 copy with the adapter as a runtime LoRA
  (``SUPPORTLM_LLAMACPP_WEIGHTS=q8_0``), so `merged_vs_unmerged` is measured on both backends;
* llamacpp: llama-cpp-python's high-level `Llama` on the same GGUF (and the same LoRA), when
  `llama_cpp` is importable: what the app's path could reach;
* http_gradio / http_v1 / http_remote: ``python app.py`` started on the same model and adapter,
  reached through Gradio's ``/chat`` and through ``/v1/chat/completions``, side by side
  (``v1_vs_gradio``), and through a second app that uses the first one's ``/v1`` as its engine
  (``--http all``, the default; see `generation_http.py`).

For each: time to first token and decode tokens/s (medians of `--runs` runs after a warm-up),
prompt tokens/s on a ~600-token prompt, and the peak resident memory of the whole process while
the case ran (of the server process, for the HTTP cases). Earlier cases are freed before the
next one starts, but the allocator keeps some of their memory, so read a later case's peak as an
upper bound.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

from supportlm import setup_logging
from supportlm.engines import registry
from supportlm.engines.base import Engine, GenerationSettings
from supportlm.engines.transformers import TransformersEngine
from supportlm.errors import SupportLMError
from supportlm.modeling import load_tokenizer, prepare_model_dir, resolve_model
from supportlm.prompts import (
    DEFAULT_SYSTEM_PROMPT,
    encode_chat,
    end_of_turn_token_ids,
    with_system_prompt,
)
from supportlm.run_folder import RunFolder
from supportlm.serve.backends import build_engine
from supportlm.serve.settings import AppSettings

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling bench modules
from generation_http import HTTP_CHOICES, bench_http
from timing import Measurement, PeakRSS, Run, decode_rate, in_worker_thread, measure_cases

QUESTION = (
    "I ordered a cast-iron casserole two weeks ago and it arrived with a cracked lid. Explain "
    "step by step how I can return it, get a replacement and what happens to my refund."
)
#: Repeated to build the long prompt that measures prompt (prefill) throughput.
ORDER_HISTORY_LINE = (
    "Order {n}: two enamel mugs, one bread knife and a linen tea towel, paid by card, delivered "
    "on time to the parcel locker near the station; no complaints about this one."
)
BACKEND_CHOICES = registry.local_choices()


class FirstTokenClock(StoppingCriteria):
    """A stopping criterion that never stops: it notes when the first new token exists.

    Both libraries call their stopping criteria once per new token, before the next step, so
    the reference cases get time to first token and decode time from one call, with neither a
    streamer nor a second, shorter call to subtract (on a tiny model that difference is noise
    and can come out negative). Works as a transformers `StoppingCriteria` and as a
    llama-cpp-python stopping criterion (any callable returning a bool).
    """

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.start = time.perf_counter()
        self.first_at: float | None = None

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        if self.first_at is None:
            self.first_at = time.perf_counter()
        if isinstance(input_ids, torch.Tensor):
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return False

    def run(self, new_tokens: int) -> Run:
        """The timings of the call that started at the last `restart` and ended just now."""
        total = time.perf_counter() - self.start
        ttft = (self.first_at or time.perf_counter()) - self.start
        return Run(ttft, decode_rate(new_tokens, total, ttft), new_tokens)


# ---------------------------------------------------------------------------------------------
# The cases
# ---------------------------------------------------------------------------------------------


def bench_baseline(
    model_spec: str,
    tokenizer: Any,
    prompt_ids: list[int],
    long_ids: list[int],
    settings: GenerationSettings,
    runs: int,
) -> Measurement:
    """Plain `model.generate`, float32, no adapter, no streamer: the reference point."""
    model = AutoModelForCausalLM.from_pretrained(prepare_model_dir(model_spec), dtype=torch.float32)
    model.eval()
    greedy = {
        "do_sample": False,
        "temperature": None,
        "top_p": None,
        "top_k": None,
        "repetition_penalty": settings.repetition_penalty,
        # The app stops at the chat template's end-of-turn token too; same reply length.
        "eos_token_id": end_of_turn_token_ids(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
    }

    clock = FirstTokenClock()

    def timed_generate(ids: list[int], max_new_tokens: int) -> Run:
        input_ids = torch.tensor([ids])

        def generate() -> torch.Tensor:
            with torch.inference_mode():
                return model.generate(
                    input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=max_new_tokens,
                    stopping_criteria=StoppingCriteriaList([clock]),
                    **greedy,
                )

        clock.restart()
        output = in_worker_thread(generate)
        return clock.run(output.shape[1] - len(ids))

    def run() -> Run:
        return timed_generate(prompt_ids, settings.max_new_tokens)

    # The model is freed when this function returns (the closures above die with it).
    description = "transformers model.generate, float32"
    return measure_cases(
        {description: run},
        lambda: timed_generate(long_ids, 1).ttft_s,
        len(long_ids),
        runs,
        PeakRSS(),
    )[description]


def bench_engine(
    engine: Engine,
    prompts: Prompts,
    settings: GenerationSettings,
    runs: int,
    *,
    use_adapter: bool = True,
    streaming: bool = True,
) -> tuple[Measurement, Measurement | None]:
    """The app's engine: whole replies (`generate`) and, if `streaming`, event by event.

    Both are timed the same way on the caller's clock, and their runs alternate (see
    `measure_cases`), so drift lands on both sides of the streaming overhead instead of on one.
    """
    one_token = GenerationSettings(
        max_new_tokens=1, temperature=0.0, repetition_penalty=settings.repetition_penalty
    )

    def generate() -> Run:
        start = time.perf_counter()
        event = engine.generate(engine.request(prompts.chat, settings, use_adapter=use_adapter))
        total = time.perf_counter() - start
        ttft = event.time_to_first_token or total
        return Run(ttft, decode_rate(event.num_tokens, total, ttft), event.num_tokens)

    def stream() -> Run:
        # Timed where the UI sees the text: after the engine's queue and detokenisation.
        start = time.perf_counter()
        first_text_at = None
        for event in engine.stream(engine.request(prompts.chat, settings, use_adapter=use_adapter)):
            if first_text_at is None and event.text:
                first_text_at = time.perf_counter()
        total = time.perf_counter() - start
        ttft = (first_text_at or time.perf_counter()) - start
        return Run(ttft, decode_rate(event.num_tokens, total, ttft), event.num_tokens)

    def prefill_seconds() -> float:
        request = engine.request(prompts.long_chat, one_token, use_adapter=use_adapter)
        event = engine.generate(request)
        return event.time_to_first_token or event.elapsed

    adapter = ", adapter off" if engine.has_adapter and not use_adapter else ""
    cases = {f"{engine.description} (generate{adapter})": generate}
    if streaming:
        cases[f"{engine.description} (stream{adapter})"] = stream
    measurements = list(
        measure_cases(cases, prefill_seconds, len(prompts.long_ids), runs, PeakRSS()).values()
    )
    return measurements[0], measurements[1] if streaming else None


def bench_llamacpp(
    gguf_path: Path,
    lora_path: Path | None,
    prompt_ids: list[int],
    long_ids: list[int],
    settings: GenerationSettings,
    runs: int,
) -> Measurement:
    """llama-cpp-python's high-level `Llama`, the way its README uses it."""
    from llama_cpp import Llama
    from llama_cpp import StoppingCriteriaList as LlamaStoppingCriteria

    kwargs: dict[str, Any] = {"lora_path": str(lora_path)} if lora_path else {}
    llm = Llama(
        model_path=str(gguf_path),
        n_ctx=2048,
        verbose=False,
        **kwargs,
    )

    clock = FirstTokenClock()

    def timed_completion(ids: list[int], max_tokens: int) -> Run:
        llm.reset()  # no prompt reuse from the previous call: every run pays its prefill
        clock.restart()
        completion = in_worker_thread(
            lambda: llm.create_completion(
                ids,
                max_tokens=max_tokens,
                temperature=0.0,
                repeat_penalty=settings.repetition_penalty,
                stopping_criteria=LlamaStoppingCriteria([clock]),
            )
        )
        return clock.run(completion["usage"]["completion_tokens"])

    def run() -> Run:
        return timed_completion(prompt_ids, settings.max_new_tokens)

    lora = f" + LoRA {Path(lora_path).name}" if lora_path else ""
    description = f"llama_cpp.Llama {Path(gguf_path).name}{lora}"
    result = measure_cases(
        {description: run},
        lambda: timed_completion(long_ids, 1).ttft_s,
        len(long_ids),
        runs,
        PeakRSS(),
    )[description]
    llm.close()
    return result


# ---------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------


@dataclass
class Prompts:
    """The short chat and a long one, as messages (the app's engines) and token ids (the raw
    baselines), and the long chat's message (the HTTP bench)."""

    chat: list[dict[str, str]]
    long_chat: list[dict[str, str]]
    ids: list[int]
    long_ids: list[int]
    long_message: str


def build_prompts(tokenizer: Any, system_prompt: str, long_prompt_tokens: int) -> Prompts:
    """The short chat, and a long one of about `long_prompt_tokens` tokens."""

    def chat(message: str) -> list[dict[str, str]]:
        return with_system_prompt([{"role": "user", "content": message}], system_prompt)

    history: list[str] = []
    while True:
        history.append(ORDER_HISTORY_LINE.format(n=len(history) + 1))
        message = "My order history:\n" + "\n".join(history) + "\n\n" + QUESTION
        long_ids = encode_chat(tokenizer, chat(message))
        if len(long_ids) >= long_prompt_tokens:
            short = chat(QUESTION)
            return Prompts(short, chat(message), encode_chat(tokenizer, short), long_ids, message)


def build_app_engine(model: str, adapter: str | None, backend: str, **overrides: str) -> Engine:
    """The engine `python app.py` builds for this model, adapter and backend.

    Read through `AppSettings.from_env`, so the other ``SUPPORTLM_*`` variables of this
    process (context length, concurrency, llama.cpp weights and threads) apply as in the app;
    `overrides` sets more of them.
    """
    environ = {
        **os.environ,
        "SUPPORTLM_MODEL": model,
        "SUPPORTLM_ADAPTER": adapter or "",
        "SUPPORTLM_BACKEND": backend,
        **overrides,
    }
    return build_engine(AppSettings.from_env(environ).resolve())


def _ratio(numerator: Measurement | None, denominator: Measurement | None) -> float | None:
    if numerator is None or denominator is None or denominator.decode_tok_s == 0:
        return None
    return numerator.decode_tok_s / denominator.decode_tok_s


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    source = resolve_model(args.model)
    tokenizer = load_tokenizer(source)
    system_prompt = (
        RunFolder(args.adapter).prompt_style().system_prompt
        if args.adapter
        else (DEFAULT_SYSTEM_PROMPT)
    )
    prompts = build_prompts(tokenizer, system_prompt, args.prompt_tokens)
    prompt_ids, long_ids, long_message = prompts.ids, prompts.long_ids, prompts.long_message
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=0.0)
    print(
        f"Model {source.display_name}; adapter {args.adapter or 'none'}; prompt "
        f"{len(prompt_ids)} tokens, long prompt {len(long_ids)} tokens; greedy, max_new_tokens "
        f"{settings.max_new_tokens}, repetition_penalty {settings.repetition_penalty}; "
        f"{args.runs} runs after a warm-up; {os.cpu_count()} CPUs, {torch.get_num_threads()} "
        "torch threads.",
        flush=True,
    )
    results: dict[str, Measurement | None] = {}
    results["baseline"] = bench_baseline(
        source.spec, tokenizer, prompt_ids, long_ids, settings, args.runs
    )
    gc.collect()

    engine = build_app_engine(args.model, args.adapter, args.backend)
    try:
        results["app"], results["app_streaming"] = bench_engine(
            engine, prompts, settings, args.runs
        )
        results["app_no_adapter"] = (
            bench_engine(
                engine,
                prompts,
                settings,
                args.runs,
                use_adapter=False,
                streaming=False,
            )[0]
            if engine.has_adapter
            else None
        )
        results["app_merged"] = results["app_unmerged"] = None
        app_merges = getattr(engine, "adapter_merged", False)
        if engine.has_adapter and isinstance(engine, TransformersEngine):
            # Last, because merging rewrites the base weights of this engine's model in place.
            merged = TransformersEngine(
                engine.model.merge_and_unload(),
                engine.tokenizer,
                adapter=engine.adapter,
                description=f"{engine.description}, adapter merged",
                context_length=engine.context_length,
            )
            results["app_merged"] = bench_engine(
                merged, prompts, settings, args.runs, streaming=False
            )[0]
            del merged
    finally:
        engine.close()
        del engine
        gc.collect()
    if app_merges:
        unmerged = build_app_engine(
            args.model, args.adapter, args.backend, SUPPORTLM_LLAMACPP_WEIGHTS="q8_0"
        )
        try:
            results["app_unmerged"] = bench_engine(
                unmerged, prompts, settings, args.runs, streaming=False
            )[0]
        finally:
            unmerged.close()
            del unmerged
            gc.collect()

    results["llamacpp"] = None
    from supportlm.engines import llamacpp

    if llamacpp.is_available() and source.gguf_path is not None:
        from supportlm.engines.llamacpp.gguf import cached_lora_gguf

        lora_path = cached_lora_gguf(args.adapter, source.gguf_path) if args.adapter else None
        results["llamacpp"] = bench_llamacpp(
            source.gguf_path, lora_path, prompt_ids, long_ids, settings, args.runs
        )

    gc.collect()
    results.update(bench_http(args, tokenizer, QUESTION, long_message, len(long_ids)))

    report: dict[str, Any] = {name: None if m is None else asdict(m) for name, m in results.items()}
    app, streaming = results["app"], results["app_streaming"]
    report["speedup"] = _ratio(app, results["baseline"])
    report["vs_llamacpp"] = _ratio(app, results["llamacpp"])
    report["streaming_overhead"] = (
        1 - streaming.decode_tok_s / app.decode_tok_s if app.decode_tok_s else None
    )
    report["adapter_vs_base"] = _ratio(app, results["app_no_adapter"])
    report["merged_vs_unmerged"] = _ratio(results["app_merged"], app) or _ratio(
        app, results["app_unmerged"]
    )
    report["v1_vs_gradio"] = _ratio(results["http_v1"], results["http_gradio"])
    report["http_vs_in_process"] = _ratio(results["http_v1"], streaming)
    report["remote_vs_direct"] = _ratio(results["http_remote"], results["http_v1"])
    report["settings"] = {
        "model": source.name,
        "adapter": args.adapter,
        "backend": args.backend,
        "http": args.http,
        "prompt_tokens": len(prompt_ids),
        "long_prompt_tokens": len(long_ids),
        "runs": args.runs,
        **settings.to_dict(),
    }
    report["machine"] = {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    return report


def cpu_model() -> str:
    """The CPU's name (``platform.processor()`` is empty on Linux): ratios depend on it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def format_table(report: dict[str, Any]) -> str:
    header = f"{'case':<16}{'TTFT s':>9}{'decode tok/s':>14}{'prompt tok/s':>14}"
    header += f"{'tokens':>8}{'peak RSS MB':>13}  engine"
    lines = [header, "-" * len(header)]
    for name in (
        "baseline",
        "app",
        "app_streaming",
        "app_no_adapter",
        "app_merged",
        "app_unmerged",
        "llamacpp",
        "http_gradio",
        "http_v1",
        "http_remote",
    ):
        row = report.get(name)
        if row is None:
            lines.append(f"{name:<16}{'-':>9}{'-':>14}{'-':>14}{'-':>8}{'-':>13}  (not run)")
            continue
        lines.append(
            f"{name:<16}{row['ttft_s']:>9.3f}{row['decode_tok_s']:>14.1f}"
            f"{row['prompt_tok_s']:>14.0f}{row['new_tokens']:>8}{row['peak_rss_mb']:>13.0f}"
            f"  {row['description']}"
        )
    lines.append("")
    for key, label in (
        ("speedup", "app / baseline decode"),
        ("vs_llamacpp", "app / llama.cpp decode"),
        ("streaming_overhead", "streaming overhead (1 - stream/generate decode)"),
        ("adapter_vs_base", "adapter on / adapter off decode"),
        ("merged_vs_unmerged", "merged / unmerged adapter decode"),
        ("v1_vs_gradio", "/v1 / Gradio /chat decode (HTTP, same server)"),
        ("http_vs_in_process", "/v1 over HTTP / in-process stream decode"),
        ("remote_vs_direct", "through a remote-engine hop / direct /v1 decode"),
    ):
        value = report.get(key)
        lines.append(f"{label}: {'-' if value is None else f'{value:.2f}'}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded", help="Model spec (default: embedded).")
    parser.add_argument("--adapter", default=None, help="LoRA adapter folder to serve.")
    parser.add_argument(
        "--backend",
        default="auto",
        choices=BACKEND_CHOICES,
        help="The app's backend: auto picks llama.cpp for a GGUF model when it is installed.",
    )
    parser.add_argument("--runs", type=int, default=3, help="Timed runs after the warm-up.")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="Tokens per reply.")
    parser.add_argument(
        "--prompt_tokens", type=int, default=600, help="Length of the prefill-speed prompt."
    )
    parser.add_argument(
        "--http",
        default="all",
        choices=HTTP_CHOICES,
        help="HTTP cases: none; direct (app.py via Gradio /chat and /v1); all (also /v1 through a "
        "second app with SUPPORTLM_BACKEND=openai).",
    )
    parser.add_argument("--json", default=None, help="Also write the results to this JSON file.")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.max_new_tokens < 2 or args.prompt_tokens < 1:
        parser.error("--runs must be >= 1, --max_new_tokens >= 2 and --prompt_tokens >= 1.")
    if args.adapter and not Path(args.adapter).is_dir():
        parser.error(f"adapter folder {args.adapter} does not exist.")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        report = run_benchmark(args)
    except SupportLMError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_table(report))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"Wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
