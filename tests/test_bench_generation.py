"""bench/generation.py runs end to end on the tiny model and writes every key of its JSON."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

BENCH = Path(__file__).resolve().parents[1] / "bench" / "generation.py"
CASE_KEYS = {"ttft_s", "decode_tok_s", "prompt_tok_s", "new_tokens", "peak_rss_mb", "description"}


@pytest.fixture(scope="module")
def bench_main():
    return runpy.run_path(str(BENCH), run_name="bench_generation")["main"]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir) -> Path:
    folder = tmp_path_factory.mktemp("bench-adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)  # the same random adapter on every run
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(folder)
    return folder


def test_bench_on_tiny_model_writes_every_case(bench_main, tiny_model_dir, adapter_dir, tmp_path):
    output = tmp_path / "bench.json"
    argv = ["--model", tiny_model_dir, "--adapter", str(adapter_dir), "--backend", "transformers"]
    argv += ["--runs", "1", "--max_new_tokens", "6", "--prompt_tokens", "120"]
    assert bench_main([*argv, "--json", str(output)]) == 0
    report = json.loads(output.read_text())

    for case in ("baseline", "app", "app_streaming", "app_no_adapter", "app_merged"):
        assert set(report[case]) == CASE_KEYS, case
        assert report[case]["prompt_tok_s"] > 0
        assert 1 < report[case]["new_tokens"] <= 6
        # Every case times its first token inside the same call as the rest, so decode time
        # is positive even where a tiny model's per-call overhead dwarfs it.
        assert report[case]["decode_tok_s"] > 0
        assert report[case]["ttft_s"] > 0
    # The tiny model is no GGUF: llama.cpp has nothing to run on.
    assert report["llamacpp"] is None and report["vs_llamacpp"] is None
    assert "adapter off" in report["app_no_adapter"]["description"]
    assert "merged" in report["app_merged"]["description"]
    assert report["app_unmerged"] is None  # llama.cpp only
    assert report["merged_vs_unmerged"] == pytest.approx(
        report["app_merged"]["decode_tok_s"] / report["app"]["decode_tok_s"]
    )
    assert report["speedup"] == pytest.approx(
        report["app"]["decode_tok_s"] / report["baseline"]["decode_tok_s"]
    )
    assert report["streaming_overhead"] == pytest.approx(
        1 - report["app_streaming"]["decode_tok_s"] / report["app"]["decode_tok_s"]
    )
    assert report["adapter_vs_base"] == pytest.approx(
        report["app"]["decode_tok_s"] / report["app_no_adapter"]["decode_tok_s"]
    )
    assert report["settings"]["long_prompt_tokens"] >= 120
    assert report["settings"]["temperature"] == 0.0
    # The HTTP cases: app.py through Gradio /chat and /v1, and /v1 through a remote-engine hop.
    for case, path in (("http_gradio", "/chat"), ("http_v1", "/v1"), ("http_remote", "openai")):
        assert set(report[case]) == CASE_KEYS, case
        assert path in report[case]["description"]
        assert report[case]["new_tokens"] >= 1 and report[case]["ttft_s"] > 0
        assert report[case]["prompt_tok_s"] > 0
        # The server's memory, not this process's: it holds its own copy of the model.
        assert report[case]["peak_rss_mb"] > 50
    assert report["v1_vs_gradio"] == pytest.approx(
        report["http_v1"]["decode_tok_s"] / report["http_gradio"]["decode_tok_s"]
    )
    assert report["remote_vs_direct"] == pytest.approx(
        report["http_remote"]["decode_tok_s"] / report["http_v1"]["decode_tok_s"]
    )
    assert report["settings"]["http"] == "all"


def test_bench_without_adapter_has_no_adapter_cases(bench_main, tiny_model_dir, tmp_path):
    output = tmp_path / "bench.json"
    argv = ["--model", tiny_model_dir, "--runs", "1", "--max_new_tokens", "4"]
    argv += ["--prompt_tokens", "50", "--http", "direct", "--json", str(output)]
    assert bench_main(argv) == 0
    report = json.loads(output.read_text())
    assert report["app"] is not None
    # The app over HTTP serves the base model too (SUPPORTLM_ADAPTER=none), and no remote hop.
    assert report["http_v1"] is not None and report["http_gradio"] is not None
    assert report["http_remote"] is None and report["remote_vs_direct"] is None
    assert report["app_no_adapter"] is None and report["adapter_vs_base"] is None
    assert report["app_merged"] is None and report["app_unmerged"] is None


def test_bench_rejects_a_missing_adapter(bench_main, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        bench_main(["--adapter", str(tmp_path / "nope")])
    assert exit_info.value.code == 2
