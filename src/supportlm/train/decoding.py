"""Decoding evaluation answers: on the app's fastest engine, many prompts at once.

`open_decoder` picks the engine the way the app serves on a CPU: llama.cpp when it is installed
and the base model is a GGUF file (the adapter converted and applied exactly as the app applies
it, `LlamaCppEngine.from_gguf` with the same weights choice), else the transformers engine on the
model already loaded for perplexity. `Decoder.decode` keeps an engine's every slot busy: with
llama.cpp that is `max_concurrency` requests in flight, decoded together by its lanes; the
transformers engine serves one request at a time, so there it is a plain loop.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from supportlm.engines.base import Engine, GenerationSettings, StreamEvent
from supportlm.errors import SupportLMError

logger = logging.getLogger(__name__)

ENGINE_CHOICES = ("auto", "llama.cpp", "transformers")


@dataclass
class Decoder:
    """An engine and why it was chosen; `decode` answers a list of prompts in order."""

    engine: Engine
    reason: str
    owns_engine: bool = True

    @property
    def name(self) -> str:
        return self.engine.name

    @property
    def concurrency(self) -> int:
        return max(1, int(self.engine.max_concurrency))

    def decode(
        self,
        prompts: list[list[int]],
        settings: GenerationSettings,
        *,
        use_adapter: bool,
        desc: str = "Generating",
    ) -> list[StreamEvent]:
        """The final event of each prompt's answer, in the order of `prompts`."""
        requests = [self.engine.request(p, settings, use_adapter=use_adapter) for p in prompts]
        with tqdm(total=len(requests), desc=desc, unit="answer") as progress:

            def generate(request) -> StreamEvent:
                event = self.engine.generate(request)
                progress.update()
                return event

            if self.concurrency == 1:
                return [generate(request) for request in requests]
            with ThreadPoolExecutor(self.concurrency, thread_name_prefix="decode") as pool:
                return list(pool.map(generate, requests))

    def close(self) -> None:
        if self.owns_engine:
            self.engine.close()


def open_decoder(
    choice: str, loaded: Any, *, concurrency: int = 8, context_length: int = 2048
) -> Decoder:
    """The engine `choice` names (``auto``: llama.cpp where it can serve `loaded`'s model)."""
    if choice not in ENGINE_CHOICES:
        raise SupportLMError(
            f"Unknown engine {choice!r}; choose one of {', '.join(ENGINE_CHOICES)}."
        )
    why_not = _llamacpp_unusable(loaded)
    if choice == "llama.cpp" and why_not:
        raise SupportLMError(f"The llama.cpp engine cannot decode here: {why_not}.")
    if choice == "transformers" or why_not:
        from supportlm.engines.transformers import TransformersEngine

        reason = "as asked" if choice == "transformers" else why_not
        return Decoder(TransformersEngine.from_loaded(loaded), reason, owns_engine=False)
    from supportlm.engines.llamacpp.engine import LlamaCppEngine

    engine = LlamaCppEngine.from_gguf(
        loaded.source.gguf_path,
        loaded.tokenizer,
        adapter_dir=loaded.adapter,
        n_seq_max=concurrency,
        n_ctx=context_length,
        weights="auto",
    )
    reason = "the app's CPU engine, the adapter applied as served"
    logger.info("Decoding with %s (%s), %d at once.", engine.description, reason, concurrency)
    return Decoder(engine, reason)


def _llamacpp_unusable(loaded: Any) -> str | None:
    """Why llama.cpp cannot decode for `loaded` (None when it can)."""
    from supportlm.engines.llamacpp import is_available

    if not is_available():
        return "llama-cpp-python is not installed"
    if loaded.source.gguf_path is None:
        return f"{loaded.source.display_name} is not a GGUF model"
    if loaded.device != "cpu":
        return f"the model runs on {loaded.device}, where transformers is the app's engine"
    return None
