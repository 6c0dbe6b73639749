"""Learning from feedback, end to end on the real model, as a support team would run it.

    python bench/feedback_loop.py --json docs/results/feedback-loop.json

1. A starting adapter is trained on the Bitext sample *without* the corrected intents (cached),
   so what the loop gains on them is learned from feedback, not from earlier training.
2. `python app.py` serves it in a fresh work folder; simulated support agents sign in (the
   export trusts signed-in agents), ask questions of those intents through `/reply`, and dislike
   and correct each reply with the Bitext reference answer through `/feedback`, as the Chat tab
   does.
3. `python finetune/feedback.py loop` runs export, retrain (`--init_adapter`, replaying the
   starting adapter's own data), evaluate `--against`, promote; the running app switches to the
   promoted adapter without a restart. Each stage is timed.
4. *Unseen* questions of the corrected intents, and of the other intents, are asked through the
   API before and after: ROUGE-L/chrF and the like-share proxy on both.

The app's RSS (process tree) is sampled every 50 ms, so the switch's peak memory (two engines at
once) is measured against the steady state before and after.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
from gradio_client import Client

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "src"))
sys.path.insert(0, str(REPO_ROOT / "bench"))

from feedback_questions import (  # noqa: E402
    DEFAULT_INTENTS,
    Question,
    pick_questions,
    read_rows,
    scores,
    write_without,
)
from load import free_port, start_app  # noqa: E402

from supportlm.placeholders import ShopDetails  # noqa: E402
from supportlm.run_folder import RunFolder, point_latest  # noqa: E402
from supportlm.train.release.feedback_loop import stage  # noqa: E402

SHOP = REPO_ROOT / "data" / "shop.yaml"
#: The starting adapter is meant to be weak on purpose (30 steps), and it is trained with the
#: settings of the recorded run (docs/results/feedback-loop.json), which were bitext.yaml's until
#: that recipe moved to a higher learning rate and more intent questions for 800 steps: pinned
#: here, so the recorded figures reproduce with the same command.
START_SETTINGS = [
    "--learning_rate", "3e-4", "--warmup_steps", "5", "--intent_share", "0.1",
    "--eval_steps", "30",
]  # fmt: skip
AGENT = "agent"


def script(name: str) -> str:
    return str(REPO_ROOT / "finetune" / name)


# -- the starting adapter ---------------------------------------------------------------------


def start_adapter(args: argparse.Namespace, rows: list[dict[str, str]]) -> tuple[Path, Path]:
    """The cached starting adapter and its training data (the sample without `args.intents`)."""
    config = Path(args.start_config).read_bytes()
    key = json.dumps(
        [sorted(args.intents), args.start_steps, args.model, config.hex(), START_SETTINGS]
    )
    folder = Path(args.cache) / f"start-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    data, adapter = folder / "bitext-without.csv", folder / "adapter"
    if not (adapter / "adapter_model.safetensors").is_file():
        kept = write_without(rows, args.intents, data)
        print(f"starting adapter: {kept} rows without {', '.join(args.intents)}", flush=True)
        command = [
            "train", "--config", str(Path(args.start_config).resolve()),
            "--dataset", str(data), "--max_steps", str(args.start_steps),
            "--output_dir", str(adapter), *START_SETTINGS,
            *(["--model_name_or_path", args.model] if args.model else []),
        ]  # fmt: skip
        print(f"== training the starting adapter (log: {folder / 'train.log'})", flush=True)
        stage("train the starting adapter", command, folder / "train.log", cwd=folder)
    return adapter, data


# -- the app and its API ----------------------------------------------------------------------


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

    def peak_mb(self, start: float, end: float) -> float:
        return max((rss for t, rss in self.samples if start <= t <= end), default=0) / 2**20


def health(url: str, password: str) -> dict:
    """/health as a signed-in agent sees it (anonymous callers get the status only)."""
    token = base64.b64encode(f"{AGENT}:{password}".encode()).decode()
    request = urllib.request.Request(f"{url}health", headers={"Authorization": f"Basic {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def ask_all(client: Client, questions: list[Question], max_new_tokens: int) -> list[str]:
    """Answers through `/reply`, two at a time (the app serves two lanes)."""

    def ask(question: Question) -> str:
        reply = client.predict(question.text, api_name="/reply", max_new_tokens=max_new_tokens)
        return reply["text"]

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(ask, questions))


def give_feedback(client: Client, questions: list[Question], max_new_tokens: int) -> int:
    """Each reply disliked, then corrected with the reference answer; returns the rows written."""
    rows = 0
    for question in questions:
        reply = client.predict(question.text, api_name="/reply", max_new_tokens=max_new_tokens)
        client.predict(reply["reply_id"], "dislike", None, api_name="/feedback")
        client.predict(reply["reply_id"], "correction", question.answer, api_name="/feedback")
        rows += 2
    return rows


def wait_for_switch(url: str, password: str, old: str | None, timeout_s: float) -> float:
    started = time.perf_counter()
    while health(url, password)["adapter_version"] == old:
        if time.perf_counter() - started > timeout_s:
            raise SystemExit(f"the app did not switch adapters within {timeout_s:.0f} s")
        time.sleep(0.2)
    return time.perf_counter() - started


# -- the loop ---------------------------------------------------------------------------------


def app_env(work: Path, password: str) -> dict[str, str]:
    return {
        "SUPPORTLM_FEEDBACK_DB": str(work / "feedback.sqlite3"),
        "SUPPORTLM_ADAPTER_WATCH_S": "1",
        "SUPPORTLM_FEEDBACK_RATE_LIMIT": "0",  # one client stands for a team of agents
        "SUPPORTLM_RATE_LIMIT": "0",
        "SUPPORTLM_AUTH": f"{AGENT}:{password}",  # the agents sign in: their feedback is trusted
        "SUPPORTLM_SHOP": str(SHOP),
    }


def loop_command(args: argparse.Namespace, work: Path, replay: Path) -> list[str]:
    """`feedback.py loop` exactly as a team runs it (the README's steps in one command)."""
    command = [
        script("feedback.py"), "--db", str(work / "feedback.sqlite3"), "loop",
        "--outputs_dir", str(work / "outputs"), "--replay_dataset", str(replay),
        "--eval_limit", str(args.eval_limit),
        *(["--max_steps", str(args.max_steps)] if args.max_steps else []),
        *(["--force"] if args.force else []),
    ]  # fmt: skip
    return command + (["--train_args", "--model_name_or_path", args.model] if args.model else [])


def run_loop(args: argparse.Namespace, work: Path, replay: Path) -> dict:
    """Run `feedback.py loop`; its report (stages' seconds, promoted or not)."""
    outputs = work / "outputs"
    started = time.perf_counter()
    with (work / "loop.log").open("a") as log:
        done = subprocess.run(
            [sys.executable, *loop_command(args, work, replay)], cwd=work, stdout=log, stderr=log
        )
    wall_s = time.perf_counter() - started
    reports = sorted((outputs / "loops").glob("*.json"))
    if done.returncode not in (0, 1) or not reports:
        raise SystemExit(f"feedback.py loop failed ({done.returncode}); see {work / 'loop.log'}")
    return {**json.loads(reports[-1].read_text()), "wall_s": wall_s}


def measure(args: argparse.Namespace, work: Path, start: Path, replay: Path) -> dict:
    rows = read_rows()
    sets = pick_questions(
        rows, args.intents, args.per_intent, args.unseen_per_intent, args.other_per_intent
    )
    shop = ShopDetails.load(SHOP)
    point_latest(RunFolder(start), work / "outputs")
    password = secrets.token_urlsafe(12)
    port = free_port()
    # No SUPPORTLM_MODEL: the app serves outputs/latest on its base (also for --model) and
    # follows promotions, as a team's app does.
    process, startup_s, app_log = start_app(
        None, args.backend, port, app_env(work, password), 900, cwd=work
    )
    url = f"http://127.0.0.1:{port}/"
    sampler = RssSampler(process.pid)
    sampler.start()
    try:
        client = Client(url, auth=(AGENT, password), verbose=False)
        before = health(url, password)
        unseen = sets.corrected_unseen + sets.other_unseen
        answers_before = ask_all(client, unseen, args.max_new_tokens)
        started = time.perf_counter()
        rows_written = give_feedback(client, sets.feedback, args.feedback_tokens)
        feedback_s = time.perf_counter() - started
        steady_before = sampler.peak_mb(sampler.now() - 5, sampler.now())
        switch_from = sampler.now()
        loop = run_loop(args, work, replay)
        switch_s = (
            wait_for_switch(url, password, before["adapter_version"], 300)
            if loop["promoted"]
            else 0
        )
        time.sleep(3)  # the old engine closes after its last request
        after = health(url, password)
        rss = {
            "steady_before": steady_before,
            "switch_peak": sampler.peak_mb(switch_from, sampler.now()),
            "steady_after": sampler.peak_mb(sampler.now() - 1, sampler.now()),
        }
        answers_after = ask_all(client, unseen, args.max_new_tokens)
    finally:
        sampler.stopped.set()
        process.terminate()
        process.wait(30)
    n = len(sets.corrected_unseen)

    def both(questions: list[Question], old: list[str], new: list[str]) -> dict:
        old_scores = scores(questions, old, shop, args.like_rouge)
        new_scores = scores(questions, new, shop, args.like_rouge)
        return {
            "rougeL_before": old_scores["rougeL"], "rougeL_after": new_scores["rougeL"],
            "chrf_before": old_scores["chrf"], "chrf_after": new_scores["chrf"],
            "like_share_before": old_scores["like_share"],
            "like_share_after": new_scores["like_share"], "n_questions": len(questions),
        }  # fmt: skip

    stages = {**loop["stages_s"], "switch": switch_s}
    return {
        "corrected_intents": {
            "intents": list(args.intents),
            **both(sets.corrected_unseen, answers_before[:n], answers_after[:n]),
        },
        "other_intents": both(sets.other_unseen, answers_before[n:], answers_after[n:]),
        "feedback_rows": rows_written,
        "feedback_questions": len(sets.feedback),
        "feedback_s": feedback_s,
        "stages_s": stages,
        "loop_s": sum(stages.values()),
        "promoted": loop["promoted"],
        "forced": loop["forced"],
        "served_before": before,
        "served_after": after,
        "startup_s": startup_s,
        "rss_mb": rss,
        "loop": loop,
        "app_log": str(app_log),
        "samples": [
            {"question": q.text, "reference": q.answer, "before": old, "after": new}
            for q, old, new in zip(
                sets.corrected_unseen[:3],
                answers_before[: min(n, 3)],
                answers_after[: min(n, 3)],
                strict=True,
            )
        ],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--intents", nargs="+", default=list(DEFAULT_INTENTS))
    parser.add_argument("--per_intent", type=int, default=25, help="corrected questions each")
    parser.add_argument("--unseen_per_intent", type=int, default=8)
    parser.add_argument("--other_per_intent", type=int, default=1, help="for the regression")
    parser.add_argument("--max_new_tokens", type=int, default=300, help="scored answers")
    parser.add_argument("--feedback_tokens", type=int, default=64, help="replies agents correct")
    parser.add_argument("--like_rouge", type=float, default=40.0, help="the like proxy's bar")
    parser.add_argument("--start_steps", type=int, default=30)
    parser.add_argument("--start_config", default=str(REPO_ROOT / "finetune/configs/bitext.yaml"))
    parser.add_argument("--max_steps", type=int, help="the retrain's steps (default: recipe's)")
    parser.add_argument("--eval_limit", type=int, default=24)
    parser.add_argument("--model", help="default: the embedded SmolLM2")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--force", action="store_true", help="promote even if the gate refuses")
    parser.add_argument("--cache", default=str(Path.home() / ".cache/supportlm/feedback-loop"))
    parser.add_argument("--work", help="work folder; default: a new temporary one")
    parser.add_argument("--json", help="write the report here")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    start, replay = start_adapter(args, read_rows())
    work = Path(args.work or tempfile.mkdtemp(prefix="supportlm-loop-"))
    work.mkdir(parents=True, exist_ok=True)
    report = measure(args, work, start, replay)
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
