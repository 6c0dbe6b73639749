"""Compiler-free engine candidates against the app's llama.cpp engine, side by side in one run.

    python bench/engine_candidates.py --adapter models/supportlm-smollm2 --json out.json

The first measurement for choosing a fast CPU engine that installs from a binary wheel (issue
11, part 2). The app's engine (`serve.backends.build_engine` with ``SUPPORTLM_BACKEND=llama.cpp``,
the adapter merged into a Q8_0 copy) and CTranslate2 (`ctranslate2.Generator`, int8, the same
adapter merged with PEFT into the weights, converted once into ``--work_dir``) each answer

* one client: K questions one after another;
* N clients: N threads, started `--stagger_s` apart, each asking K questions in turn, so
  requests arrive at different times as `bench/load.py`'s clients do (not one simultaneous
  batch).

Greedy, `--max_new_tokens`, repetition penalty 1.1, the model's chat template and the
adapter's system prompt; tokens are the engine's own count; aggregate tok/s is all tokens over
the phase's wall time. CTranslate2 runs in several threading layouts (``inter_threads`` parallel
requests × ``intra_threads`` threads each): it has no continuous batching, so concurrent
requests share the CPU through parallel workers. With ``--ort_model`` (the merged model built by
``python -m onnxruntime_genai.models.builder -i MERGED -o OUT -p int4 -e cpu``), ONNX Runtime
GenAI runs too: one `Generator` per request, and its `Engine`, which batches requests that
arrive while others decode (continuous batching, at most 4 at once).
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "src"))

from supportlm.engines.base import GenerationSettings  # noqa: E402
from supportlm.modeling import load_tokenizer, prepare_model_dir  # noqa: E402
from supportlm.prompts import encode_chat, end_of_turn_token_ids, with_system_prompt  # noqa: E402
from supportlm.run_folder import RunFolder  # noqa: E402

sys.path.insert(0, str(REPO_ROOT / "bench"))
from load import QUESTIONS  # noqa: E402  (the load test's questions)

#: (inter_threads, intra_threads) layouts of CTranslate2 on this 2-core machine.
CT2_LAYOUTS = ((1, 2), (2, 1), (4, 1))


@dataclass(frozen=True)
class Prompt:
    """One question as chat messages (what the app's engine takes) and as token ids (what the
    raw candidates take), encoded once by the app's prompt module."""

    messages: list[dict[str, str]]
    ids: list[int]


Answer = Callable[[Prompt], tuple[int, float]]  # a prompt -> (tokens, TTFT s)


def llamacpp_answerer(adapter: str, settings: GenerationSettings) -> tuple[Answer, str, Any]:
    from generation import build_app_engine  # the engine `python app.py` builds

    engine = build_app_engine("embedded", adapter, "llama.cpp", SUPPORTLM_CONCURRENCY="8")

    def answer(prompt: Prompt) -> tuple[int, float]:
        start, first = time.perf_counter(), None
        for event in engine.stream(engine.request(prompt.messages, settings)):
            if first is None and event.text:
                first = time.perf_counter() - start
        return event.num_tokens, first or 0.0

    return answer, engine.description, engine


def ct2_model(adapter: str, work_dir: Path) -> Path:
    """The adapter merged into the base with PEFT, converted to CTranslate2 int8 (once)."""
    import ctranslate2
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    target = work_dir / f"ct2-int8-{Path(adapter).name}"
    if (target / "model.bin").exists():
        return target
    merged_dir = work_dir / "merged"
    base = AutoModelForCausalLM.from_pretrained(prepare_model_dir("embedded"), dtype=torch.float32)
    PeftModel.from_pretrained(base, adapter).merge_and_unload().save_pretrained(merged_dir)
    load_tokenizer("embedded").save_pretrained(merged_dir)
    converter = ctranslate2.converters.TransformersConverter(str(merged_dir))
    converter.convert(str(target), quantization="int8", force=True)
    return target


def ct2_answerer(
    model_dir: Path, tokenizer: Any, settings: GenerationSettings, inter: int, intra: int
) -> tuple[Answer, str, Any]:
    import ctranslate2

    generator = ctranslate2.Generator(
        str(model_dir), device="cpu", compute_type="int8", inter_threads=inter, intra_threads=intra
    )
    end_ids = end_of_turn_token_ids(tokenizer)
    end_tokens = tokenizer.convert_ids_to_tokens(end_ids)

    def answer(prompt: Prompt) -> tuple[int, float]:
        prompt_ids = prompt.ids
        start, first, tokens = time.perf_counter(), None, 0
        for step in generator.generate_tokens(
            tokenizer.convert_ids_to_tokens(prompt_ids),
            max_length=settings.max_new_tokens,
            sampling_topk=1,
            repetition_penalty=settings.repetition_penalty,
            end_token=end_tokens,
        ):
            if first is None:
                first = time.perf_counter() - start
            if step.token_id in end_ids:
                break
            tokens += 1
            if tokens >= settings.max_new_tokens:
                break
        return tokens, first or 0.0

    description = f"CTranslate2 {ctranslate2.__version__} int8, {inter} × {intra} threads"
    return answer, description, generator


def ort_answerer(
    model_dir: Path, tokenizer: Any, settings: GenerationSettings
) -> tuple[Answer, str, Any]:
    """ONNX Runtime GenAI's `Generator` loop, one per request (parallel ones share the model)."""
    import numpy
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    end_ids = set(end_of_turn_token_ids(tokenizer))

    def answer(prompt: Prompt) -> tuple[int, float]:
        prompt_ids = prompt.ids
        params = og.GeneratorParams(model)
        params.set_search_options(
            do_sample=False, max_length=len(prompt_ids) + settings.max_new_tokens,
            repetition_penalty=settings.repetition_penalty,
        )  # fmt: skip
        generator = og.Generator(model, params)
        start, first, tokens = time.perf_counter(), None, 0
        generator.append_tokens(numpy.array([prompt_ids], dtype=numpy.int32))
        while not generator.is_done() and tokens < settings.max_new_tokens:
            generator.generate_next_token()
            if first is None:
                first = time.perf_counter() - start
            if int(generator.get_next_tokens()[0]) in end_ids:
                break
            tokens += 1
        return tokens, first or 0.0

    return answer, f"ONNX Runtime GenAI {og.__version__} int4 (MatMulNBits)", model


class OrtScheduler:
    """ONNX Runtime GenAI's `Engine` (continuous batching) driven by one scheduler thread.

    Requests arriving while others decode join the running batch at the next step; each caller
    gets its tokens through its own queue (None when its turn has finished).
    """

    def __init__(self, model: Any, settings: GenerationSettings) -> None:
        import onnxruntime_genai as og

        self.og, self.settings, self.model = og, settings, model
        self.inbox: queue.Queue = queue.Queue()
        threading.Thread(target=self._loop, daemon=True).start()

    def submit(self, prompt_ids: list[int]) -> queue.Queue:
        tokens: queue.Queue = queue.Queue()
        self.inbox.put((prompt_ids, tokens))
        return tokens

    def _start(self, prompt_ids: list[int], tokens: queue.Queue, running: dict) -> None:
        import numpy

        request = self.engine.create_request()
        options = self.og.TurnOptions(request)
        options.set_do_sample(False)
        options.set_max_generated_tokens(self.settings.max_new_tokens)
        options.set_repetition_penalty(self.settings.repetition_penalty)
        request.begin_turn(numpy.array(prompt_ids, dtype=numpy.int32), options)
        running[request] = tokens

    def _loop(self) -> None:
        # The engine may only be used from the thread that created it.
        self.engine = self.og.Engine(self.model)
        self.buffer = self.engine.create_event_buffer(4)  # run() returns when it is full
        flags, running = self.og.EngineEventFlags, {}
        while True:
            if not self.engine.has_pending_requests():
                self._start(*self.inbox.get(), running)  # idle: wait for the next request
            while not self.inbox.empty():
                self._start(*self.inbox.get(), running)
            for event in self.engine.run(self.buffer):
                tokens = running[event.request]
                if event.flags & flags.TOKEN:
                    tokens.put(event.token)
                if event.flags & (flags.TURN_FINISHED | flags.FAILED):
                    tokens.put(None)
                    del running[event.request]


def ort_engine_answerer(
    model_dir: Path, tokenizer: Any, settings: GenerationSettings
) -> tuple[Answer, str, Any]:
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    scheduler = OrtScheduler(model, settings)
    end_ids = set(end_of_turn_token_ids(tokenizer))

    def answer(prompt: Prompt) -> tuple[int, float]:
        prompt_ids = prompt.ids
        start, first, count = time.perf_counter(), None, 0
        tokens = scheduler.submit(prompt_ids)
        while (token := tokens.get()) is not None:
            if first is None:
                first = time.perf_counter() - start
            count += token not in end_ids
        return count, first or 0.0

    description = f"ONNX Runtime GenAI {og.__version__} int4, Engine (continuous batching)"
    return answer, description, scheduler


def run_phase(answer: Answer, prompts: list[Prompt], clients: int, stagger_s: float) -> dict:
    results: list[tuple[int, float]] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        time.sleep(index * stagger_s)
        for n in range(len(prompts)):
            result = answer(prompts[(index + n) % len(prompts)])
            with lock:
                results.append(result)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    ttfts = sorted(ttft for _, ttft in results)
    return {
        "clients": clients,
        "requests": len(results),
        "tokens": sum(tokens for tokens, _ in results),
        "aggregate_tok_s": sum(tokens for tokens, _ in results) / wall,
        "p50_ttft_s": statistics.median(ttfts),
        "p95_ttft_s": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
        "wall_s": wall,
    }


def measure(answer: Answer, description: str, prompts: list[Prompt], args) -> dict:
    answer(prompts[0])  # warm-up
    one = run_phase(answer, prompts[: args.questions], 1, 0.0)
    many = run_phase(answer, prompts[: args.questions], args.clients, args.stagger_s)
    row = {"description": description, "one_client": one, "n_clients": many,
           "aggregate_speedup": many["aggregate_tok_s"] / one["aggregate_tok_s"]}  # fmt: skip
    print(
        f"{description}: 1 client {one['aggregate_tok_s']:.1f} tok/s; {args.clients} clients "
        f"{many['aggregate_tok_s']:.1f} tok/s ({row['aggregate_speedup']:.2f}x), TTFT p95 "
        f"{many['p95_ttft_s']:.2f} s",
        flush=True,
    )
    return row


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default=str(REPO_ROOT / "models" / "supportlm-smollm2"))
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--questions", type=int, default=3, help="Questions per client (K).")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--stagger_s", type=float, default=0.3, help="Gap between client starts.")
    parser.add_argument("--work_dir", type=Path, default=Path("outputs/engine-candidates"))
    parser.add_argument(
        "--ort_model", type=Path, default=None,
        help="An onnxruntime_genai model folder of the merged model (its builder's output).",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    tokenizer = load_tokenizer("embedded")
    system_prompt = RunFolder(args.adapter).prompt_style().system_prompt
    chats = [with_system_prompt([{"role": "user", "content": q}], system_prompt) for q in QUESTIONS]
    prompts = [Prompt(chat, encode_chat(tokenizer, chat)) for chat in chats]
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=0.0)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    model_dir = ct2_model(args.adapter, args.work_dir)
    rows = {}
    answer, description, engine = llamacpp_answerer(args.adapter, settings)
    rows["llamacpp_app"] = measure(answer, description, prompts, args)
    engine.close()
    for inter, intra in CT2_LAYOUTS:
        answer, description, generator = ct2_answerer(model_dir, tokenizer, settings, inter, intra)
        rows[f"ct2_{inter}x{intra}"] = measure(answer, description, prompts, args)
        del generator
    if args.ort_model:
        answer, description, model = ort_answerer(args.ort_model, tokenizer, settings)
        rows["ort_genai"] = measure(answer, description, prompts, args)
        del model
        answer, description, _ = ort_engine_answerer(args.ort_model, tokenizer, settings)
        rows["ort_genai_engine"] = measure(answer, description, prompts, args)
    reference = rows["llamacpp_app"]["one_client"]["aggregate_tok_s"]
    for name, row in rows.items():
        row["single_stream_vs_app"] = row["one_client"]["aggregate_tok_s"] / reference
        print(f"{name}: single stream / app's llama.cpp {row['single_stream_vs_app']:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
