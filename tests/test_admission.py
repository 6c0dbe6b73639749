"""Admission: one bound on generation for every path, a bounded waiting line, rate limits."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from supportlm.engines.base import Engine, EventClock, GenerationSettings
from supportlm.serve.admission import Admission, Busy
from supportlm.serve.assistant import Assistant
from supportlm.serve.settings import AppSettings


def test_no_more_than_concurrency_run_at_once() -> None:
    admission = Admission(concurrency=2, max_queue=10)
    inside, most = 0, 0
    lock = threading.Lock()

    def work(_: int) -> None:
        nonlocal inside, most
        with admission.admit():
            with lock:
                inside += 1
                most = max(most, inside)
            time.sleep(0.02)
            with lock:
                inside -= 1

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(16)))
    assert most == 2
    assert (admission.running, admission.waiting) == (0, 0)


def test_a_full_waiting_line_refuses_at_once() -> None:
    admission = Admission(concurrency=1, max_queue=1)
    release = threading.Event()
    entered = threading.Event()

    def hold() -> None:
        with admission.admit():
            entered.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    entered.wait(10)
    waiter = threading.Thread(target=lambda: admission.admit().__enter__())
    waiter.start()
    while admission.waiting < 1:
        time.sleep(0.01)
    started = time.monotonic()
    with pytest.raises(Busy, match="busy"), admission.admit():
        pass
    assert time.monotonic() - started < 1.0  # refused, not queued until a timeout
    release.set()
    holder.join()
    waiter.join()


def test_each_client_gets_its_own_rate_limit() -> None:
    now = [0.0]
    admission = Admission(concurrency=4, max_queue=4, rate_limit=2, clock=lambda: now[0])
    for _ in range(2):
        with admission.admit("alice"):
            pass
    with pytest.raises(Busy, match="at most 2 a minute"), admission.admit("alice"):
        pass
    with admission.admit("bob"):  # another client is not held up by alice
        pass
    now[0] = 61.0  # a minute later alice may ask again
    with admission.admit("alice"):
        pass


class SlowEngine(Engine):
    """Streams a few tokens slowly and records how many requests it ran at once."""

    name = "slow"
    context_length = 4096
    max_concurrency = 4

    def __init__(self, tokenizer) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.running = 0
        self.most = 0
        self._lock = threading.Lock()

    def _stream(self, request, stop_event):
        clock = EventClock(request.request_id, len(request.prompt_ids))
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            for n in range(1, 4):
                time.sleep(0.02)
                clock.first_token()
                yield clock.event("ok " * n, n)
            yield clock.event("ok ok ok", 3, "stop")
        finally:
            with self._lock:
                self.running -= 1


def test_every_path_that_generates_shares_one_bound(smollm2_tokenizer, tmp_path) -> None:
    engine = SlowEngine(smollm2_tokenizer)
    plan = AppSettings(model="embedded", backend="transformers", concurrency=1,
                       feedback_db=tmp_path / "fb.sqlite3").resolve()  # fmt: skip
    assistant = Assistant(engine, plan)
    settings = GenerationSettings(max_new_tokens=8)

    def chat(_: int) -> str:
        request = assistant.chat_request("Where is my parcel?", [], None, settings)
        return list(assistant.chat(request, settings))[-1].text

    def summarize(_: int) -> str:
        return list(assistant.run_task("summarize", "The parcel is late.", settings))[-1].text

    def translate(_: int) -> str:
        answers = assistant.run_task("translate", "Thank you.", settings, target_language="French")
        return list(answers)[-1].text

    with ThreadPoolExecutor(6) as pool:
        jobs = [pool.submit(job, n) for n in range(2) for job in (chat, summarize, translate)]
        results = [job.result() for job in jobs]
    assert all(results)
    assert engine.most == 1  # SUPPORTLM_CONCURRENCY=1 held across chat, summarise, translate


def test_a_failing_store_costs_one_attempt_and_the_reply_still_arrives(smollm2_tokenizer, tmp_path):
    import sqlite3

    plan = AppSettings(model="embedded", backend="transformers",
                       feedback_db=tmp_path / "fb.sqlite3").resolve()  # fmt: skip
    assistant = Assistant(SlowEngine(smollm2_tokenizer), plan)
    attempts = []

    def broken_store(record):
        attempts.append(record.reply_id)
        raise sqlite3.OperationalError("disk I/O error")

    assistant.feedback.add_reply = broken_store
    settings = GenerationSettings(max_new_tokens=8)
    chat = assistant.chat_request("Where is my parcel?", [], None, settings)
    events = list(assistant.chat(chat, settings))
    assert events[-1].finished and events[-1].text == "ok ok ok"
    assert len(events) > 2 and len(attempts) == 1
