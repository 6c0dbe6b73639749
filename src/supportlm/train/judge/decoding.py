"""Decoding evaluation answers: on the app's fastest engine, many prompts at once.

`open_decoder` picks the engine by the app's own rule (`supportlm.engines.registry`) and builds
it the way the app does: for a GGUF base model on a CPU llama.cpp (the adapter converted and
applied exactly as served) or, without it, CTranslate2; else the transformers engine on the
model already loaded for perplexity. `Decoder.decode` keeps an engine's every slot busy: with
llama.cpp that is one request per lane (`open_decoder`: the same answers on every run); the
transformers and CTranslate2 engines serve one request at a time, so there it is a plain loop.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from supportlm.engines import available_cpus, registry
from supportlm.engines.base import Engine, GenerationSettings, StreamEvent

logger = logging.getLogger(__name__)

ENGINE_CHOICES = registry.local_choices()


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
        conversations: list[list[dict[str, str]]],
        settings: GenerationSettings,
        *,
        use_adapter: bool,
        desc: str = "Generating",
    ) -> list[StreamEvent]:
        """The final event of each conversation's answer (chat messages up to the question),
        in the order of `conversations`."""
        requests = [
            self.engine.request(messages, settings, use_adapter=use_adapter)
            for messages in conversations
        ]
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
    choice: str, loaded: Any, *, concurrency: int | None = None, context_length: int = 2048
) -> Decoder:
    """The engine `choice` names for `loaded`, chosen by the app's rule (`registry.choose`).

    `concurrency` defaults to one request per CPU: llama.cpp then runs one sequence per lane, so
    an answer's arithmetic never depends on which other answers share its batch, and the report
    is the same on every run. Eight at once (two lanes of four) changed 4 of 32 greedy answers
    between two runs, and was slower on 2 cores: 18.0 s against 13.8 s for those 32 answers
    (docs/benchmarks.md, "Deterministic evaluation").
    """
    concurrency = concurrency or available_cpus()
    name, reason = registry.choose(choice, loaded.source.spec, loaded.device, "--engine")
    options = registry.EngineOptions(
        model=loaded.source.spec,
        source=loaded.source,
        adapter=loaded.adapter,
        context_length=context_length,
        concurrency=concurrency,
        loaded=loaded,
    )
    engine = registry.build(name, options)
    logger.info("Decoding with %s (%s), %d at once.", engine.description, reason, concurrency)
    # The transformers engine decodes on `loaded` itself, which its caller still uses.
    return Decoder(engine, reason, owns_engine=name != "transformers")
