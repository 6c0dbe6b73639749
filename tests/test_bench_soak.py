"""bench/soak.py on the tiny model: a real app process, concurrent clients, the store checked."""

import json
import subprocess
import sys


def test_soak_bench_on_the_tiny_model(tiny_chat_model_dir, repo_root, tmp_path):
    result_file = tmp_path / "soak.json"
    command = [
        sys.executable, str(repo_root / "bench" / "soak.py"),
        "--model", tiny_chat_model_dir, "--backend", "transformers",
        "--clients", "3", "--duration_s", "12", "--max_new_tokens", "8",
        "--json", str(result_file),
    ]  # fmt: skip
    subprocess.run(command, check=True, cwd=tmp_path, timeout=600)
    report = json.loads(result_file.read_text())
    assert {"requests", "errors", "cross_talk", "lost_feedback_rows", "p95_s"} <= report.keys()
    assert report["errors"] == 0, report["first_errors"]
    assert report["cross_talk"] == 0 and report["lost_feedback_rows"] == 0
    assert report["requests"] >= 6 and report["replies_checked"] >= 1
    assert report["p95_s"] is not None and report["p95_s"] > 0


def test_the_greedy_client_bench_on_the_tiny_model(tiny_chat_model_dir, repo_root, tmp_path):
    result_file = tmp_path / "fair.json"
    command = [
        sys.executable, str(repo_root / "bench" / "soak.py"), "--greedy",
        "--model", tiny_chat_model_dir, "--backend", "transformers",
        "--duration_s", "6", "--max_new_tokens", "4", "--json", str(result_file),
    ]  # fmt: skip
    subprocess.run(command, check=True, cwd=tmp_path, timeout=600)
    report = json.loads(result_file.read_text())
    assert report["normal_errors"] == 0 and report["normal_completed_with_greedy"] > 0
    assert report["greedy_refused"] > 0  # 40 in flight is more than one client's share
    assert report["with_greedy_vs_solo"] is not None


def test_the_store_check_finds_cross_talk_and_lost_rows(tmp_path, repo_root, monkeypatch):
    # The bench's zeros mean something only if its check can see a mismatch.
    monkeypatch.syspath_prepend(str(repo_root / "bench"))
    from soak import ClientLog, check_store

    from supportlm.feedback.store import FeedbackStore, ReplyRecord

    store = FeedbackStore(tmp_path / "fb.sqlite3")
    store.add_reply(ReplyRecord("r1", [{"role": "user", "content": "Hi"}], "Hello there"))
    store.add_reply(ReplyRecord("r2", [{"role": "user", "content": "Hi"}], "Mail a@b.com"))
    row = store.add_feedback("like", "r1")
    good = ClientLog(
        replies={"r1": "Hello there", "r2": "Mail a@b.com"}, feedback=[(row, "r1", "like")]
    )
    assert check_store(store.path, [good]) == (0, 0)
    swapped = ClientLog(replies={"r1": "Mail a@b.com"}, feedback=[(row + 1, "r1", "like")])
    assert check_store(store.path, [swapped]) == (1, 1)
