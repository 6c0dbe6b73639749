"""The Gradio app: one module per tab plus the API endpoints (the only Gradio import).

`build_demo` puts the tabs together around one shared `Assistant`; each tab module builds its own
widgets and events and can be changed without reading the others.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from supportlm.engines.base import Engine
from supportlm.serve.assistant import Assistant
from supportlm.serve.backends import build_engine
from supportlm.serve.info import public_text
from supportlm.serve.plan import ServingPlan
from supportlm.serve.settings import AppSettings
from supportlm.serve.switching import AdapterSwitcher
from supportlm.serve.ui.about import about_markdown, about_tab
from supportlm.serve.ui.api import register_api
from supportlm.serve.ui.chat import PRIVACY_NOTICE, chat_tab
from supportlm.serve.ui.common import max_reply_tokens, session_id
from supportlm.serve.ui.compare import compare_tab
from supportlm.serve.ui.insights import insights_tab, tab_visible
from supportlm.serve.ui.summarise import summarise_tab
from supportlm.serve.ui.translate import translate_tab


def start_assistant(
    plan: ServingPlan | None = None, *, engine: Engine | None = None
) -> tuple[Assistant, AdapterSwitcher]:
    """The shared `Assistant` for `plan`, and its watcher for promoted adapters, started."""
    plan = plan or AppSettings.from_env().resolve()
    assistant = Assistant(engine or build_engine(plan), plan)
    switcher = AdapterSwitcher(assistant)  # a promoted adapter is served without a restart
    switcher.start()
    return assistant, switcher


def build_demo(
    plan: ServingPlan | None = None,
    *,
    engine: Engine | None = None,
    assistant: Assistant | None = None,
    switcher: AdapterSwitcher | None = None,
) -> gr.Blocks:
    """The whole app around one shared model; `engine` or `assistant` skip loading (tests)."""
    if assistant is None:
        assistant, switcher = start_assistant(plan, engine=engine)
    settings = assistant.settings
    max_reply = max_reply_tokens(assistant.context_length, settings.max_input_tokens)

    def header() -> str:  # on every page load: the engine may have switched adapters since
        tuned = " with a fine-tuned LoRA adapter" if assistant.engine.has_adapter else ""
        return (
            f"# supportlm\nA customer-service assistant on a small language model{tuned}. "
            f"Serving **{public_text(assistant.engine.description)}**."
        )

    # A backstop: uploads are deleted once read, or after two minutes (supportlm.serve.ui.guard).
    with gr.Blocks(
        title="supportlm · customer-service assistant", fill_width=False, delete_cache=(3600, 3600)
    ) as demo:
        heading = gr.Markdown()
        if settings.hf_oauth:
            gr.LoginButton()
        if assistant.feedback_notice:
            gr.Markdown(f"⚠️ {assistant.feedback_notice}", elem_id="feedback-off")
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                privacy = chat_tab(assistant, max_reply)
            with gr.Tab("Summarise", id="summarise"):
                summarise_tab(assistant, max_reply)
            with gr.Tab("Translate", id="translate"):
                translate_tab(assistant, max_reply)
            with gr.Tab("Compare", id="compare"):
                compare_tab(assistant, max_reply)
            with gr.Tab("Insights", id="insights") as insights:
                insights_tab(assistant, insights)
            with gr.Tab("About", id="about"):
                serving = about_tab(assistant)
        register_api(assistant, switcher)

        def on_load(request: gr.Request) -> tuple[str, str, str, gr.Tab]:
            notice = PRIVACY_NOTICE.format(conversation=session_id(request, settings))
            visible = tab_visible(request, settings)
            return header(), about_markdown(assistant), notice, gr.Tab(visible=visible)

        # Private: what a page shows on load is no API endpoint (nor an MCP tool).
        outputs = [heading, serving, privacy, insights]
        demo.load(on_load, None, outputs, api_visibility="private")
    # The assistant's admission layer bounds generation across all events; Gradio's per-listener
    # limit only caps the worker threads one listener may hold while they wait there.
    limit = assistant.admission.concurrency + assistant.admission.max_queue
    demo.queue(default_concurrency_limit=limit, max_size=settings.max_queue)
    return demo


def launch_options(settings: AppSettings) -> dict[str, Any]:
    """`demo.launch` keywords from the settings: the upload limit and the optional login."""
    return {"max_file_size": settings.max_upload_bytes, "auth": settings.auth_pairs()}
