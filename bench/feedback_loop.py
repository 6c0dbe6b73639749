"""The feedback loop end to end on the real model, as a support team would run it.

    python bench/feedback_loop.py --questions 80 --force --json docs/results/feedback-loop.json

1. `python app.py` serves the shipped adapter (llama.cpp) in a fresh work folder.
2. Customers ask Bitext questions from the shipped adapter's *training* split that its 150 steps
   did not necessarily see (never its validation or test split, so the comparison below stays
   honest); an agent corrects every reply with the Bitext reference answer (simulated agents:
   the reference answers stand in for what a person would have written).
3. `finetune/feedback.py export`, then `finetune/train.py --init_adapter` (the shipped adapter,
   replaying Bitext), `finetune/evaluate.py --against` (held-out test + held-out feedback) and
   `finetune/promote.py`, each as its own process, exactly as the README shows them.
4. The running app notices the promotion and switches adapters without a restart; the app's RSS
   is sampled every 50 ms throughout, so the switch's peak memory (two engines at once) is
   measured against the steady state before and after.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil
from gradio_client import Client

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "src"))
sys.path.insert(0, str(REPO_ROOT / "bench"))

from load import free_port, start_app  # noqa: E402

from supportlm.run_folder import SHIPPED_ADAPTER  # noqa: E402
from supportlm.train.data import Example  # noqa: E402
from supportlm.train.dataset import assign_split  # noqa: E402

BITEXT = REPO_ROOT.parent / "shared" / "data" / "bitext-customer-support" / "train.csv"


def training_questions(count: int) -> list[tuple[str, str]]:
    """`count` (question, answer) rows of the training split, spread over the intents."""
    by_intent: dict[str, list[tuple[str, str]]] = {}
    with BITEXT.open(newline="") as file:
        for row in csv.DictReader(file):
            messages = [
                {"role": "user", "content": row["instruction"]},
                {"role": "assistant", "content": row["response"]},
            ]
            if assign_split(Example(messages=messages)) == "train":
                by_intent.setdefault(row["intent"], []).append(
                    (row["instruction"], row["response"])
                )
    picked, round_ = [], 0
    while len(picked) < count:
        for rows in by_intent.values():
            if round_ < len(rows) and len(picked) < count:
                picked.append(rows[round_])
        round_ += 1
    return picked


class RssSampler(threading.Thread):
    """The process tree's RSS every `every_s` seconds, as (seconds, bytes) pairs."""

    def __init__(self, pid: int, every_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.process, self.every_s, self.samples = psutil.Process(pid), every_s, []
        self.start_time, self.stopped = time.perf_counter(), threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                rss = sum(p.memory_info().rss for p in [self.process, *self.process.children(True)])
            except psutil.Error:
                return
            self.samples.append((time.perf_counter() - self.start_time, rss))
            time.sleep(self.every_s)

    def now(self) -> float:
        return time.perf_counter() - self.start_time

    def peak(self, start: float, end: float) -> int:
        return max((rss for t, rss in self.samples if start <= t <= end), default=0)


def health(url: str) -> dict:
    with urllib.request.urlopen(f"{url}health", timeout=10) as response:
        return json.load(response)


def collect_feedback(url: str, rows: list[tuple[str, str]], max_new_tokens: int) -> dict:
    client = Client(url, verbose=False)
    started = time.perf_counter()
    for question, answer in rows:
        reply = client.predict(question, api_name="/reply", max_new_tokens=max_new_tokens)
        client.predict(reply["reply_id"], "correction", answer, api_name="/feedback")
    return {
        "replies": len(rows),
        "corrections": len(rows),
        "seconds": time.perf_counter() - started,
    }


def step(name: str, command: list[str], cwd: Path, log: Path, *, check: bool = True) -> dict:
    """Run one README command (its output goes to `log`): its seconds and exit status."""
    print(f"== {name}: {' '.join(command)}", flush=True)
    started = time.perf_counter()
    with log.open("a") as out:
        out.write(f"\n== {name}: {' '.join(command)}\n")
        out.flush()
        result = subprocess.run(
            [sys.executable, *command], cwd=cwd, stdout=out, stderr=subprocess.STDOUT
        )
    if check and result.returncode:
        raise SystemExit(f"{name} failed ({result.returncode}); see {log}")
    return {"seconds": time.perf_counter() - started, "returncode": result.returncode}


def wait_for_switch(url: str, old: str | None, timeout_s: float) -> float:
    started = time.perf_counter()
    while health(url)["adapter_version"] == old:
        if time.perf_counter() - started > timeout_s:
            raise SystemExit(f"the app did not switch adapters within {timeout_s:.0f} s")
        time.sleep(0.2)
    return time.perf_counter() - started


def script(name: str) -> str:
    return str(REPO_ROOT / "finetune" / name)


def retrain(args: argparse.Namespace, work: Path, db: str) -> dict:
    """Export, continue the shipped adapter, compare: each step skipped when `work` has it."""
    log, export, candidate = work / "loop.log", work / "export", work / "outputs" / "v2"
    times = {}
    if not (export / "export.json").is_file():
        times["export"] = step("export", [script("feedback.py"), "--db", db, "export",
                                          "--out", str(export)], work, log)  # fmt: skip
    if not (candidate / "adapter_model.safetensors").is_file():
        times["train"] = step("train", [
            script("train.py"), "--init_adapter", str(SHIPPED_ADAPTER),
            "--dataset", str(export / "sft.jsonl"), "--replay_dataset", str(BITEXT),
            "--output_dir", str(candidate), "--max_steps", str(args.max_steps),
        ], work, log)  # fmt: skip
    if not (candidate / "versus.json").is_file():
        times["evaluate"] = step("evaluate --against", [
            script("evaluate.py"), "--adapter", str(candidate), "--against", str(SHIPPED_ADAPTER),
            "--limit", str(args.eval_limit),
        ], work, log)  # fmt: skip
    export_report = json.loads((export / "export.json").read_text())
    versus = json.loads((candidate / "versus.json").read_text())
    return {"times": times, "export": export_report, "versus": versus}


def promote(args: argparse.Namespace, work: Path) -> dict:
    """The gate first; with `--force` a refused candidate is promoted anyway (logged)."""
    log, outputs = work / "loop.log", work / "outputs"
    command = [script("promote.py"), str(outputs / "v2"), "--outputs_dir", str(outputs)]
    gate = step("promote", command, work, log, check=False)
    result = {"gate_passed": gate["returncode"] == 0, "forced": False}
    if gate["returncode"] and args.force:
        step("promote --force", [*command, "--force"], work, log)
        result["forced"] = True
    return result


def run_loop(args: argparse.Namespace, work: Path) -> dict:
    db = str(work / "feedback.sqlite3")
    env = {
        "SUPPORTLM_FEEDBACK_DB": db,
        "SUPPORTLM_ADAPTER_WATCH_S": "1",
        "SUPPORTLM_FEEDBACK_RATE_LIMIT": "0",  # one client stands for many agents
        "SUPPORTLM_SHOP": str(REPO_ROOT / "data" / "shop.yaml"),
    }
    port = free_port()
    process, startup_s, app_log = start_app(None, "llama.cpp", port, env, 600, cwd=work)
    url = f"http://127.0.0.1:{port}/"
    sampler = RssSampler(process.pid)
    sampler.start()
    try:
        before = health(url)
        if before["adapter_version"] is None:
            raise SystemExit("the app serves no adapter; the loop starts from the shipped one")
        report: dict = {"startup_s": startup_s, "served_before": before}
        if not (work / "export" / "export.json").is_file():
            report["feedback"] = collect_feedback(
                url, training_questions(args.questions), args.max_new_tokens
            )
        steady_before = sampler.peak(sampler.now() - 5, sampler.now())
        report.update(retrain(args, work, db))
        switch_started = sampler.now()
        report["promotion"] = promote(args, work)
        if report["promotion"]["gate_passed"] or report["promotion"]["forced"]:
            report["switch_s"] = wait_for_switch(url, before["adapter_version"], 600)
            time.sleep(3)  # the old engine closes after its last request
        report["served_after"] = health(url)
        report["rss_mb"] = {
            "steady_before": steady_before / 2**20,
            "switch_peak": sampler.peak(switch_started, sampler.now()) / 2**20,
            "steady_after": sampler.peak(sampler.now() - 1, sampler.now()) / 2**20,
        }
        question = training_questions(1)[0][0]
        reply = Client(url, verbose=False).predict(question, api_name="/reply", max_new_tokens=64)
        report["reply_after"] = {"question": question, "text": reply["text"]}
    finally:
        sampler.stopped.set()
        process.terminate()
        process.wait(30)
    report["app_log"] = str(app_log)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=80)
    parser.add_argument("--max_new_tokens", type=int, default=160)
    parser.add_argument("--max_steps", type=int, default=30)
    parser.add_argument("--eval_limit", type=int, default=40)
    parser.add_argument(
        "--force",
        action="store_true",
        help="if the gate refuses, promote anyway (logged) to measure the switch",
    )
    parser.add_argument(
        "--work",
        help="work folder (default: a new one); its finished steps "
        "(export, training, comparison) are reused",
    )
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="supportlm-loop-"))
    work.mkdir(parents=True, exist_ok=True)
    report = run_loop(args, work)
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
