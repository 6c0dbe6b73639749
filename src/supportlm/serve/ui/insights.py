"""The Insights tab: satisfaction per adapter version, what customers disliked, the approval
queue, and a button that exports the feedback and starts the loop (`feedback.py loop`).

When a login is configured (``SUPPORTLM_AUTH`` or a Hugging Face sign-in) the tab is for agents
only (``SUPPORTLM_AGENTS``): it is hidden from everyone else and every handler checks again, as a
hidden tab is no protection. Without a login the person at the app is its operator.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import gradio as gr
import pandas as pd

from supportlm.run_folder import SCRIPTS_DIR
from supportlm.serve import insights
from supportlm.serve.assistant import Assistant
from supportlm.serve.review import decide, queue
from supportlm.serve.settings import AppSettings
from supportlm.serve.ui.common import signed_in_user, user_errors

VERSION_COLUMNS = ["version", "replies", "like_share", "correction_rate", "likes", "dislikes",
                   "corrections", "votes_tuned", "votes_base", "votes_tie", "votes_both_bad",
                   "first_day", "last_day"]  # fmt: skip
QUEUE_COLUMNS = ["ref", "kind", "author", "question", "reply", "correction", "created_at"]
DISLIKED_COLUMNS = ["question", "dislikes", "corrections", "intent"]
INTENT_COLUMNS = ["intent", "replies", "unhappy", "unhappy_share"]


def is_agent(request: gr.Request | None, settings: AppSettings) -> bool:
    """Whether this caller may see Insights: anyone without a login, else an agent."""
    if not (settings.auth or settings.hf_oauth):
        return True
    return signed_in_user(request) in settings.agent_names()


def require_agent(request: gr.Request | None, settings: AppSettings) -> str | None:
    if not is_agent(request, settings):
        raise gr.Error("Insights are for signed-in agents.")
    return signed_in_user(request)


class LoopProcess:
    """At most one `feedback.py loop` at a time, started from the tab; its log is a file."""

    def __init__(self, db: Path, outputs_dir: str = "outputs") -> None:
        self.db, self.outputs_dir = db, outputs_dir
        self.process: subprocess.Popen | None = None
        self.log: Path | None = None
        self._lock = threading.Lock()

    def start(self) -> str:
        with self._lock:
            if self.process is not None and self.process.poll() is None:
                return f"A loop is already running (log: `{self.log}`)."
            self.log = Path(self.outputs_dir) / "loops" / "from-insights.log"
            self.log.parent.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, str(SCRIPTS_DIR / "feedback.py"), "--db", str(self.db),
                       "loop", "--outputs_dir", self.outputs_dir]  # fmt: skip
            with self.log.open("w") as out:
                self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
            return f"Started the loop (log: `{self.log}`); the app switches if it is promoted."

    def status(self) -> str:
        if self.process is None:
            return "No loop started from here yet."
        code = self.process.poll()
        if code is None:
            return f"The loop is running (log: `{self.log}`)."
        verdict = {0: "promoted", 1: "refused by the promotion gate"}.get(code, f"failed ({code})")
        return f"The last loop finished: {verdict} (log: `{self.log}`)."


def _frame(rows: list[dict], columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame([{c: row.get(c) for c in columns} for row in rows], columns=columns)


def insights_tab(assistant: Assistant, tab: gr.Tab) -> None:
    settings, store = assistant.settings, assistant.feedback
    if store is None:
        gr.Markdown("Feedback is switched off on this server, so there is nothing to show.")
        return
    loop = LoopProcess(store.path)
    refresh = gr.Button("Refresh")
    versions = gr.Dataframe(
        label="Satisfaction per adapter version", interactive=False, elem_id="insights-versions"
    )
    # Points, not lines: Gradio's LinePlot draws a series of one day as nothing (a line needs two
    # points, and its points show only on hover), and a new adapter version starts with one day.
    # The margin around 0..1 keeps a point at 0 or 1 whole.
    share = {"x": "day", "color": "version", "y_lim": [-0.05, 1.05]}
    like_plot = gr.ScatterPlot(
        y="like_share", label="Like share per day", elem_id="insights-like-share", **share
    )
    correction_plot = gr.ScatterPlot(y="correction_rate", label="Correction rate per day", **share)
    with gr.Row():
        disliked = gr.Dataframe(label="Most disliked or corrected questions", interactive=False)
        intents = gr.Dataframe(label="Intents by unhappy share", interactive=False)
    gr.Markdown("### Waiting for approval\nOnly approved rows and signed-in agents' feedback "
                "become training data.")  # fmt: skip
    pending = gr.Dataframe(label="Approval queue", interactive=False, elem_id="review-queue")
    refs = gr.Textbox(label="Queue items to decide (e.g. f12 v3); empty: every item shown")
    with gr.Row():
        approve = gr.Button("Approve", elem_id="review-approve")
        reject = gr.Button("Reject")
    review_status = gr.Markdown(elem_id="review-status")
    start_loop = gr.Button("Export feedback and start the loop", variant="primary")
    loop_status = gr.Markdown()
    outputs = [versions, like_plot, correction_plot, disliked, intents, pending, loop_status]

    def load(request: gr.Request) -> tuple:
        require_agent(request, settings)
        days = pd.DataFrame(insights.by_day(store), columns=[
            "day", "version", "replies", "like_share", "correction_rate"])  # fmt: skip
        # A day with no like or dislike has no like share: left out of that plot, not drawn
        # as an "undefined" axis.
        rated_days = days.dropna(subset=["like_share"])
        return (
            _frame(insights.by_version(store), VERSION_COLUMNS), rated_days, days,
            _frame(insights.most_disliked(store), DISLIKED_COLUMNS),
            _frame(insights.unhappy_intents(store), INTENT_COLUMNS),
            _frame(queue(store, None), QUEUE_COLUMNS), loop.status(),
        )  # fmt: skip

    def decided(decision: str):
        def handler(text: str, request: gr.Request) -> tuple:
            reviewer = require_agent(request, settings)
            chosen = text.split() or [item["ref"] for item in queue(store, None)]
            for ref in chosen:
                user_errors(decide)(store, ref, decision, reviewer)
            return (f"{decision.capitalize()}: {len(chosen)} items.", "", *load(request))

        return handler

    def start(request: gr.Request) -> str:
        require_agent(request, settings)
        return loop.start()

    refresh.click(load, None, outputs, api_visibility="private")
    tab.select(load, None, outputs, api_visibility="private")
    for button, decision in ((approve, "approved"), (reject, "rejected")):
        button.click(decided(decision), refs, [review_status, refs, *outputs],
                     api_visibility="private")  # fmt: skip
    start_loop.click(start, None, loop_status, api_visibility="private")
