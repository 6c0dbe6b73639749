"""The Summarise tab: a ticket, thread or transcript (typed or uploaded) summarised in a style."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from supportlm.prompts import SUMMARY_STYLES
from supportlm.serve.assistant import Assistant
from supportlm.serve.ui.common import (
    client_id,
    generation_settings,
    gpu,
    max_new_tokens_slider,
    read_upload,
    shown,
    user_errors,
)

SUMMARY_STYLE_LABELS = {
    "paragraph": "Short paragraph",
    "bullets": "Bullet points",
    "action_items": "Action items for a support agent",
}

EXAMPLE_TICKET = (
    "Customer: Hi, I ordered a pair of running shoes (order #48213) two weeks ago and they still "
    "have not arrived. The tracking page has said 'in transit' for nine days. I need them for a "
    "race next Saturday. Can you send a replacement by express delivery or refund me?\n"
    "Agent: I'm sorry about the delay. I can see the parcel is stuck at the regional depot. I "
    "have opened an investigation with the carrier.\n"
    "Customer: OK, but I really need an answer by Wednesday, otherwise please refund me."
)


def summarise_tab(assistant: Assistant, max_reply: int) -> None:
    with gr.Row():
        with gr.Column():
            text = gr.Textbox(
                label="Text to summarise",
                lines=12,
                max_lines=20,
                placeholder="Paste a ticket, an e-mail thread or a chat transcript.",
            )
            token_count = gr.Markdown(elem_id="summary-token-count")
            upload = gr.File(
                label="…or upload a .txt / .md file",
                file_types=[".txt", ".md"],
                type="filepath",
                height=110,
            )
            style = gr.Radio(
                [
                    (label, key)
                    for key, label in SUMMARY_STYLE_LABELS.items()
                    if key in SUMMARY_STYLES
                ],
                value="paragraph",
                label="Style",
            )
            max_new = max_new_tokens_slider(max_reply, 192)
            button = gr.Button("Summarise", variant="primary")
        with gr.Column():
            output = gr.Textbox(
                label="Summary", lines=12, buttons=["copy"], elem_id="summary-output"
            )
            caption_md = gr.Markdown()
    gr.Examples([[EXAMPLE_TICKET, "action_items"]], [text, style])

    @user_errors
    def load_file(path: str | None) -> Any:
        if not path:
            return gr.skip()
        return read_upload(Path(path), assistant.settings.max_upload_bytes)

    upload.upload(load_file, upload, text, api_visibility="private")

    def show_token_count(value: str) -> str:
        value = (value or "")[: assistant.settings.max_input_chars * 2]  # bounded work
        count = assistant.count_tokens(value)
        limit = assistant.settings.max_input_tokens
        over = f" (over the {limit}-token limit: it will be cut)" if count > limit else ""
        return f"<small>{count} tokens{over}</small>"

    text.change(
        show_token_count,
        text,
        token_count,
        api_visibility="private",
        show_progress="hidden",
        trigger_mode="always_last",
    )

    @gpu
    def summarize_ui(value, style_key, max_new_tokens, request: gr.Request, progress=gr.Progress()):  # noqa: B008
        settings = generation_settings(max_new_tokens=int(max_new_tokens))
        answers = assistant.run_task(
            "summarize", value, settings, style=style_key, progress=progress,
            client_id=client_id(request, assistant.settings),
        )  # fmt: skip
        for text, caption_text, _ in shown(answers):
            yield text, caption_text

    button.click(
        summarize_ui,
        [text, style, max_new],
        [output, caption_md],
        api_visibility="undocumented",
        api_name="summarize_ui",
    )
