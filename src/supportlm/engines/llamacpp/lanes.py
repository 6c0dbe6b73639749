"""Lanes: one llama context with its scheduler thread each, and the pool that feeds them.

In a lane every running request holds a KV-cache sequence; each step decodes one token for every
running sequence in one `llama_decode`, topped up with a chunk of at most `prefill_chunk` prompt
tokens of a newly admitted request, so a long prompt never freezes running answers. Lanes share
one loaded model (`LaneModel`, read-only) and know the rest of the engine only through their
`LanePool`: who is busy, and that a request finished.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from supportlm.engines.base import GenerationSettings
from supportlm.engines.llamacpp.sampling import apply_repetition_penalty, sample_top_p
from supportlm.errors import SupportLMError

logger = logging.getLogger(__name__)

#: Most prompt tokens a lane reads in one step on threads borrowed from idle lanes: 256-token
#: steps read a prompt as fast as 512-token ones on 2 cores (128: 7 % slower; measured).
_BORROWED_CHUNK = 256


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" | "length" | "cancelled"


@dataclass(eq=False)
class LaneRequest:
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


@dataclass(frozen=True)
class LaneModel:
    """What every lane of one engine shares: the loaded model and how to schedule on it."""

    llama: Any  # the llama_cpp module
    model: Any  # llama_model pointer
    n_vocab: int
    stop_ids: frozenset[int]
    #: The runtime LoRA (or None), and its scale per adapter state (None: no runtime LoRA set).
    lora: Any
    lora_scales: dict[bool, float | None]
    #: Whether the model file already holds the adapter (the state with no runtime LoRA).
    lora_merged: bool
    n_batch: int
    prefill_chunk: int
    min_decode_batch: int
    n_threads: int  # across all lanes: what a lane may borrow while the others are idle


class LanePool:
    """The lanes of one model: sends each request to the lane that can start it soonest."""

    def __init__(self, shared: LaneModel, *, n_lanes: int, n_ctx: int, n_seq_max: int) -> None:
        self.shared = shared
        self.lanes: list[Lane] = []
        self._lock = threading.Lock()
        try:
            for index in range(n_lanes):
                self.lanes.append(
                    Lane(
                        self,
                        index,
                        n_ctx=n_ctx,
                        # lanes split the sequences and the threads as evenly as they go
                        n_seq=len(range(index, n_seq_max, n_lanes)),
                        threads=len(range(index, shared.n_threads, n_lanes)),
                    )
                )
        except BaseException:
            self.close()
            raise

    def dispatch(self, request: LaneRequest) -> None:
        """Queue `request` on the lane that can start it soonest."""

        def wait_rank(lane: Lane) -> tuple[bool, int, int]:
            # A full lane, or a busy one in the other adapter state, makes the request wait.
            switch = lane.load > 0 and lane.adapter_on != request.use_adapter
            return (lane.load >= lane.capacity or switch, lane.load, lane.index)

        with self._lock:
            lane = min(self.lanes, key=wait_rank)
            lane.load += 1
        lane.inbox.put(request)

    def released(self, lane: Lane) -> None:
        with self._lock:
            lane.load -= 1

    def others_idle(self, lane: Lane) -> bool:
        return all(other.load == 0 for other in self.lanes if other is not lane)

    def close(self) -> None:
        for lane in self.lanes:
            lane.close()
        self.lanes = []


class Lane:
    """One llama context, its scheduler thread and its CPU threads (see `LlamaCppEngine`)."""

    def __init__(self, pool: LanePool, index: int, *, n_ctx: int, n_seq: int, threads: int) -> None:
        shared = pool.shared
        llama_cpp = shared.llama
        self._pool = pool
        self._shared = shared
        self._llama = llama_cpp
        self.index = index
        self.threads = threads
        self.capacity = n_seq
        #: Requests queued on or running in this lane; changed under the pool's lock.
        self.load = 0
        self._thread: threading.Thread | None = None
        params = llama_cpp.llama_context_default_params()
        # Separate KV streams per sequence: answers share no prefix worth a unified cache, and
        # llama.cpp then sizes each sequence's window at n_ctx.
        params.n_ctx = n_ctx * n_seq
        params.n_seq_max = n_seq
        params.kv_unified = False
        params.n_batch = params.n_ubatch = shared.n_batch
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(shared.model, params)
        if not self._ctx:
            raise SupportLMError(f"llama.cpp could not create a context of {n_ctx} tokens.")
        self._batch_threads = threads
        self.context_length = int(llama_cpp.llama_n_ctx_seq(self._ctx))
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(shared.n_batch, 0, 1)
        self.adapter_on = shared.lora_merged  # the state with no runtime LoRA set
        self.inbox: queue.SimpleQueue[LaneRequest | None] = queue.SimpleQueue()
        self._waiting: collections.deque[LaneRequest] = collections.deque()
        self._running: list[LaneRequest] = []
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

    def _finish(self, request: LaneRequest, outcome: str | BaseException) -> None:
        if request.done:
            return
        request.done = True
        if request.seq_id >= 0:
            self._llama.llama_memory_seq_rm(self._memory, request.seq_id, -1, -1)
            self._free_seq_ids.append(request.seq_id)
            request.seq_id = -1
        if request in self._running:
            self._running.remove(request)
        self._pool.released(self)
        request.results.put(Finished(outcome) if isinstance(outcome, str) else outcome)

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

    def _check(self, request: LaneRequest) -> None:
        ids = request.prompt_ids
        n_vocab = self._shared.n_vocab
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
                try:
                    self._set_adapter(request.use_adapter)
                except Exception as error:  # taken off the queue: it must be finished here
                    self._finish(request, error)
                    continue
            request.seq_id = self._free_seq_ids.pop(0)
            request.rng = np.random.default_rng(request.settings.seed)
            request.remember(request.prompt_ids)
            self._running.append(request)

    def _set_adapter(self, on: bool) -> None:
        llama_cpp = self._llama
        scale = self._shared.lora_scales[on]
        if scale is not None:
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._shared.lora)
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
        min_batch = self._shared.min_decode_batch
        if len(decoding) == len(self._running) and 1 < len(decoding) < min_batch:
            # llama.cpp multiplies a batch of 2-3 tokens with llamafile's tiled kernel, which on
            # AVX2 costs 3x a single token's mat-vec for Q8_0 weights (measured): one token per
            # call is faster until the batch is large enough to pay off.
            for request in decoding:
                self._decode([request], prefill=False)
        else:
            self._decode(decoding, prefill=True)

    def _decode(self, decoding: list[LaneRequest], *, prefill: bool) -> None:
        """One `llama_decode`: a token for each of `decoding`, then prompt chunks if `prefill`."""
        shared = self._shared
        batch = self._batch
        batch.n_tokens = 0
        outputs: list[tuple[LaneRequest, int]] = []

        def add(request: LaneRequest, token: int, want_logits: bool) -> None:
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
        borrow = shared.n_threads > self.threads and self._pool.others_idle(self)
        # While answers are streaming, prompts enter in small chunks so those answers keep
        # flowing; with nothing streaming, a prompt takes the whole batch.
        budget = shared.n_batch - len(decoding) if prefill else 0
        if decoding:
            budget = min(budget, shared.prefill_chunk)
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
        self._use_batch_threads(shared.n_threads if borrow and reading_prompt else self.threads)

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
            if token in shared.stop_ids:
                self._finish(request, "stop")
            elif (
                request.num_generated >= request.settings.max_new_tokens
                or request.n_past >= self.context_length
            ):
                self._finish(request, "length")
            else:
                request.pending_token = token
                request.remember([token])

    def _sample(self, request: LaneRequest, index: int) -> int:
        settings = request.settings
        n_vocab = self._shared.n_vocab
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
