"""Timing primitives the generation benchmark's cases share: runs, medians, peak memory.

Every case, in process or over HTTP, is reduced to the same `Run` (time to first token, decode
tokens/s, tokens) and summarised by `measure_cases`, so the rows of `bench/generation.py`'s table
are comparable: the cases' runs alternate, and each is warmed up once first.
"""

from __future__ import annotations

import statistics
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import psutil

T = TypeVar("T")


@dataclass
class Run:
    ttft_s: float
    decode_tok_s: float
    new_tokens: int


@dataclass
class Measurement:
    ttft_s: float
    decode_tok_s: float
    prompt_tok_s: float
    new_tokens: int
    peak_rss_mb: float
    description: str


class PeakRSS:
    """The largest resident set size of a process while the block runs (sampled every 5 ms).

    This process by default; `pid` names another one, e.g. the app server an HTTP case calls.
    """

    def __init__(self, pid: int | None = None) -> None:
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._process = psutil.Process(pid)

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)

    def __enter__(self) -> PeakRSS:
        self.peak_bytes = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20


def in_worker_thread(function: Callable[[], T]) -> T:
    """Call `function` in a fresh thread and return its result.

    The app's engines generate off the caller's thread, so every case is timed that way: on an
    oversubscribed CPU, PyTorch's OpenMP team driven from the main thread ran a small model 5-20x
    slower than the same calls from a worker thread, which would credit the app with a speed-up
    that is only a threading artefact.
    """
    results: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            results.append(function())
        except BaseException as error:  # re-raised in the caller's thread
            errors.append(error)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return results[0]


def decode_rate(new_tokens: int, total_s: float, ttft_s: float) -> float:
    # The first token's time is the prompt's; decode speed is over the tokens after it.
    return (new_tokens - 1) / (total_s - ttft_s) if new_tokens > 1 and total_s > ttft_s else 0.0


def measure_cases(
    cases: dict[str, Callable[[], Run]],
    prefill_seconds: Callable[[], float],
    long_prompt_tokens: int,
    runs: int,
    memory: PeakRSS,
) -> dict[str, Measurement]:
    """Median TTFT and decode speed of each case (description -> run), and prompt speed.

    Each case is warmed up once (first-call allocations, lazy kernels, page faults on the
    weights); then the cases' runs alternate, so drift on a noisy machine falls on all of them
    alike. The cases share one engine, so prompt speed is measured once for all.
    """
    with memory:
        for run in cases.values():
            run()
        results: dict[str, list[Run]] = {description: [] for description in cases}
        for _ in range(runs):
            for description, run in cases.items():
                results[description].append(run())
        prefill_seconds()  # warm-up for the long prompt's buffer sizes
        prefill = statistics.median(prefill_seconds() for _ in range(runs))
    return {
        description: Measurement(
            ttft_s=statistics.median(r.ttft_s for r in case_runs),
            decode_tok_s=statistics.median(r.decode_tok_s for r in case_runs),
            prompt_tok_s=long_prompt_tokens / prefill,
            new_tokens=int(statistics.median(r.new_tokens for r in case_runs)),
            peak_rss_mb=memory.peak_mb,
            description=description,
        )
        for description, case_runs in results.items()
    }
