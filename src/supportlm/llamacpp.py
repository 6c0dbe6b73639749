"""The llama.cpp engine: a GGUF base model plus a GGUF LoRA adapter, the fast CPU serving path.

Two pieces:

* `export_lora_to_gguf` turns a PEFT LoRA folder into a llama.cpp LoRA GGUF with the `gguf`
  package (the same layout as llama.cpp's ``convert_lora_to_gguf.py``, without needing its
  scripts at run time).
* `LlamaCppEngine` serves the `supportlm.generation.Engine` protocol on llama.cpp's low-level API.
  One scheduler thread owns the llama context. Every active request has its own KV-cache sequence;
  each step decodes one token for every running sequence in a single batch and spends the rest of
  the batch on a chunk of a new request's prompt, so several users share one forward pass instead
  of queueing behind each other, and a long prompt never freezes running answers.

Install the optional dependency with ``CMAKE_ARGS="-DGGML_NATIVE=ON" pip install
"llama-cpp-python==0.3.36"`` (compiles llama.cpp for this CPU; ~11 minutes on 2 cores).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import hashlib
import importlib.util
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from supportlm.errors import SupportLMError
from supportlm.generation import GenerationSettings, StreamEvent
from supportlm.prompts import end_of_turn_token_ids

logger = logging.getLogger(__name__)

#: Architectures whose GGUF converter permutes the rows of q_proj/k_proj for llama.cpp's
#: interleaved ("normal") RoPE; a LoRA's B matrices for q/k must be permuted the same way.
ROPE_PERMUTED_ARCHITECTURES = frozenset({"llama"})

#: `LlamaCppEngine.from_gguf(weights=...)`: how the base GGUF's weights are served.
WEIGHTS_CHOICES = ("auto", "merged", "q8_0", "original")

#: Bump when the exported file changes, so cached exports are rebuilt.
_EXPORT_FORMAT_VERSION = 1

_PEFT_PREFIX = "base_model.model."


def _quiet_llama_cpp_logs() -> None:
    """Only errors from llama.cpp: it logs every tensor and setting it loads to stderr."""
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)


def is_available() -> bool:
    """Whether the optional `llama-cpp-python` package is installed."""
    return importlib.util.find_spec("llama_cpp") is not None


# --------------------------------------------------------------------------------------------
# PEFT LoRA -> GGUF LoRA
# --------------------------------------------------------------------------------------------


def _permute_rope_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's q/k row permutation (HF rotate-half -> llama.cpp interleaved RoPE)."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _base_gguf_layout(base_gguf: Path) -> tuple[str, dict[str, Any], dict[str, tuple[int, ...]]]:
    """Architecture, the hyper-parameters the export needs, and each tensor's ggml shape."""
    import gguf

    reader = gguf.GGUFReader(base_gguf)
    arch = reader.fields["general.architecture"].contents()
    hparams = {
        key: reader.fields[f"{arch}.{key}"].contents()
        for key in ("block_count", "attention.head_count", "attention.head_count_kv")
        if f"{arch}.{key}" in reader.fields
    }
    shapes = {tensor.name: tuple(int(n) for n in tensor.shape) for tensor in reader.tensors}
    return arch, hparams, shapes


@dataclass(frozen=True)
class _GgufLora:
    """A PEFT LoRA in llama.cpp's layout: per base tensor name, A (rank, in) and B (out, rank)."""

    arch: str
    alpha: float  # llama.cpp scales each pair by alpha / rank
    pairs: dict[str, tuple[np.ndarray, np.ndarray]]


def _read_lora_for_gguf(adapter_dir: Path, base_gguf: Path) -> _GgufLora:
    import gguf
    from peft import LoraConfig
    from peft.utils.other import get_pattern_key
    from safetensors.torch import load_file

    weights_file = adapter_dir / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise SupportLMError(
            f"{adapter_dir} has no adapter_model.safetensors; is it a PEFT adapter?"
        )
    config = LoraConfig.from_pretrained(str(adapter_dir))
    if config.use_dora or config.lora_bias:
        raise SupportLMError(
            "llama.cpp cannot run DoRA or LoRA-bias adapters; serve them with transformers."
        )
    if config.modules_to_save or config.trainable_token_indices:
        raise SupportLMError(
            "The adapter also trains full modules or token embeddings (modules_to_save); "
            "llama.cpp LoRA files cannot hold them; serve it with the transformers backend."
        )

    arch, hparams, base_shapes = _base_gguf_layout(base_gguf)
    arch_ids = {arch_name: arch_id for arch_id, arch_name in gguf.MODEL_ARCH_NAMES.items()}
    tensor_map = gguf.get_tensor_name_map(arch_ids[arch], int(hparams["block_count"]))
    # llama.cpp reads one alpha per file and takes each pair's rank from the tensor.
    file_alpha = float(config.lora_alpha) * (config.r**0.5 if config.use_rslora else 1.0)

    by_module: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    for key, value in load_file(weights_file).items():
        module, _, suffix = key.removeprefix(_PEFT_PREFIX).rpartition(".lora_")
        if suffix not in ("A.weight", "B.weight"):
            raise SupportLMError(
                f"Unexpected tensor {key!r} in {weights_file}: not a LoRA A/B weight."
            )
        by_module[module][suffix[0]] = value.float().numpy()

    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for module, pair in sorted(by_module.items()):
        name = tensor_map.get_name(module)
        if name is None or f"{name}.weight" not in base_shapes:
            raise SupportLMError(
                f"The adapter targets {module!r}, which the base GGUF {base_gguf.name} does not "
                "have as a separate weight (tied embeddings?); llama.cpp cannot apply it."
            )
        lora_a, lora_b = pair["A"], pair["B"]
        rank = lora_a.shape[0]
        in_features, out_features = base_shapes[f"{name}.weight"]  # ggml order: (ne0, ne1)
        if lora_a.shape != (rank, in_features) or lora_b.shape != (out_features, rank):
            raise SupportLMError(
                f"Adapter weight {module!r} (A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)}) "
                f"does not fit the base weight ({out_features}x{in_features}): it was trained "
                "on another base model."
            )
        peft_alpha = config.alpha_pattern.get(
            get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha
        )
        peft_scale = peft_alpha / (rank**0.5 if config.use_rslora else rank)
        if not np.isclose(peft_scale, file_alpha / rank):
            lora_b = lora_b * (peft_scale / (file_alpha / rank))
        if arch in ROPE_PERMUTED_ARCHITECTURES and name.endswith((".attn_q", ".attn_k")):
            heads = hparams[
                "attention.head_count" if name.endswith("q") else "attention.head_count_kv"
            ]
            lora_b = _permute_rope_rows(lora_b, int(heads))
        pairs[f"{name}.weight"] = (np.ascontiguousarray(lora_a), np.ascontiguousarray(lora_b))
    return _GgufLora(arch, file_alpha, pairs)


def _write_atomically(writer_factory, out_path: Path, fill) -> Path:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.name + ".partial")
    writer = writer_factory(partial)
    fill(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(out_path)  # atomic: readers never see a half-written file
    return out_path


def export_lora_to_gguf(
    adapter_dir: str | os.PathLike, out_path: str | os.PathLike, *, base_gguf: str | os.PathLike
) -> Path:
    """Write the PEFT LoRA adapter in `adapter_dir` as a llama.cpp LoRA GGUF at `out_path`.

    Tensors are renamed with gguf's tensor-name map (``model.layers.3.self_attn.q_proj`` ->
    ``blk.3.attn_q.weight.lora_a``) and written in float32: it is also the fastest type for
    llama.cpp's LoRA matmuls (float16 or Q8_0 pairs decode slower on AVX2). llama.cpp scales every
    pair by ``adapter.lora.alpha / rank``; where PEFT's scale differs (rsLoRA, rank or alpha
    patterns) the difference is folded into B. The q/k B rows get the RoPE row permutation the
    base GGUF's converter applied to the base weights.
    """
    import gguf

    lora = _read_lora_for_gguf(Path(adapter_dir), Path(base_gguf))

    def fill(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, lora.alpha)
        for name, (lora_a, lora_b) in lora.pairs.items():
            # numpy (rows, cols) is ggml (ne0=cols, ne1=rows): A is (in, rank), B is (rank, out).
            writer.add_tensor(f"{name}.lora_a", lora_a)
            writer.add_tensor(f"{name}.lora_b", lora_b)

    return _write_atomically(lambda path: gguf.GGUFWriter(path, lora.arch), Path(out_path), fill)


#: `general.file_type` (llama_ftype) of a GGUF whose re-encoded weights have this type.
_FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7}


def write_merged_gguf(
    base_gguf: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    adapter_dir: str | os.PathLike | None = None,
    tensor_type: str = "q8_0",
) -> Path:
    """Write `base_gguf` with the LoRA in `adapter_dir` merged in (W + alpha/r · B·A).

    Each weight the adapter changes is de-quantised, merged and re-encoded as `tensor_type`;
    without an adapter every 2-D weight not already of `tensor_type` is re-encoded (an f32 copy
    is the exact reference for numeric checks). Q8_0 keeps a LoRA's small delta, which
    re-quantising to 4 bits would mostly erase, and llama.cpp's Q8_0 kernels decode faster on
    AVX2 than Q4_1 with a runtime LoRA.
    Other tensors and all metadata are copied unchanged.
    """
    import gguf
    from gguf.quants import dequantize, quantize

    if tensor_type not in _FILE_TYPES:
        raise SupportLMError(f"tensor_type must be one of {sorted(_FILE_TYPES)}.")
    base_gguf = Path(base_gguf)
    reader = gguf.GGUFReader(base_gguf)
    arch = reader.fields["general.architecture"].contents()
    lora = _read_lora_for_gguf(Path(adapter_dir), base_gguf) if adapter_dir else None
    target = gguf.GGMLQuantizationType[tensor_type.upper()]

    def fill(writer: gguf.GGUFWriter) -> None:
        for key, value in reader.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture":
                continue  # the writer adds these itself
            if key == "general.file_type":
                writer.add_uint32(key, _FILE_TYPES[tensor_type])
            elif value.types[0] == gguf.GGUFValueType.ARRAY:
                writer.add_key_value(key, value.contents(), value.types[0], value.types[-1])
            else:
                writer.add_key_value(key, value.contents(), value.types[0])
        for tensor in reader.tensors:
            shape = [int(n) for n in reversed(tensor.shape)]  # numpy order: (out, in)
            if lora:
                changed = tensor.name in lora.pairs
            else:  # a weight already in the target type is copied bit for bit
                changed = len(shape) == 2 and tensor.tensor_type != target
            if not changed:
                writer.add_tensor(
                    tensor.name,
                    tensor.data,
                    raw_shape=tensor.data.shape,
                    raw_dtype=tensor.tensor_type,
                )
                continue
            weight = dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32)
            if lora:
                lora_a, lora_b = lora.pairs[tensor.name]
                weight += (lora.alpha / lora_a.shape[0]) * (lora_b @ lora_a)
            if target == gguf.GGMLQuantizationType.F32:
                writer.add_tensor(tensor.name, weight)
            elif target == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(tensor.name, weight.astype(np.float16))
            else:
                data = quantize(weight, target)
                writer.add_tensor(tensor.name, data, raw_shape=data.shape, raw_dtype=target)

    return _write_atomically(lambda path: gguf.GGUFWriter(path, arch), Path(out_path), fill)


def _file_digest(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _cache_key(base_gguf: Path, adapter_dir: Path | None, *extra: str) -> str:
    """Names the base file (path, size, mtime) and hashes the adapter's weights and config."""
    parts = [str(base_gguf), str(base_gguf.stat().st_size), str(int(base_gguf.stat().st_mtime))]
    if adapter_dir is not None:
        weights = adapter_dir / "adapter_model.safetensors"
        config = adapter_dir / "adapter_config.json"
        for required in (weights, config):
            if not required.is_file():
                raise SupportLMError(f"{adapter_dir} has no {required.name}; is it a PEFT adapter?")
        parts.append(_file_digest(weights, config))
    parts += [*extra, str(_EXPORT_FORMAT_VERSION)]
    return hashlib.sha256(":".join(parts).encode()).hexdigest()[:16]


def _slot(*parts: object) -> str:
    """A short name for what a cache file is of (paths, type), whatever its contents' key."""
    return hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:8]


def _cached(folder: str, stem: str, key: str, write) -> Path:
    """``<cache>/<folder>/<stem>-<key>.gguf``, written once; older keys of `stem` are deleted.

    A retrained adapter gets a new key, and its stale exports (145 MB for a merged
    SmolLM2) would otherwise pile up in the cache with every training run.
    """
    from supportlm.modeling import cache_dir

    target = cache_dir() / folder / f"{stem}-{key}.gguf"
    if not target.is_file():
        logger.info("Writing %s (once).", target)
        write(target)
        for stale in target.parent.glob(f"{stem}-*.gguf"):
            # Same stem and a key of the same length: not a longer stem that starts with this one.
            if stale != target and len(stale.name) == len(target.name):
                with contextlib.suppress(OSError):  # in use on Windows: left for next time
                    stale.unlink()
    return target


def cached_lora_gguf(adapter_dir: str | os.PathLike, base_gguf: str | os.PathLike) -> Path:
    """The GGUF export of `adapter_dir` for `base_gguf`, converted once into the supportlm cache.

    The key hashes the adapter's weights and config and names the base file, so a retrained
    adapter (same folder, new weights) is exported again, replacing the old export.
    """
    adapter_dir, base_gguf = Path(adapter_dir), Path(base_gguf).resolve()
    key = _cache_key(base_gguf, adapter_dir)
    slot = _slot(adapter_dir.resolve(), base_gguf)
    return _cached(
        "lora-gguf",
        f"{adapter_dir.resolve().name}-{slot}",
        key,
        lambda target: export_lora_to_gguf(adapter_dir, target, base_gguf=base_gguf),
    )


def cached_reencoded_gguf(
    base_gguf: str | os.PathLike,
    tensor_type: str = "q8_0",
    *,
    adapter_dir: str | os.PathLike | None = None,
) -> Path:
    """`base_gguf` re-encoded as `tensor_type` (with `adapter_dir` merged in), cached once.

    Keyed like `cached_lora_gguf`, so a replaced base file or a retrained adapter is written
    again, replacing the old file.
    """
    base_gguf = Path(base_gguf).resolve()
    adapter = None if adapter_dir is None else Path(adapter_dir)
    key = _cache_key(base_gguf, adapter, tensor_type)
    label = "" if adapter is None else f"-{adapter.resolve().name}"
    slot = _slot(base_gguf, None if adapter is None else adapter.resolve(), tensor_type)
    return _cached(
        "base-gguf",
        f"{base_gguf.stem}{label}-{tensor_type}-{slot}",
        key,
        lambda target: write_merged_gguf(
            base_gguf, target, adapter_dir=adapter, tensor_type=tensor_type
        ),
    )


#: llama_ftype values of GGUF files whose weights are all 8 bits or wider.
_WIDE_FILE_TYPES = frozenset({0, 1, 7, 32})  # ALL_F32, MOSTLY_F16, MOSTLY_Q8_0, MOSTLY_BF16


def _quantised_below_8_bits(gguf_path: Path) -> bool:
    """Whether `gguf_path`'s weights are stored in fewer than 8 bits (Q4_1, Q4_K, ...).

    Read from the file's ``general.file_type`` through llama.cpp (a vocab-only load, ~0.1 s):
    `gguf.GGUFReader` parses every metadata field, the 49k-entry vocabulary included, in ~2.5 s,
    a quarter of the app's start-up. Files without the key are scanned tensor by tensor.
    """
    import llama_cpp

    _quiet_llama_cpp_logs()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(gguf_path).encode(), params)
    if not model:
        raise SupportLMError(f"llama.cpp could not read {gguf_path}; is it a GGUF model?")
    try:
        value = ctypes.create_string_buffer(32)
        found = llama_cpp.llama_model_meta_val_str(model, b"general.file_type", value, 32) > 0
    finally:
        llama_cpp.llama_model_free(model)
    if found and value.value.isdigit():
        return int(value.value) not in _WIDE_FILE_TYPES

    import gguf

    wide = {
        gguf.GGMLQuantizationType.F32,
        gguf.GGMLQuantizationType.F16,
        gguf.GGMLQuantizationType.BF16,
        gguf.GGMLQuantizationType.Q8_0,
    }
    reader = gguf.GGUFReader(gguf_path)
    return any(len(t.shape) == 2 and t.tensor_type not in wide for t in reader.tensors)


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------

#: Most prompt tokens a lane reads in one step on threads borrowed from idle lanes: 256-token
#: steps read a prompt as fast as 512-token ones on 2 cores (128: 7 % slower; measured).
_BORROWED_CHUNK = 256

#: Candidates kept before the nucleus cut; a full sort of the vocabulary costs milliseconds.
_TOP_P_CANDIDATES = 256


def apply_repetition_penalty(logits: np.ndarray, token_ids: np.ndarray, penalty: float) -> None:
    """transformers' `RepetitionPenaltyLogitsProcessor`, in place, over prompt and reply ids."""
    if penalty == 1.0 or token_ids.size == 0:
        return
    scores = logits[token_ids]
    logits[token_ids] = np.where(scores < 0, scores * penalty, scores / penalty)


def sample_top_p(
    logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator
) -> int:
    """Temperature then nucleus (top-p) sampling, as transformers' warpers do it."""
    scaled = logits.astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    k = min(_TOP_P_CANDIDATES, probs.size)
    candidates = np.argpartition(probs, -k)[-k:]
    if probs[candidates].sum() < top_p:  # a flat distribution: the nucleus needs the full sort
        candidates = np.arange(probs.size)
    order = candidates[np.argsort(probs[candidates])[::-1]]
    cumulative = np.cumsum(probs[order])
    keep = order[: int(np.searchsorted(cumulative, top_p)) + 1]  # always at least one token
    kept = probs[keep] / probs[keep].sum()
    return int(rng.choice(keep, p=kept))


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Finished:
    reason: str  # "stop" | "length" | "cancelled"


@dataclass(eq=False)
class _Request:
    """One generation, owned by its lane's scheduler thread once queued."""

    prompt_ids: list[int]
    settings: GenerationSettings
    use_adapter: bool
    cancel: threading.Event
    #: What the scheduler reports back: token ids, then a `_Finished` or an exception.
    results: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    seq_id: int = -1
    n_past: int = 0  # tokens of this request in the KV cache
    pending_token: int | None = None  # sampled but not yet decoded
    num_generated: int = 0
    history: set[int] = field(default_factory=set)
    history_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    rng: np.random.Generator | None = None
    done: bool = False

    @property
    def prefilling(self) -> bool:
        return self.n_past < len(self.prompt_ids)

    def remember(self, token_ids: list[int]) -> None:
        new = [t for t in dict.fromkeys(token_ids) if t not in self.history]
        if new:
            self.history.update(new)
            self.history_ids = np.concatenate([self.history_ids, np.asarray(new, dtype=np.int64)])


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's CPU set)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


class LlamaCppEngine:
    """Streaming, batched generation on llama.cpp (GGUF base model, optional GGUF LoRA).

    The model (and the LoRA) is loaded once and served by one or more *lanes*: a lane is a llama
    context with its own scheduler thread and its own CPU threads. `stream` hands each request to
    the least busy lane and reads the request's own result queue. In a lane every running
    request holds a KV-cache sequence; each step decodes one token for every running sequence in
    one `llama_decode`, topped up with a chunk of at most `prefill_chunk` prompt tokens of a
    newly admitted request, so a long prompt never freezes running answers.

    Why lanes: on CPU, llama.cpp's small-batch kernels cost about as much for 2-4 tokens as for
    2-4 single-token steps (measured on AVX2 with Q8_0: decoding is compute-bound there), so
    batching on one context does not raise throughput, while two one-thread contexts decode on
    two cores at twice the rate of one. Lanes of one thread also never wait on each other:
    ggml's threads meet at a spinning barrier after every graph node, so threads of one context
    stall whenever any of them is preempted. A lane whose prompt is being read borrows the other
    lanes' threads while they are idle, so time to first token uses every core.

    `n_threads` is the total (default: every CPU this process may use) and `n_lanes` the number
    of contexts (default: one per thread, at most `n_seq_max`); `n_seq_max` sequences are split
    across the lanes. The LoRA adapter is set per context: a lane switches it when its running
    batch drains, and requests go to a lane already in the state they want when one is free.
    With ``lora_merged`` the model file already holds the adapter, and the runtime LoRA, negated,
    serves requests without it.

    Decoding follows the transformers engine (greedy at temperature 0, repetition penalty over
    prompt and reply, temperature + top-p otherwise) and the reply is detokenised with the same
    Hugging Face tokenizer, so both backends print the same text for the same tokens.
    """

    name = "llama.cpp"

    def __init__(
        self,
        model_path: str | os.PathLike,
        tokenizer: Any,
        *,
        lora_path: str | os.PathLike | None = None,
        lora_merged: bool = False,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_lanes: int | None = None,
        n_seq_max: int = 4,
        n_batch: int = 512,
        prefill_chunk: int = 128,
        min_decode_batch: int = 1,
        description: str = "",
        verbose: bool = False,
    ) -> None:
        import llama_cpp

        if not verbose:
            _quiet_llama_cpp_logs()
        self._llama = llama_cpp
        self.tokenizer = tokenizer
        self.has_adapter = lora_path is not None
        self.description = description or f"llama.cpp · {Path(model_path).name}"
        self._stop_ids = frozenset(end_of_turn_token_ids(tokenizer))
        self._n_batch = n_batch
        self._prefill_chunk = min(prefill_chunk, n_batch)
        self._min_decode_batch = min_decode_batch
        self._n_threads = max(1, n_threads or available_cpus())
        n_lanes = max(1, min(n_lanes or self._n_threads, n_seq_max, self._n_threads))
        self._lock = threading.Lock()
        self._lanes: list[_Lane] = []
        self._adapter = None
        self._closed = False

        llama_cpp.llama_backend_init()
        self._model = llama_cpp.llama_model_load_from_file(
            str(model_path).encode(), llama_cpp.llama_model_default_params()
        )
        if not self._model:
            raise SupportLMError(f"llama.cpp could not load {model_path}; is it a GGUF model?")
        self._n_vocab = int(
            llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self._model))
        )
        if lora_path is not None:
            self._adapter = llama_cpp.llama_adapter_lora_init(self._model, str(lora_path).encode())
            if not self._adapter:
                self.close()
                raise SupportLMError(f"llama.cpp could not load the LoRA adapter {lora_path}.")
        # A merged model is the adapted model: the runtime LoRA, negated, switches it off.
        self._lora_scales = {True: None, False: -1.0} if lora_merged else {True: 1.0, False: None}
        self._lora_merged = lora_merged
        try:
            for index in range(n_lanes):
                self._lanes.append(
                    _Lane(
                        self,
                        index,
                        n_ctx=n_ctx,
                        # lanes split the sequences and the threads as evenly as they go
                        n_seq=len(range(index, n_seq_max, n_lanes)),
                        threads=len(range(index, self._n_threads, n_lanes)),
                    )
                )
        except BaseException:
            self.close()
            raise
        self.context_length = self._lanes[0].context_length
        lanes, threads = len(self._lanes), self._n_threads
        self.description += (
            f" · {lanes} lane{'s' * (lanes > 1)} on {threads} thread{'s' * (threads > 1)}"
        )

    @property
    def adapter_merged(self) -> bool:
        """Whether the model file holds the adapter (served off by negating the runtime LoRA)."""
        return self._lora_merged

    @property
    def lanes(self) -> int:
        """How many llama contexts decode in parallel."""
        return len(self._lanes)

    @property
    def threads(self) -> int:
        """CPU threads across all lanes."""
        return self._n_threads

    @classmethod
    def from_gguf(
        cls,
        gguf_path: str | os.PathLike,
        tokenizer: Any,
        *,
        adapter_dir: str | os.PathLike | None = None,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_seq_max: int = 4,
        weights: str = "auto",
        **kwargs: Any,
    ) -> LlamaCppEngine:
        """Serve `gguf_path` with the PEFT adapter in `adapter_dir` (converted once, cached).

        `weights` picks what llama.cpp multiplies with:

        * ``original``: the file as it is, the adapter as a runtime LoRA;
        * ``q8_0``: a Q8_0 re-encoding of the file, the adapter as a runtime LoRA. De-quantised
          4-bit values fit Q8_0's 8-bit grid almost exactly, and llama.cpp's Q8_0 dot product
          is cheaper than Q4_1's, so it decodes faster on CPU;
        * ``merged``: a Q8_0 re-encoding with the adapter merged in; requests with
          ``use_adapter=False`` apply the runtime LoRA with scale -1. A runtime LoRA adds four
          graph nodes to each adapted matmul (~840 for an all-linear LoRA on a 30-layer model);
          on a 2-core CPU they cost 18-40 % of the decode speed, far more than their ~5 % of
          the FLOPs. Merged, the adapted model (the one the app serves) runs at the speed of a
          plain model and the base pays instead;
        * ``auto``: ``merged`` for a base stored below 8 bits, else ``original`` (re-encoding a
          16/32-bit base as Q8_0 would lose precision).

        Every choice keeps one model in memory and serves both adapter states.
        """
        if not is_available():
            raise SupportLMError(
                'The llama.cpp backend needs llama-cpp-python: CMAKE_ARGS="-DGGML_NATIVE=ON" '
                'pip install "llama-cpp-python==0.3.36".'
            )
        if weights not in WEIGHTS_CHOICES:
            raise SupportLMError(
                f"weights must be one of {', '.join(WEIGHTS_CHOICES)}, got {weights!r}."
            )
        gguf_path = Path(gguf_path)
        if weights == "auto":
            weights = "merged" if _quantised_below_8_bits(gguf_path) else "original"
        # The adapter's layout (names, shapes, RoPE permutation) is the original file's.
        lora_path = cached_lora_gguf(adapter_dir, gguf_path) if adapter_dir else None
        merged = weights == "merged" and adapter_dir is not None
        if weights == "original":
            served = gguf_path
        else:
            served = cached_reencoded_gguf(
                gguf_path, "q8_0", adapter_dir=adapter_dir if merged else None
            )
        description = f"llama.cpp · {gguf_path.name}"
        if served != gguf_path:
            description += " as Q8_0"
            kwargs.setdefault("min_decode_batch", 4)
        if adapter_dir:
            description += f" + LoRA {Path(adapter_dir).name}" + (" (merged)" if merged else "")
        return cls(
            served,
            tokenizer,
            lora_path=lora_path,
            lora_merged=merged,
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_seq_max=n_seq_max,
            description=description,
            **kwargs,
        )

    # -- caller side -----------------------------------------------------------------------

    def stream(
        self,
        prompt_ids: list[int],
        settings: GenerationSettings,
        *,
        stop_event: threading.Event | None = None,
        use_adapter: bool = True,
    ) -> Iterator[StreamEvent]:
        if self._closed:
            raise SupportLMError("The llama.cpp engine has been closed.")
        start = time.perf_counter()
        request = _Request(
            prompt_ids=list(prompt_ids),
            settings=settings,
            use_adapter=use_adapter and self.has_adapter,
            cancel=stop_event or threading.Event(),
        )
        self._dispatch(request)
        token_ids: list[int] = []
        text = ""
        first_token_at: float | None = None

        def event(finished: bool = False, reason: str | None = None) -> StreamEvent:
            return StreamEvent(
                text=text,
                num_tokens=len(token_ids),
                time_to_first_token=None if first_token_at is None else first_token_at - start,
                elapsed=time.perf_counter() - start,
                finished=finished,
                finish_reason=reason,
            )

        finished: _Finished | None = None
        try:
            while finished is None:
                item = request.results.get()
                # Take every token that is already there, then detokenise once.
                items = [item]
                while not isinstance(items[-1], (_Finished, BaseException)):
                    try:
                        items.append(request.results.get_nowait())
                    except queue.Empty:
                        break
                for item in items:
                    if isinstance(item, BaseException):
                        raise item
                    if isinstance(item, _Finished):
                        finished = item
                    else:
                        token_ids.append(item)
                if first_token_at is None and token_ids:
                    first_token_at = time.perf_counter()
                decoded = self.tokenizer.decode(token_ids, skip_special_tokens=True)
                # Hold back a trailing partial UTF-8 character until its last byte arrives.
                if decoded != text and (finished or not decoded.endswith("\ufffd")):
                    text = decoded
                    if finished is None:
                        yield event()
        finally:
            if finished is None:  # the consumer went away or an error came back: free the slot
                request.cancel.set()
        yield event(finished=True, reason=finished.reason)

    def generate(
        self, prompt_ids: list[int], settings: GenerationSettings, *, use_adapter: bool = True
    ) -> StreamEvent:
        # the last event holds the whole reply
        return collections.deque(self.stream(prompt_ids, settings, use_adapter=use_adapter), 1)[0]

    def close(self) -> None:
        """Stop the schedulers and free the llama.cpp contexts, the adapter and the model."""
        if self._closed:
            return
        self._closed = True
        for lane in self._lanes:
            lane.close()
        if self._adapter:
            self._llama.llama_adapter_lora_free(self._adapter)
        self._llama.llama_model_free(self._model)

    def __enter__(self) -> LlamaCppEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- lanes -----------------------------------------------------------------------------

    def _dispatch(self, request: _Request) -> None:
        """Queue `request` on the lane that can start it soonest."""

        def wait_rank(lane: _Lane) -> tuple[bool, int, int]:
            # A full lane, or a busy one in the other adapter state, makes the request wait.
            switch = lane.load > 0 and lane.adapter_on != request.use_adapter
            return (lane.load >= lane.capacity or switch, lane.load, lane.index)

        with self._lock:
            lane = min(self._lanes, key=wait_rank)
            lane.load += 1
        lane.inbox.put(request)

    def _released(self, lane: _Lane) -> None:
        with self._lock:
            lane.load -= 1

    def _others_idle(self, lane: _Lane) -> bool:
        return all(other.load == 0 for other in self._lanes if other is not lane)


class _Lane:
    """One llama context, its scheduler thread and its CPU threads (see `LlamaCppEngine`)."""

    def __init__(
        self, engine: LlamaCppEngine, index: int, *, n_ctx: int, n_seq: int, threads: int
    ) -> None:
        llama_cpp = engine._llama
        self._engine = engine
        self._llama = llama_cpp
        self.index = index
        self.threads = threads
        self.capacity = n_seq
        #: Requests queued on or running in this lane; changed under the engine's lock.
        self.load = 0
        self._thread: threading.Thread | None = None
        params = llama_cpp.llama_context_default_params()
        # Separate KV streams per sequence: answers share no prefix worth a unified cache, and
        # llama.cpp then sizes each sequence's window at n_ctx.
        params.n_ctx = n_ctx * n_seq
        params.n_seq_max = n_seq
        params.kv_unified = False
        params.n_batch = params.n_ubatch = engine._n_batch
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(engine._model, params)
        if not self._ctx:
            raise SupportLMError(f"llama.cpp could not create a context of {n_ctx} tokens.")
        self._batch_threads = threads
        self.context_length = int(llama_cpp.llama_n_ctx_seq(self._ctx))
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(engine._n_batch, 0, 1)
        self.adapter_on = engine._lora_merged  # the state with no runtime LoRA set
        self.inbox: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._waiting: collections.deque[_Request] = collections.deque()
        self._running: list[_Request] = []
        self._free_seq_ids = list(range(int(llama_cpp.llama_n_seq_max(self._ctx))))
        self._thread = threading.Thread(
            target=self._serve, name=f"llama.cpp-lane-{index}", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self.inbox.put(None)
            self._thread.join()
        self._llama.llama_batch_free(self._batch)
        self._llama.llama_free(self._ctx)

    def _serve(self) -> None:
        while True:
            idle = not self._running and not self._waiting
            try:
                item = self.inbox.get() if idle else self.inbox.get_nowait()
            except queue.Empty:
                item = False
            while item is not False:
                if item is None:
                    self._fail_all(SupportLMError("The llama.cpp engine was closed."))
                    return
                self._waiting.append(item)
                try:
                    item = self.inbox.get_nowait()
                except queue.Empty:
                    item = False
            try:
                self._drop_cancelled()
                self._admit()
                if self._running:
                    self._step()
            except Exception as error:  # a bug or a llama.cpp failure: fail this batch only
                logger.exception("llama.cpp scheduler step failed")
                for request in list(self._running):
                    self._finish(request, error)

    def _finish(self, request: _Request, outcome: str | BaseException) -> None:
        if request.done:
            return
        request.done = True
        if request.seq_id >= 0:
            self._llama.llama_memory_seq_rm(self._memory, request.seq_id, -1, -1)
            self._free_seq_ids.append(request.seq_id)
            request.seq_id = -1
        if request in self._running:
            self._running.remove(request)
        self._engine._released(self)
        request.results.put(_Finished(outcome) if isinstance(outcome, str) else outcome)

    def _fail_all(self, error: BaseException) -> None:
        for request in [*self._running, *self._waiting]:
            self._finish(request, error)
        self._waiting.clear()

    def _drop_cancelled(self) -> None:
        for request in [r for r in self._running if r.cancel.is_set()]:
            self._finish(request, "cancelled")
        for request in [r for r in self._waiting if r.cancel.is_set()]:
            self._waiting.remove(request)
            self._finish(request, "cancelled")

    def _check(self, request: _Request) -> None:
        ids = request.prompt_ids
        n_vocab = self._engine._n_vocab
        if not ids:
            raise SupportLMError("The prompt is empty.")
        if min(ids) < 0 or max(ids) >= n_vocab:
            raise SupportLMError(
                f"The prompt has token ids outside this model's vocabulary of {n_vocab}; "
                "was it built with another tokenizer?"
            )
        if len(ids) >= self.context_length:
            raise SupportLMError(
                f"The prompt has {len(ids)} tokens; this engine's context holds "
                f"{self.context_length}."
            )

    def _admit(self) -> None:
        while self._waiting and self._free_seq_ids:
            request = self._waiting[0]
            if self._running and request.use_adapter != self.adapter_on:
                break  # first come, first served: wait for the batch to drain, then switch
            self._waiting.popleft()
            try:
                self._check(request)
            except SupportLMError as error:
                self._finish(request, error)
                continue
            if request.use_adapter != self.adapter_on:
                self._set_adapter(request.use_adapter)
            request.seq_id = self._free_seq_ids.pop(0)
            request.rng = np.random.default_rng(request.settings.seed)
            request.remember(request.prompt_ids)
            self._running.append(request)

    def _set_adapter(self, on: bool) -> None:
        llama_cpp = self._llama
        scale = self._engine._lora_scales[on]
        if scale is not None:
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._engine._adapter)
            scales = (ctypes.c_float * 1)(scale)
            status = llama_cpp.llama_set_adapters_lora(self._ctx, adapters, 1, scales)
        else:
            status = llama_cpp.llama_set_adapters_lora(self._ctx, None, 0, None)
        if status != 0:
            raise RuntimeError(f"llama_set_adapters_lora failed with status {status}")
        self.adapter_on = on

    def _use_batch_threads(self, threads: int) -> None:
        # llama.cpp runs single-token steps on n_threads and larger batches on n_threads_batch.
        if threads != self._batch_threads:
            self._llama.llama_set_n_threads(self._ctx, self.threads, threads)
            self._batch_threads = threads

    def _step(self) -> None:
        decoding = [r for r in self._running if not r.prefilling]
        min_batch = self._engine._min_decode_batch
        if len(decoding) == len(self._running) and 1 < len(decoding) < min_batch:
            # llama.cpp multiplies a batch of 2-3 tokens with llamafile's tiled kernel, which on
            # AVX2 costs 3x a single token's mat-vec for Q8_0 weights (measured): one token per
            # call is faster until the batch is large enough to pay off.
            for request in decoding:
                self._decode([request], prefill=False)
        else:
            self._decode(decoding, prefill=True)

    def _decode(self, decoding: list[_Request], *, prefill: bool) -> None:
        """One `llama_decode`: a token for each of `decoding`, then prompt chunks if `prefill`."""
        engine = self._engine
        batch = self._batch
        batch.n_tokens = 0
        outputs: list[tuple[_Request, int]] = []

        def add(request: _Request, token: int, want_logits: bool) -> None:
            i = batch.n_tokens
            batch.token[i] = token
            batch.pos[i] = request.n_past
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = request.seq_id
            batch.logits[i] = want_logits
            batch.n_tokens = i + 1
            request.n_past += 1
            if want_logits:
                outputs.append((request, i))

        for request in decoding:
            add(request, request.pending_token, True)
        # Reading a prompt on every core while the other lanes are idle halves the time to the
        # first token. A lane that gets a request meanwhile shares the cores until this step
        # ends, so borrowed steps read at most _BORROWED_CHUNK prompt tokens (~0.4 s here).
        borrow = engine._n_threads > self.threads and engine._others_idle(self)
        # While answers are streaming, prompts enter in small chunks so those answers keep
        # flowing; with nothing streaming, a prompt takes the whole batch.
        budget = engine._n_batch - len(decoding) if prefill else 0
        if decoding:
            budget = min(budget, engine._prefill_chunk)
        elif borrow:
            budget = min(budget, _BORROWED_CHUNK)
        for request in self._running:
            if budget <= 0:
                break
            if request.prefilling:
                chunk = request.prompt_ids[request.n_past : request.n_past + budget]
                for token in chunk:
                    # logits only for the prompt's last token: the first reply token
                    add(request, token, request.n_past == len(request.prompt_ids) - 1)
                budget -= len(chunk)
        reading_prompt = batch.n_tokens > len(decoding)
        self._use_batch_threads(engine._n_threads if borrow and reading_prompt else self.threads)

        status = self._llama.llama_decode(self._ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status}")

        for request, index in outputs:
            try:
                token = self._sample(request, index)
            except Exception as error:
                self._finish(request, error)
                continue
            request.num_generated += 1
            request.results.put(token)
            if token in engine._stop_ids:
                self._finish(request, "stop")
            elif (
                request.num_generated >= request.settings.max_new_tokens
                or request.n_past >= self.context_length
            ):
                self._finish(request, "length")
            else:
                request.pending_token = token
                request.remember([token])

    def _sample(self, request: _Request, index: int) -> int:
        settings = request.settings
        n_vocab = self._engine._n_vocab
        row = np.ctypeslib.as_array(
            self._llama.llama_get_logits_ith(self._ctx, index), shape=(n_vocab,)
        )
        if settings.repetition_penalty == 1.0 and not settings.do_sample:
            return int(row.argmax())
        logits = row.copy()  # the row is llama.cpp's buffer, overwritten by the next decode
        apply_repetition_penalty(logits, request.history_ids, settings.repetition_penalty)
        if not settings.do_sample:
            return int(logits.argmax())
        assert request.rng is not None
        return sample_top_p(logits, settings.temperature, settings.top_p, request.rng)
