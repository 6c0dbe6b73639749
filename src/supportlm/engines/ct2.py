"""The CTranslate2 engine: decoding from a binary wheel, the fast CPU path without a compiler.

llama-cpp-python compiles on install (minutes); CTranslate2 ships wheels. Where llama.cpp is not
installed, this engine serves GGUF (and embedded) models on a CPU. The adapter is merged into a
float32 copy of the base with PEFT and converted once, into the supportlm cache keyed by the base
and the adapter's content (a retrained adapter is converted again); the base alone, for requests
without the adapter (evaluation's "base", the compare tab), is converted when first asked.
It computes in float32 (`COMPUTE_TYPE`): on the shipped adapter that decodes 2.5x transformers
``generate`` on 2 cores and keeps PEFT's greedy answers on 20 of 20 held-out questions, where
int8 decoded faster but kept 1 of 20 (``bench/generation.py``, ``bench/agreement.py``,
docs/benchmarks.md). One request decodes at a time (``max_concurrency`` 1): one worker with
every core measured faster for one client than a worker per core; the serving layer queues.
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from supportlm.cache import cached, file_stamp, short_hash
from supportlm.engines import available_cpus
from supportlm.engines.base import (
    Engine,
    EngineError,
    EventClock,
    GenerationRequest,
    ReplyText,
    StreamEvent,
)
from supportlm.modeling import load_model, prepare_model_dir
from supportlm.prompts import end_of_turn_token_ids
from supportlm.run_folder import adapter_ref, compute_adapter_version

if TYPE_CHECKING:
    from supportlm.engines.registry import EngineOptions

logger = logging.getLogger(__name__)

#: Bump when the conversion changes, so cached copies are written again.
_CONVERSION_FORMAT = 2
#: How the weights are computed: float32 keeps PEFT's greedy answers (int8 changed the first 32
#: tokens of 19 of 20 held-out answers of the shipped adapter: `bench/agreement.py`).
COMPUTE_TYPE = "float32"


def is_available() -> bool:
    """Whether the ``ctranslate2`` package is installed (found without importing it)."""
    return importlib.util.find_spec("ctranslate2") is not None


class CTranslate2Engine(Engine):
    """Greedy or sampled decoding with `ctranslate2.Generator.generate_tokens`, streamed."""

    name = "ctranslate2"
    max_concurrency = 1

    def __init__(self, options: EngineOptions) -> None:
        import ctranslate2

        super().__init__()
        self.options = options
        self.tokenizer = options.tokenizer()
        self.context_length = options.context_length
        self.adapter = adapter_ref(options.adapter) if options.adapter else None
        self.threads = available_cpus()
        self.description = (
            f"CTranslate2 {ctranslate2.__version__} {COMPUTE_TYPE} · {options.source.display_name}"
            + (f" + {Path(options.adapter).name}" if options.adapter else "")
            + f" · {self.threads} threads"
        )
        end_ids = end_of_turn_token_ids(self.tokenizer)
        self._end_ids = frozenset(end_ids)
        self._end_tokens = self.tokenizer.convert_ids_to_tokens(end_ids)
        self._generators: dict[bool, Any] = {}
        self._lock = threading.Lock()
        self._generator(self.adapter is not None)  # convert and load what is served, now

    def _generator(self, with_adapter: bool) -> Any:
        """The loaded generator of the merged (or the bare base) model, converted once."""
        import ctranslate2

        if with_adapter not in self._generators:
            folder = converted_model(self.options, with_adapter=with_adapter)
            self._generators[with_adapter] = ctranslate2.Generator(
                str(folder), device="cpu", compute_type=COMPUTE_TYPE, intra_threads=self.threads
            )
        return self._generators[with_adapter]

    def _options(self, request: GenerationRequest) -> dict[str, Any]:
        settings = request.settings
        options: dict[str, Any] = {
            "max_length": settings.max_new_tokens,
            "repetition_penalty": settings.repetition_penalty,
            "end_token": self._end_tokens,
        }
        if settings.do_sample:  # top-k 0: the whole distribution, cut by top-p
            options.update(
                sampling_topk=0,
                sampling_topp=settings.top_p,
                sampling_temperature=settings.temperature,
            )
        else:
            options.update(sampling_topk=1)
        return options

    def _stream(
        self, request: GenerationRequest, stop_event: threading.Event
    ) -> Iterator[StreamEvent]:
        import ctranslate2

        clock = EventClock(request.request_id, len(request.prompt_ids))
        prompt = self.tokenizer.convert_ids_to_tokens(request.prompt_ids)
        ids: list[int] = []
        reply, reason = ReplyText(self.tokenizer), "stop"
        with self._lock:
            generator = self._generator(request.adapter is not None)
            if request.settings.seed is not None:
                ctranslate2.set_random_seed(request.settings.seed)
            steps = generator.generate_tokens(prompt, **self._options(request))
            try:
                for step in steps:
                    clock.first_token()
                    if stop_event.is_set():
                        reason = "cancelled"
                        break
                    if step.token_id in self._end_ids:
                        break
                    ids.append(step.token_id)
                    if reply.update(ids):
                        yield clock.event(reply.text, len(ids))
                    if len(ids) >= request.settings.max_new_tokens:
                        reason = "length"
                        break
            except RuntimeError as error:  # CTranslate2 reports its failures as RuntimeError
                raise EngineError(f"CTranslate2 failed to generate: {error}") from error
            finally:
                steps.close()
        reply.update(ids, finished=True)
        yield clock.event(reply.text, len(ids), reason)


def converted_model(options: EngineOptions, *, with_adapter: bool) -> Path:
    """The CTranslate2 folder of `options`' model (its adapter merged), float32, cached; the
    generator quantizes on load when `COMPUTE_TYPE` asks for it."""
    base_dir = Path(prepare_model_dir(options.source))
    adapter = options.adapter if with_adapter else None
    base_key = file_stamp(base_dir / "config.json") if base_dir.is_dir() else str(base_dir)
    adapter_key = compute_adapter_version(Path(adapter)) if adapter else "base"
    key = short_hash(base_key, adapter_key, _CONVERSION_FORMAT, length=12)
    label = Path(adapter).resolve().name if adapter else "base"
    stem = f"{base_dir.name}-{label}-{short_hash(base_dir, adapter, length=8)}"
    return cached("ct2", stem, key, lambda target: _convert(options, adapter, target), "")


def _convert(options: EngineOptions, adapter: str | None, target: Path) -> None:
    """Merge `adapter` into a float32 copy of the base with PEFT, then convert it."""
    import ctranslate2

    logger.info("Converting %s%s to CTranslate2 (once).", options.model,
                f" + {adapter}" if adapter else "")  # fmt: skip
    loaded = load_model(
        options.model, quantization="none", dtype="float32", device="cpu", adapter=adapter
    )
    model = loaded.model.merge_and_unload() if adapter else loaded.model
    with tempfile.TemporaryDirectory(prefix="supportlm-merged-") as merged:
        model.save_pretrained(merged)
        loaded.tokenizer.save_pretrained(merged)
        try:
            converter = ctranslate2.converters.TransformersConverter(merged)
            converter.convert(str(target))
        except (ValueError, NotImplementedError) as error:
            raise EngineError(
                f"CTranslate2 cannot convert {options.model}: {error} "
                "(SUPPORTLM_BACKEND=transformers serves it)."
            ) from error


def build(options: EngineOptions) -> CTranslate2Engine:
    """The registry's builder: the model converted (once) and loaded on every core."""
    return CTranslate2Engine(options)
