"""`LlamaCppEngine`: the `Engine` protocol on llama.cpp's low-level API, served by lanes."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from supportlm.engines import available_cpus
from supportlm.engines.base import (
    AdapterRef,
    Engine,
    EventClock,
    GenerationRequest,
    ReplyText,
    StreamEvent,
)
from supportlm.engines.llamacpp import WEIGHTS_CHOICES, is_available, quiet_llama_cpp_logs
from supportlm.engines.llamacpp.gguf import (
    cached_lora_gguf,
    cached_reencoded_gguf,
    quantised_below_8_bits,
)
from supportlm.engines.llamacpp.lanes import Finished, LaneModel, LanePool, LaneRequest
from supportlm.errors import SupportLMError
from supportlm.prompts import end_of_turn_token_ids
from supportlm.run_folder import adapter_ref

if TYPE_CHECKING:
    from supportlm.engines.registry import EngineOptions


class LlamaCppEngine(Engine):
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
        adapter: AdapterRef | None = None,
        description: str = "",
        verbose: bool = False,
    ) -> None:
        import llama_cpp

        super().__init__()
        if not verbose:
            quiet_llama_cpp_logs()
        self._llama = llama_cpp
        self.tokenizer = tokenizer
        self.adapter = adapter if lora_path is not None else None
        if lora_path is not None and self.adapter is None:
            self.adapter = AdapterRef(name=Path(lora_path).stem, version="unversioned")
        self.description = description or f"llama.cpp · {Path(model_path).name}"
        n_threads = max(1, n_threads or available_cpus())
        self._adapter = None
        self._model = None
        self._pool: LanePool | None = None
        self._closed = False

        llama_cpp.llama_backend_init()
        self._model = llama_cpp.llama_model_load_from_file(
            str(model_path).encode(), llama_cpp.llama_model_default_params()
        )
        if not self._model:
            raise SupportLMError(f"llama.cpp could not load {model_path}; is it a GGUF model?")
        if lora_path is not None:
            self._adapter = llama_cpp.llama_adapter_lora_init(self._model, str(lora_path).encode())
            if not self._adapter:
                self.close()
                raise SupportLMError(f"llama.cpp could not load the LoRA adapter {lora_path}.")
        shared = LaneModel(
            llama=llama_cpp,
            model=self._model,
            n_vocab=int(
                llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self._model))
            ),
            stop_ids=frozenset(end_of_turn_token_ids(tokenizer)),
            lora=self._adapter,
            # A merged model is the adapted model: the runtime LoRA, negated, switches it off.
            lora_scales={True: None, False: -1.0} if lora_merged else {True: 1.0, False: None},
            lora_merged=lora_merged,
            n_batch=n_batch,
            prefill_chunk=min(prefill_chunk, n_batch),
            min_decode_batch=min_decode_batch,
            n_threads=n_threads,
        )
        n_lanes = max(1, min(n_lanes or n_threads, n_seq_max, n_threads))
        try:
            self._pool = LanePool(shared, n_lanes=n_lanes, n_ctx=n_ctx, n_seq_max=n_seq_max)
        except BaseException:
            self.close()
            raise
        self._shared = shared
        self.max_concurrency = n_seq_max
        self.context_length = self._pool.lanes[0].context_length
        lanes, threads = len(self._pool.lanes), n_threads
        self.description += (
            f" · {lanes} lane{'s' * (lanes > 1)} on {threads} thread{'s' * (threads > 1)}"
        )

    @property
    def adapter_merged(self) -> bool:
        """Whether the model file holds the adapter (served off by negating the runtime LoRA)."""
        return self._shared.lora_merged

    @property
    def lanes(self) -> int:
        """How many llama contexts decode in parallel."""
        return len(self._pool.lanes) if self._pool else 0

    @property
    def lane_layout(self) -> list[tuple[int, int]]:
        """(sequences, threads) of each lane."""
        return [(lane.capacity, lane.threads) for lane in self._pool.lanes] if self._pool else []

    @property
    def threads(self) -> int:
        """CPU threads across all lanes."""
        return self._shared.n_threads

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
                "The llama.cpp backend needs llama-cpp-python: see the README for the command "
                "(it compiles llama.cpp, 4 to 12 minutes on 2 cores)."
            )
        if weights not in WEIGHTS_CHOICES:
            raise SupportLMError(
                f"weights must be one of {', '.join(WEIGHTS_CHOICES)}, got {weights!r}."
            )
        gguf_path = Path(gguf_path)
        if weights == "auto":
            weights = "merged" if quantised_below_8_bits(gguf_path) else "original"
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
            adapter=adapter_ref(adapter_dir) if adapter_dir else None,
            lora_path=lora_path,
            lora_merged=merged,
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_seq_max=n_seq_max,
            description=description,
            **kwargs,
        )

    # -- caller side -----------------------------------------------------------------------

    def _stream(
        self, request: GenerationRequest, stop_event: threading.Event
    ) -> Iterator[StreamEvent]:
        if self._closed or self._pool is None:
            raise SupportLMError("The llama.cpp engine has been closed.")
        clock = EventClock(request.request_id, len(request.prompt_ids))
        lane_request = LaneRequest(
            prompt_ids=list(request.prompt_ids),
            settings=request.settings,
            use_adapter=request.adapter is not None,
            cancel=stop_event,
        )
        self._pool.dispatch(lane_request)
        token_ids: list[int] = []
        reply = ReplyText(self.tokenizer)
        finished: Finished | None = None
        # When the consumer goes away or an error comes back, `Engine.stream` sets the stop
        # event, which is this request's `cancel`: its lane then frees the slot.
        while finished is None:
            finished = self._take_tokens(lane_request.results, token_ids)
            if token_ids:
                clock.first_token()
            if reply.update(token_ids, finished=finished is not None) and finished is None:
                yield clock.event(reply.text, len(token_ids))
        yield clock.event(reply.text, len(token_ids), finished.reason)

    @staticmethod
    def _take_tokens(results: queue.SimpleQueue, token_ids: list[int]) -> Finished | None:
        """Wait for the next token, then take every one already there (detokenised once)."""
        items = [results.get()]
        while not isinstance(items[-1], (Finished, BaseException)):
            try:
                items.append(results.get_nowait())
            except queue.Empty:
                break
        for item in items:
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, Finished):
                return item
            token_ids.append(item)
        return None

    def close(self) -> None:
        """Stop the schedulers and free the llama.cpp contexts, the adapter and the model."""
        if self._closed:
            return
        self._closed = True
        if self._pool is not None:
            self._pool.close()
        if self._adapter:
            self._llama.llama_adapter_lora_free(self._adapter)
        if self._model:
            self._llama.llama_model_free(self._model)


def build(options: EngineOptions) -> LlamaCppEngine:
    """The registry's builder (`supportlm.engines.registry`)."""
    if options.source.gguf_path is None:
        raise SupportLMError(
            f"The llama.cpp engine needs a GGUF model; {options.model!r} is not one. "
            "Use SUPPORTLM_BACKEND=transformers."
        )
    return LlamaCppEngine.from_gguf(
        options.source.gguf_path,
        options.tokenizer(),
        adapter_dir=options.adapter,
        n_seq_max=options.concurrency,
        n_ctx=options.context_length,
        weights=options.setting("llamacpp_weights", "auto"),
        n_threads=options.setting("llamacpp_threads", 0) or None,
        n_lanes=options.setting("llamacpp_lanes", 0) or None,
    )
