"""The Insights tab: satisfaction per adapter version, what customers disliked, the approval
queue, and a button that exports the feedback and starts the loop (`feedback.py loop`).

Everything here shows stored conversations or steers training, so it is for agents only:

* with a login (``SUPPORTLM_AUTH`` or a Hugging Face sign-in), for the agents among the signed-in
  users (``SUPPORTLM_AGENTS``); the tab is hidden from everyone else;
* without a login nobody is signed in, so the tab is off, unless the operator set
  ``SUPPORTLM_ADMIN_TOKEN``: then it opens to whoever types that token.

Every handler checks again, as a hidden tab is no protection: Gradio runs any event by its index.
"""

from __future__ import annotations

import hmac
import subprocess
import threading
from pathlib import Path

import gradio as gr
import pandas as pd

from supportlm.cli import subprocess_command, subprocess_env
from supportlm.feedback import insights
from supportlm.feedback.review import decide, queue
from supportlm.serve.assistant import Assistant
from supportlm.serve.settings import AppSettings
from supportlm.serve.ui.common import signed_in_user, user_errors

VERSION_COLUMNS = ["version", "replies", "like_share", "correction_rate", "likes", "dislikes",
                   "corrections", "votes_tuned", "votes_base", "votes_tie", "votes_both_bad",
                   "first_day", "last_day"]  # fmt: skip
QUEUE_COLUMNS = ["ref", "kind", "author", "context", "question", "reply", "correction",
                 "created_at"]  # fmt: skip
DISLIKED_COLUMNS = ["question", "dislikes", "corrections", "intent"]
INTENT_COLUMNS = ["intent", "replies", "unhappy", "unhappy_share"]


OPERATOR = "operator"  # the reviewer's name when the tab was opened with the admin token
OFF_WITHOUT_LOGIN = (
    "Insights are off: this app has no login, so anyone could read the stored conversations "
    "and approve training data. Set SUPPORTLM_AUTH (and SUPPORTLM_AGENTS) for agents, or "
    "SUPPORTLM_ADMIN_TOKEN to open this tab with that token."
)


def has_login(settings: AppSettings) -> bool:
    return bool(settings.auth or settings.hf_oauth)


def is_agent(request: gr.Request | None, settings: AppSettings) -> bool:
    """Whether this caller is a signed-in agent (never true without a login)."""
    return has_login(settings) and signed_in_user(request) in settings.agent_names()


def tab_visible(request: gr.Request | None, settings: AppSettings) -> bool:
    """Show the tab to agents, and without a login to everyone (it says why it is off, or asks
    for the admin token)."""
    return is_agent(request, settings) or not has_login(settings)


def require_agent(request: gr.Request | None, settings: AppSettings, token: str = "") -> str:
    """The reviewer's name; raises unless the caller is an agent (or, without a login, sent the
    admin token)."""
    if has_login(settings):
        if not is_agent(request, settings):
            raise gr.Error("Insights are for signed-in agents.")
        return str(signed_in_user(request))
    expected = settings.admin_token
    if not expected:
        raise gr.Error(OFF_WITHOUT_LOGIN)
    if not token:
        raise gr.Error("Type the admin token (SUPPORTLM_ADMIN_TOKEN) above to open Insights.")
    if not hmac.compare_digest(str(token).encode(), expected.encode()):
        raise gr.Error("Wrong admin token: Insights stay closed.")
    return OPERATOR


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
            command = subprocess_command(
                "feedback", "--db", str(self.db), "loop", "--outputs_dir", self.outputs_dir
            )
            with self.log.open("w") as out:
                self.process = subprocess.Popen(
                    command, env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT
                )
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
    if not has_login(settings) and not settings.admin_token:
        gr.Markdown(f"⚠️ {OFF_WITHOUT_LOGIN}", elem_id="insights-off")
        return
    token = gr.Textbox(
        label="Admin token (SUPPORTLM_ADMIN_TOKEN)", type="password", elem_id="insights-token",
        visible=not has_login(settings),
    )  # fmt: skip
    refresh = gr.Button("Refresh")
    access_status = gr.Markdown(elem_id="insights-access")
    widgets = InsightsWidgets()
    shown = gr.State([])  # the queue refs this browser was shown: what "approve all" means
    loop = LoopProcess(store.path)
    outputs = [*widgets.frames, widgets.loop_status, shown, access_status]

    def load(secret: str, request: gr.Request) -> tuple:
        try:
            require_agent(request, settings, secret)
        except gr.Error as error:  # opening the tab is not an error: say why it stays empty
            return (*[None] * len(widgets.frames), "", [], f"⚠️ {error.message}")
        return (*_tables(store), loop.status(), [item["ref"] for item in queue(store)], "")

    def decided(decision: str):
        def handler(text: str, refs_shown: list, secret: str, request: gr.Request) -> tuple:
            reviewer = require_agent(request, settings, secret)
            chosen = text.split() or list(refs_shown)
            unseen = [ref for ref in chosen if ref not in refs_shown]
            if unseen:
                raise gr.Error(f"{', '.join(unseen)} is not in the queue shown; refresh first.")
            for ref in chosen:
                user_errors(decide)(store, ref, decision, reviewer)
            return (f"{decision.capitalize()}: {len(chosen)} items.", "", *load(secret, request))

        return handler

    def start(secret: str, request: gr.Request) -> str:
        require_agent(request, settings, secret)
        return loop.start()

    for event in (refresh.click, tab.select, token.submit):
        event(load, token, outputs, api_visibility="private")
    for button, decision in ((widgets.approve, "approved"), (widgets.reject, "rejected")):
        button.click(decided(decision), [widgets.refs, shown, token],
                     [widgets.review_status, widgets.refs, *outputs],
                     api_visibility="private")  # fmt: skip
    widgets.start_loop.click(start, token, widgets.loop_status, api_visibility="private")


class InsightsWidgets:
    """The tab's tables, plots and buttons, in page order."""

    def __init__(self) -> None:
        self.versions = gr.Dataframe(
            label="Satisfaction per adapter version", interactive=False,
            elem_id="insights-versions",
        )  # fmt: skip
        # Points, not lines: Gradio's LinePlot draws a series of one day as nothing (a line
        # needs two points, and its points show only on hover), and a new adapter version starts
        # with one day. The margin around 0..1 keeps a point at 0 or 1 whole.
        share = {"x": "day", "color": "version", "y_lim": [-0.05, 1.05]}
        self.like_plot = gr.ScatterPlot(
            y="like_share", label="Like share per day", elem_id="insights-like-share", **share
        )
        self.correction_plot = gr.ScatterPlot(
            y="correction_rate", label="Correction rate per day", **share
        )
        with gr.Row():
            self.disliked = gr.Dataframe(
                label="Most disliked or corrected questions", interactive=False
            )
            self.intents = gr.Dataframe(label="Intents by unhappy share", interactive=False)
        gr.Markdown(
            "### Waiting for approval\nOnly approved rows and signed-in agents' feedback become "
            "training data, exactly as shown here (earlier turns included)."
        )
        self.pending = gr.Dataframe(
            label="Approval queue", interactive=False, elem_id="review-queue"
        )
        self.refs = gr.Textbox(label="Queue items to decide (e.g. f12 v3); empty: every item shown")
        with gr.Row():
            self.approve = gr.Button("Approve", elem_id="review-approve")
            self.reject = gr.Button("Reject")
        self.review_status = gr.Markdown(elem_id="review-status")
        self.start_loop = gr.Button("Export feedback and start the loop", variant="primary")
        self.loop_status = gr.Markdown()

    @property
    def frames(self) -> list:
        return [self.versions, self.like_plot, self.correction_plot, self.disliked, self.intents,
                self.pending]  # fmt: skip


def _tables(store) -> tuple:
    days = pd.DataFrame(insights.by_day(store), columns=[
        "day", "version", "replies", "like_share", "correction_rate"])  # fmt: skip
    # A day with no like or dislike has no like share: left out of that plot, not drawn as an
    # "undefined" axis.
    rated_days = days.dropna(subset=["like_share"])
    return (
        _frame(insights.by_version(store), VERSION_COLUMNS), rated_days, days,
        _frame(insights.most_disliked(store), DISLIKED_COLUMNS),
        _frame(insights.unhappy_intents(store), INTENT_COLUMNS),
        _frame(queue(store), QUEUE_COLUMNS),
    )  # fmt: skip
