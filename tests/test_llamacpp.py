"""The llama.cpp engine on the embedded GGUF: same text as transformers, LoRA export, batching."""

from __future__ import annotations

import dataclasses
import json
import runpy
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")

from helpers import answer, save_random_adapter  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from supportlm.embedded import (  # noqa: E402
    EMBEDDED_GGUF_FILE,
    EMBEDDED_UPSTREAM_ID,
    embedded_model_dir,
)
from supportlm.engines.base import Engine, GenerationSettings  # noqa: E402
from supportlm.engines.llamacpp.engine import LlamaCppEngine  # noqa: E402
from supportlm.engines.llamacpp.gguf import (  # noqa: E402
    cached_lora_gguf,
    cached_reencoded_gguf,
    export_lora_to_gguf,
    quantised_below_8_bits,
    write_merged_gguf,
)
from supportlm.engines.transformers import TransformersEngine  # noqa: E402
from supportlm.errors import SupportLMError  # noqa: E402
from supportlm.prompts import encode_chat  # noqa: E402
from supportlm.serve.backends import build_engine  # noqa: E402
from supportlm.serve.settings import AppSettings  # noqa: E402

GGUF = embedded_model_dir() / EMBEDDED_GGUF_FILE
GREEDY = GenerationSettings(max_new_tokens=16)  # repetition_penalty 1.1, as the app uses


@pytest.fixture(scope="module")
def hf_model(smollm2_dir):
    """The same weights as the GGUF, de-quantised (what transformers serves)."""
    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, smollm2_dir):
    """A rank-16 all-linear LoRA with random non-zero B weights, so it changes the answers."""
    folder = tmp_path_factory.mktemp("adapter")
    return save_random_adapter(
        smollm2_dir, folder, r=16, lora_alpha=32, target_modules="all-linear", b_std=0.02
    )


@pytest.fixture(scope="module")
def cache(tmp_path_factory, monkeypatch_module):
    """The supportlm cache (LoRA exports, re-encoded bases) for this module's tests."""
    folder = tmp_path_factory.mktemp("cache")
    monkeypatch_module.setenv("SUPPORTLM_CACHE", str(folder))
    return folder


@pytest.fixture(scope="module")
def engine(smollm2_tokenizer, adapter_dir, cache):
    # The original Q4_1 weights: the transformers comparisons below reason about their margins.
    with LlamaCppEngine.from_gguf(
        GGUF,
        smollm2_tokenizer,
        adapter_dir=adapter_dir,
        n_ctx=1024,
        n_threads=2,
        n_seq_max=2,
        weights="original",
    ) as engine:
        yield engine


@pytest.fixture(scope="module")
def f32_base(tmp_path_factory):
    """The Q4_1 weights de-quantised to float32: llama.cpp then computes what transformers does."""
    return write_merged_gguf(GGUF, tmp_path_factory.mktemp("f32") / "base.gguf", tensor_type="f32")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def chat(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def test_engine_satisfies_the_protocol(engine):
    assert isinstance(engine, Engine)
    assert engine.name == "llama.cpp" and engine.has_adapter
    assert engine.context_length == 1024
    assert (engine.lanes, engine.threads) == (2, 2)


@pytest.mark.parametrize("question", ["How do I reset my password?", "How do I close my account?"])
def test_greedy_text_matches_transformers(engine, hf_model, smollm2_tokenizer, question):
    # Same de-quantised weights, but llama.cpp multiplies Q4_1 weights with 8-bit quantised
    # activations (logits move by up to ~1), so near-ties can flip later tokens. The first
    # tokens of these prompts win by more than 1.5 logits: they must agree exactly.
    prompt = chat(question)
    settings = GenerationSettings(max_new_tokens=5)
    reference = TransformersEngine(hf_model, smollm2_tokenizer)
    expected = reference.generate(reference.request(prompt, settings))
    got = answer(engine, prompt, settings, use_adapter=False)
    assert got.text == expected.text
    assert got.num_tokens == expected.num_tokens == 5
    assert got.finish_reason == expected.finish_reason == "length"


def _llama_cpp_logits(gguf_path, prompt: list[int], lora_path=None, lora_scale=1.0) -> np.ndarray:
    llm = llama_cpp.Llama(
        str(gguf_path),
        lora_path=None if lora_path is None else str(lora_path),
        lora_scale=lora_scale,
        n_ctx=256,
        n_threads=2,
        logits_all=True,
        verbose=False,
    )
    try:
        llm.eval(prompt)
        return np.array(llm.scores[llm.n_tokens - 1])
    finally:
        llm.close()


def test_lora_export_and_merge_match_peft_logits(
    hf_model, smollm2_tokenizer, adapter_dir, f32_base, tmp_path
):
    prompt = encode_chat(smollm2_tokenizer, chat("I want to cancel order 12345, how do I do that?"))
    with torch.no_grad():
        base = hf_model(torch.tensor([prompt])).logits[0, -1].numpy()
        peft_model = PeftModel.from_pretrained(hf_model, adapter_dir)
        adapted = peft_model(torch.tensor([prompt])).logits[0, -1].numpy()
        peft_model.unload()  # give the shared fixture its plain modules back
    # On float32 weights llama.cpp computes what transformers computes (Q4_1 kernels would
    # quantise activations to 8 bits and move logits by up to ~1, hiding a wrong mapping).
    lora = export_lora_to_gguf(adapter_dir, tmp_path / "lora.gguf", base_gguf=GGUF)
    merged = write_merged_gguf(
        f32_base, tmp_path / "merged.gguf", adapter_dir=adapter_dir, tensor_type="f32"
    )

    assert np.abs(adapted - base).max() > 1.0  # the adapter matters
    assert np.abs(_llama_cpp_logits(f32_base, prompt) - base).max() < 0.05
    # A q/k permutation or scale mistake moves logits by ~1; a correct export by ~0.01.
    assert np.abs(_llama_cpp_logits(f32_base, prompt, lora) - adapted).max() < 0.05
    assert np.abs(_llama_cpp_logits(merged, prompt) - adapted).max() < 0.05
    # The merged model with the LoRA negated is the base again (use_adapter=False, "merged").
    assert np.abs(_llama_cpp_logits(merged, prompt, lora, lora_scale=-1.0) - base).max() < 0.05


def test_use_adapter_switches_the_adapter(engine, smollm2_tokenizer):
    # A small random adapter need not change every greedy answer; it must change some, and
    # switching it back on must give the same answer again.
    questions = ["How do I reset my password?", "Where is my parcel?", "Can I return a lamp?"]
    prompts = [chat(question) for question in questions]
    with_adapter = [answer(engine, p, GREEDY, use_adapter=True).text for p in prompts]
    without = [answer(engine, p, GREEDY, use_adapter=False).text for p in prompts]
    assert with_adapter != without
    assert answer(engine, prompts[0], GREEDY, use_adapter=True).text == with_adapter[0]


def test_stop_event_cancels_and_frees_the_sequence(engine, smollm2_tokenizer):
    prompt = chat("Write a long story about a lost parcel.")
    stop = threading.Event()
    settings = GenerationSettings(max_new_tokens=500, repetition_penalty=1.0)
    events = []
    for event in engine.stream(
        engine.request(prompt, settings, use_adapter=False), stop_event=stop
    ):
        events.append(event)
        if event.num_tokens >= 3:
            stop.set()
    assert events[-1].finish_reason == "cancelled"
    assert events[-1].num_tokens < 20
    # Both sequences are free again: two more requests run side by side.
    assert answer(engine, prompt, GREEDY, use_adapter=False).num_tokens == GREEDY.max_new_tokens


def test_concurrent_streams_get_their_own_answers(engine, smollm2_tokenizer):
    questions = ["Where is my parcel?", "Can I pay with PayPal?", "How do I close my account?"]
    prompts = [chat(q) for q in questions]
    sequential = [answer(engine, p, GREEDY, use_adapter=False).text for p in prompts]
    # Three requests on two sequences: two decode together, the third waits for a free one.
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda p: answer(engine, p, GREEDY, use_adapter=False), prompts))
    assert [event.text for event in together] == sequential
    assert len(set(sequential)) == len(sequential)


def test_lanes_split_the_sequences_and_threads(smollm2_tokenizer, adapter_dir, cache):
    options = {"n_ctx": 256, "adapter_dir": adapter_dir, "weights": "original"}
    with LlamaCppEngine.from_gguf(
        GGUF, smollm2_tokenizer, n_threads=3, n_seq_max=5, **options
    ) as e:
        assert (e.lanes, e.threads) == (3, 3)
        assert e.lane_layout == [(2, 1), (2, 1), (1, 1)]
        assert e.description.endswith("3 lanes on 3 threads")
    with LlamaCppEngine.from_gguf(
        GGUF, smollm2_tokenizer, n_threads=4, n_seq_max=2, **options
    ) as e:
        assert e.lane_layout == [(1, 2), (1, 2)]
    with LlamaCppEngine.from_gguf(GGUF, smollm2_tokenizer, n_threads=2, n_lanes=1, **options) as e:
        assert e.lane_layout == [(4, 2)]


def test_both_adapter_states_run_at_once_on_two_lanes(engine, smollm2_tokenizer):
    # The fixture has two lanes of one sequence: an adapter-on and an adapter-off request go
    # to different lanes and decode side by side, each with its own LoRA state.
    prompts = [chat(q) for q in ("Where is my parcel?", "Can I return a lamp?")]
    states = [True, False, True, False]
    jobs = [(prompt, state) for prompt in prompts for state in states[:2]]
    sequential = [answer(engine, p, GREEDY, use_adapter=state).text for p, state in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = pool.map(lambda job: answer(engine, job[0], GREEDY, use_adapter=job[1]), jobs)
        assert [event.text for event in together] == sequential
    assert sequential[0] != sequential[1] or sequential[2] != sequential[3]


def test_bad_request_fails_alone_and_engine_keeps_serving(engine, smollm2_tokenizer):
    prompt = chat("Where is my parcel?")
    expected = answer(engine, prompt, GREEDY, use_adapter=False).text
    running = engine.stream(engine.request(prompt, GREEDY, use_adapter=False))
    first = next(running)
    with pytest.raises(SupportLMError, match="vocabulary"):
        request = engine.request(prompt, GREEDY, use_adapter=False)
        forged = [*request.prompt_ids, 10**7]  # no encoding makes this: a failing request
        engine.generate(dataclasses.replace(request, prompt_ids=forged))
    *_, final = running
    assert first.text and final.text == expected
    assert answer(engine, prompt, GREEDY, use_adapter=False).text == expected


def test_sampling_is_reproducible_with_a_seed(engine, smollm2_tokenizer):
    prompt = chat("Suggest a name for a support chatbot.")
    settings = GenerationSettings(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=7)
    first = answer(engine, prompt, settings, use_adapter=False).text
    assert answer(engine, prompt, settings, use_adapter=False).text == first


QUESTIONS = [
    "I want to cancel order 12345, how do I do that?",
    "How do I reset my password?",
    "My parcel arrived damaged. What now?",
]


def _centered_rms(logits: np.ndarray) -> float:
    # Softmax ignores a constant shift of all logits; llama.cpp's rounding shifts them a little.
    return float(np.sqrt(np.mean((logits - logits.mean()) ** 2)))


def test_file_type_decides_what_auto_serves(cache, f32_base):
    assert quantised_below_8_bits(GGUF)  # Q4_1
    assert not quantised_below_8_bits(cached_reencoded_gguf(GGUF, "q8_0"))
    assert not quantised_below_8_bits(f32_base)


def test_q8_0_reencoding_keeps_the_4_bit_values(cache):
    import gguf
    from gguf.quants import dequantize

    original = {t.name: t for t in gguf.GGUFReader(GGUF).tensors}
    reencoded = gguf.GGUFReader(cached_reencoded_gguf(GGUF, "q8_0")).tensors
    for tensor in reencoded:
        source = original[tensor.name]
        if source.tensor_type == tensor.tensor_type:  # token_embd is Q8_0 already
            assert np.array_equal(np.asarray(tensor.data), np.asarray(source.data))
            continue
        assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0
        want = dequantize(source.data, source.tensor_type).ravel()
        got = dequantize(tensor.data, tensor.tensor_type).ravel()
        # Q4_1's own rounding is ~8 % of the weights' RMS; Q8_0's grid adds ~0.6 %.
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.01


def test_q8_0_reencoding_with_the_lora_matches_peft_logits(
    hf_model, smollm2_tokenizer, adapter_dir, cache
):
    prompts = [encode_chat(smollm2_tokenizer, chat(question)) for question in QUESTIONS]
    with torch.no_grad():
        base = [hf_model(torch.tensor([p])).logits[0, -1].numpy() for p in prompts]
        peft_model = PeftModel.from_pretrained(hf_model, adapter_dir)
        adapted = [peft_model(torch.tensor([p])).logits[0, -1].numpy() for p in prompts]
        peft_model.unload()
    lora = cached_lora_gguf(adapter_dir, GGUF)
    q8_0 = cached_reencoded_gguf(GGUF, "q8_0")
    merged = cached_reencoded_gguf(GGUF, "q8_0", adapter_dir=adapter_dir)
    # llama.cpp rounds activations to 8 bits for quantised weights, so even the original Q4_1
    # file with the LoRA is ~0.15 (centred RMS) away from PEFT on its own de-quantised weights;
    # float32 files, exact to 0.05, are tested above. The Q8_0 re-encoding may add at most 0.1
    # to that (measured: <= 0.06); leaving the adapter out costs ~0.3.
    for prompt, want_base, want_adapted in zip(prompts, base, adapted, strict=True):
        reference = _centered_rms(_llama_cpp_logits(GGUF, prompt, lora) - want_adapted)
        served = {  # weights="q8_0" and weights="merged", with and without the adapter
            "Q8_0 + LoRA": (_llama_cpp_logits(q8_0, prompt, lora), want_adapted),
            "merged": (_llama_cpp_logits(merged, prompt), want_adapted),
            "Q8_0": (_llama_cpp_logits(q8_0, prompt), want_base),
            "merged - LoRA": (_llama_cpp_logits(merged, prompt, lora, -1.0), want_base),
        }
        for name, (got, want) in served.items():
            assert _centered_rms(got - want) < reference + 0.1, name


def test_merged_engine_serves_both_adapter_states(smollm2_tokenizer, adapter_dir, f32_base, cache):
    # On float32 files llama.cpp matches transformers to 0.05, so greedy texts are comparable:
    # the merged model (LoRA negated when off) must answer like the base with a runtime LoRA.
    lora = cached_lora_gguf(adapter_dir, GGUF)
    merged = cached_reencoded_gguf(GGUF, "f32", adapter_dir=adapter_dir)
    prompt = chat("How do I reset my password?")
    options = {"n_ctx": 512, "n_threads": 2, "n_seq_max": 1}
    short = GenerationSettings(max_new_tokens=4)  # later tokens can hinge on 0.05-logit ties
    with (
        LlamaCppEngine(merged, smollm2_tokenizer, lora_path=lora, lora_merged=True, **options) as m,
        LlamaCppEngine(f32_base, smollm2_tokenizer, lora_path=lora, **options) as runtime,
    ):
        for use_adapter in (True, False, True):
            text = answer(m, prompt, short, use_adapter=use_adapter).text
            assert text == answer(runtime, prompt, short, use_adapter=use_adapter).text
        on, off = (answer(m, prompt, GREEDY, use_adapter=flag).text for flag in (True, False))
        assert on != off


def test_from_gguf_weights_option(smollm2_tokenizer, adapter_dir, cache):
    with pytest.raises(SupportLMError, match="weights must be one of"):
        LlamaCppEngine.from_gguf(GGUF, smollm2_tokenizer, weights="q4_0")
    options = {"n_ctx": 512, "n_threads": 2, "n_seq_max": 1}
    with LlamaCppEngine.from_gguf(
        GGUF, smollm2_tokenizer, adapter_dir=adapter_dir, **options
    ) as engine:  # auto: a 4-bit base is served as Q8_0 with the adapter merged
        assert engine.has_adapter
        assert "as Q8_0" in engine.description and "(merged)" in engine.description
        assert engine.adapter_merged
        prompt = chat("How do I reset my password?")
        on = answer(engine, prompt, GREEDY, use_adapter=True)
        off = answer(engine, prompt, GREEDY, use_adapter=False)
        assert on.num_tokens and off.num_tokens and on.text != off.text
    with LlamaCppEngine.from_gguf(GGUF, smollm2_tokenizer, weights="q8_0", **options) as engine:
        assert not engine.has_adapter and "as Q8_0" in engine.description


def test_app_settings_choose_the_llamacpp_weights_and_threads(smollm2_tokenizer, cache):
    environ = {
        "SUPPORTLM_MODEL": str(GGUF),
        "SUPPORTLM_BACKEND": "llama.cpp",
        "SUPPORTLM_CONTEXT_LENGTH": "512",
        "SUPPORTLM_MAX_INPUT_TOKENS": "256",
        "SUPPORTLM_CONCURRENCY": "1",
        "SUPPORTLM_LLAMACPP_WEIGHTS": "original",
        "SUPPORTLM_LLAMACPP_THREADS": "2",
        "SUPPORTLM_LLAMACPP_LANES": "1",
    }
    settings = AppSettings.from_env(environ)
    assert (settings.llamacpp_weights, settings.llamacpp_threads) == ("original", 2)
    assert settings.llamacpp_lanes == 1
    engine = build_engine(settings.resolve())
    try:
        assert engine.description == f"llama.cpp · {GGUF.name} · 1 lane on 2 threads"
        assert (engine.lanes, engine.threads) == (1, 2)
    finally:
        engine.close()
    with pytest.raises(SupportLMError, match="SUPPORTLM_LLAMACPP_WEIGHTS"):
        AppSettings.from_env({**environ, "SUPPORTLM_LLAMACPP_WEIGHTS": "fp8"})


def test_a_retrained_adapter_replaces_its_cached_exports(adapter_dir, tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import load_file, save_file

    monkeypatch.setenv("SUPPORTLM_CACHE", str(tmp_path / "cache"))
    retrained = tmp_path / "run" / "adapter"
    shutil.copytree(adapter_dir, retrained)
    other = cached_lora_gguf(adapter_dir, GGUF)  # another adapter folder: must be kept
    first = cached_lora_gguf(retrained, GGUF)
    first_merged = cached_reencoded_gguf(GGUF, "q8_0", adapter_dir=retrained)
    assert cached_lora_gguf(retrained, GGUF) == first  # unchanged weights: the cached file

    weights = retrained / "adapter_model.safetensors"
    save_file({name: 2 * tensor for name, tensor in load_file(weights).items()}, weights)
    second = cached_lora_gguf(retrained, GGUF)
    second_merged = cached_reencoded_gguf(GGUF, "q8_0", adapter_dir=retrained)
    assert second != first and second_merged != first_merged
    assert second.is_file() and second_merged.is_file() and other.is_file()
    assert not first.exists() and not first_merged.exists()


def test_generation_bench_on_the_real_gguf(adapter_dir, cache, tmp_path):
    """bench/generation.py with llama.cpp: the llama.cpp cases run and their ratios add up."""
    bench = Path(__file__).resolve().parents[1] / "bench" / "generation.py"
    main = runpy.run_path(str(bench), run_name="bench_generation")["main"]
    output = tmp_path / "bench.json"
    argv = ["--adapter", str(adapter_dir), "--backend", "llama.cpp", "--runs", "1"]
    argv += ["--max_new_tokens", "6", "--prompt_tokens", "60", "--json", str(output)]
    assert main(argv) == 0
    report = json.loads(output.read_text())
    for case in ("baseline", "app", "app_streaming", "app_unmerged", "llamacpp"):
        # Each reference case times its first token inside the same call as the rest.
        assert report[case]["decode_tok_s"] > 0 and report[case]["ttft_s"] > 0, case
        assert 1 < report[case]["new_tokens"] <= 6, case
    assert "llama_cpp.Llama" in report["llamacpp"]["description"]
    assert "LoRA" in report["llamacpp"]["description"]  # the same adapter, as a GGUF LoRA
    assert report["vs_llamacpp"] == pytest.approx(
        report["app"]["decode_tok_s"] / report["llamacpp"]["decode_tok_s"]
    )
    assert report["merged_vs_unmerged"] == pytest.approx(
        report["app"]["decode_tok_s"] / report["app_unmerged"]["decode_tok_s"]
    )


def test_a_failing_adapter_switch_fails_that_request_and_nobody_waits_forever(
    engine, smollm2_tokenizer, monkeypatch
):
    # Issue 9: the request taken off the queue was never finished, so its caller blocked on
    # `results.get()` forever. Now it gets the error and the engine keeps serving.
    from supportlm.engines.llamacpp.lanes import Lane

    prompt = chat("Where is my parcel?")
    expected = answer(engine, prompt, GREEDY, use_adapter=True).text

    def broken_switch(self, on):
        raise RuntimeError("llama_set_adapters_lora failed with status -1")

    for lane in engine._pool.lanes:  # every lane must switch for the request below
        assert lane.adapter_on is True or lane.load == 0
        lane._set_adapter(True)
    monkeypatch.setattr(Lane, "_set_adapter", broken_switch)
    outcome = []
    worker = threading.Thread(
        target=lambda: outcome.append(_error_of(engine, prompt, use_adapter=False)), daemon=True
    )
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive() and "llama_set_adapters_lora" in str(outcome[0])
    monkeypatch.undo()
    assert answer(engine, prompt, GREEDY, use_adapter=True).text == expected


def _error_of(engine, prompt, *, use_adapter):
    try:
        answer(engine, prompt, GREEDY, use_adapter=use_adapter)
    except Exception as error:
        return error
    return None


@pytest.fixture(scope="module")
def embedded_adapter_dir(adapter_dir, tmp_path_factory) -> Path:
    """The random adapter named as finetune/train.py names one of the embedded model (its
    upstream Hub id), so evaluation loads the embedded GGUF as its base."""
    folder = Path(shutil.copytree(adapter_dir, tmp_path_factory.mktemp("embedded") / "adapter"))
    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = EMBEDDED_UPSTREAM_ID
    config_file.write_text(json.dumps(config))
    return folder


def test_evaluation_decodes_on_the_app_engine_many_at_once(embedded_adapter_dir, cache, tmp_path):
    """finetune/evaluate.py picks llama.cpp for the GGUF base and keeps every answer in place."""
    evaluate = Path(__file__).resolve().parents[1] / "finetune" / "evaluate.py"
    main = runpy.run_path(str(evaluate), run_name="evaluate_cli")["main"]
    data = Path(__file__).resolve().parents[1] / "data" / "customer_support.jsonl"
    output = tmp_path / "eval.json"
    argv = ["--adapter", str(embedded_adapter_dir), "--model_name_or_path", "embedded"]
    argv += ["--dataset", str(data), "--split", "all", "--limit", "6", "--max_new_tokens", "8"]
    assert main([*argv, "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    engine = report["engine"]
    assert engine["name"] == "llama.cpp" and engine["concurrency"] > 1
    assert "(merged)" in engine["description"]  # as the app serves a Q4_1 base with an adapter

    # Decoded together, each answer is its own prompt's: the tuned one (the merged model, what
    # the app serves) exactly as alone; the base one (the runtime LoRA negated, whose rounding
    # depends on the batch) may flip a near-tie late, so its first words are compared.
    from supportlm.modeling import load_tokenizer, resolve_model
    from supportlm.prompts import with_system_prompt

    tokenizer = load_tokenizer(resolve_model("embedded"))
    penalty = report["generation"]["repetition_penalty"]  # evaluate.py's, compared like for like
    settings = GenerationSettings(max_new_tokens=8, repetition_penalty=penalty)
    single_turn = [e for e in report["examples"] if e["question"] in _first_questions(data)]
    assert single_turn
    options = {"adapter_dir": embedded_adapter_dir, "n_ctx": 2048}
    with LlamaCppEngine.from_gguf(GGUF, tokenizer, **options) as alone:
        for example in single_turn:
            messages = [{"role": "user", "content": example["question"]}]
            prompt = with_system_prompt(messages, report["system_prompt"])
            tuned = answer(alone, prompt, settings, use_adapter=True).text.strip()
            assert tuned == example["tuned"], example["question"]
            base = answer(alone, prompt, settings, use_adapter=False).text.strip()
            assert base.split()[:3] == example["base"].split()[:3], example["question"]


def _first_questions(path: Path) -> set[str]:
    """The questions of `path`'s one-turn conversations."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return {row["messages"][0]["content"] for row in rows if len(row["messages"]) == 2}


def test_evaluation_bench_times_both_engines_on_the_same_prompts(
    embedded_adapter_dir, cache, tmp_path
):
    bench = Path(__file__).resolve().parents[1] / "bench" / "evaluation.py"
    main = runpy.run_path(str(bench), run_name="bench_evaluation")["main"]
    data = Path(__file__).resolve().parents[1] / "data" / "customer_support.jsonl"
    output = tmp_path / "evaluation.json"
    argv = ["--adapter", str(embedded_adapter_dir), "--dataset", str(data), "--limit", "3"]
    assert main([*argv, "--max_new_tokens", "6", "--json", str(output)]) == 0
    report = json.loads(output.read_text())
    assert report["transformers"]["concurrency"] == 1 and report["fast"]["concurrency"] > 1
    assert "llama.cpp" in report["fast"]["engine"]
    for engine in ("transformers", "fast"):
        assert [len(report[engine]["answers"][v]) for v in ("base", "tuned")] == [3, 3]
    assert report["speedup"] == pytest.approx(
        report["fast"]["answers_per_s"] / report["transformers"]["answers_per_s"]
    )
    assert 0 <= report["same_answers"] <= 1 and report["shared_words_median"] >= 0
