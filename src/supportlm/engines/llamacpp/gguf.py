"""PEFT LoRA -> llama.cpp GGUF: the adapter export, the merged/re-encoded base, and their cache.

`export_lora_to_gguf` writes a PEFT LoRA folder as a llama.cpp LoRA GGUF with the `gguf` package
(the same layout as llama.cpp's ``convert_lora_to_gguf.py``, without needing its scripts at run
time); `write_merged_gguf` writes a base GGUF with a LoRA merged in, re-encoded as Q8_0. Both are
cached in the supportlm cache (`supportlm.cache`), keyed by the base file and the adapter's
content, and written atomically.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from supportlm.cache import atomic_target, cached, file_digest, file_stamp, short_hash
from supportlm.engines.llamacpp import quiet_llama_cpp_logs
from supportlm.errors import SupportLMError

logger = logging.getLogger(__name__)

#: Architectures whose GGUF converter permutes the rows of q_proj/k_proj for llama.cpp's
#: interleaved ("normal") RoPE; a LoRA's B matrices for q/k must be permuted the same way.
ROPE_PERMUTED_ARCHITECTURES = frozenset({"llama"})


#: Bump when the exported file changes, so cached exports are rebuilt.
_EXPORT_FORMAT_VERSION = 1

_PEFT_PREFIX = "base_model.model."


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


def _write_gguf(writer_factory, out_path: Path, fill) -> Path:
    with atomic_target(out_path) as partial:  # readers never see a half-written file
        writer = writer_factory(partial)
        fill(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
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

    return _write_gguf(lambda path: gguf.GGUFWriter(path, lora.arch), Path(out_path), fill)


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

    return _write_gguf(lambda path: gguf.GGUFWriter(path, arch), Path(out_path), fill)


def _cache_key(base_gguf: Path, adapter_dir: Path | None, *extra: str) -> str:
    """Names the base file (path, size, mtime) and hashes the adapter's weights and config."""
    parts = [file_stamp(base_gguf)]
    if adapter_dir is not None:
        weights = adapter_dir / "adapter_model.safetensors"
        config = adapter_dir / "adapter_config.json"
        for required in (weights, config):
            if not required.is_file():
                raise SupportLMError(f"{adapter_dir} has no {required.name}; is it a PEFT adapter?")
        parts.append(file_digest(weights, config))
    return short_hash(*parts, *extra, _EXPORT_FORMAT_VERSION)


def _slot(*parts: object) -> str:
    """A short name for what a cache file is of (paths, type), whatever its contents' key."""
    return short_hash(*parts, length=8)


def cached_lora_gguf(adapter_dir: str | os.PathLike, base_gguf: str | os.PathLike) -> Path:
    """The GGUF export of `adapter_dir` for `base_gguf`, converted once into the supportlm cache.

    The key hashes the adapter's weights and config and names the base file, so a retrained
    adapter (same folder, new weights) is exported again, replacing the old export.
    """
    adapter_dir, base_gguf = Path(adapter_dir), Path(base_gguf).resolve()
    key = _cache_key(base_gguf, adapter_dir)
    slot = _slot(adapter_dir.resolve(), base_gguf)
    return cached(
        "lora-gguf",
        f"{adapter_dir.resolve().name}-{slot}",
        key,
        lambda target: export_lora_to_gguf(adapter_dir, target, base_gguf=base_gguf),
        suffix=".gguf",
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
    return cached(
        "base-gguf",
        f"{base_gguf.stem}{label}-{tensor_type}-{slot}",
        key,
        lambda target: write_merged_gguf(
            base_gguf, target, adapter_dir=adapter, tensor_type=tensor_type
        ),
        suffix=".gguf",
    )


#: llama_ftype values of GGUF files whose weights are all 8 bits or wider.
_WIDE_FILE_TYPES = frozenset({0, 1, 7, 32})  # ALL_F32, MOSTLY_F16, MOSTLY_Q8_0, MOSTLY_BF16


def quantised_below_8_bits(gguf_path: Path) -> bool:
    """Whether `gguf_path`'s weights are stored in fewer than 8 bits (Q4_1, Q4_K, ...).

    Read from the file's ``general.file_type`` through llama.cpp (a vocab-only load, ~0.1 s):
    `gguf.GGUFReader` parses every metadata field, the 49k-entry vocabulary included, in ~2.5 s,
    a quarter of the app's start-up. Files without the key are scanned tensor by tensor.
    """
    import llama_cpp

    quiet_llama_cpp_logs()
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
