"""bench/feedback_loop.py on the tiny model: the whole loop through a real app and processes."""

import json
import subprocess
import sys

from supportlm.engines.base import GenerationSettings


def test_feedback_loop_bench_on_the_tiny_model(
    tiny_chat_model_dir, repo_root, bitext_csv, tmp_path
):
    result_file = tmp_path / "loop.json"
    command = [
        sys.executable, str(repo_root / "bench" / "feedback_loop.py"),
        "--model", tiny_chat_model_dir, "--backend", "transformers",
        "--intents", "newsletter_subscription", "recover_password",
        "--per_intent", "3", "--unseen_per_intent", "1", "--other_per_intent", "1",
        "--max_new_tokens", "8", "--feedback_tokens", "4",
        "--start_steps", "2", "--max_steps", "2", "--eval_limit", "2", "--force",
        "--cache", str(tmp_path / "cache"), "--work", str(tmp_path / "work"),
        "--json", str(result_file),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, timeout=1500, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(result_file.read_text())
    keys = {"rougeL_before", "rougeL_after", "chrf_before", "chrf_after", "n_questions"}
    assert keys <= report["corrected_intents"].keys() and keys <= report["other_intents"].keys()
    assert report["corrected_intents"]["n_questions"] == 2
    assert report["other_intents"]["n_questions"] == 25  # one of each other intent
    assert report["feedback_rows"] == 12  # 6 replies, each disliked and corrected
    assert set(report["stages_s"]) == {"export", "train", "evaluate", "promote", "switch"}
    assert report["loop_s"] == sum(report["stages_s"].values()) > 0
    assert report["promoted"] is True  # --force: the switch is measured even if refused
    # The app switched to the candidate without a restart, and named it.
    assert report["served_after"]["adapter_version"] != report["served_before"]["adapter_version"]
    export = json.loads((tmp_path / "work" / report["loop"]["export"] / "export.json").read_text())
    # The promotion gate scored the answers decoded as the app decodes them by default.
    candidate = tmp_path / "work" / report["loop"]["candidate"]
    versus = json.loads((candidate / "versus.json").read_text())
    assert versus["generation"]["repetition_penalty"] == GenerationSettings().repetition_penalty
    # The agents signed in, so their feedback passed the trust gate as it arrived.
    assert export["by_gate"]["agent"] == 12 and export["by_gate"]["pending"] == 0
    # The starting adapter never saw the corrected intents.
    start_data = next((tmp_path / "cache").glob("start-*/bitext-without.csv")).read_text()
    assert "newsletter_subscription" not in start_data and "recover_password" not in start_data
