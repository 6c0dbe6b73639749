"""The Translate tab: text translated line by line, placeholders and numbers kept."""

from __future__ import annotations

import gradio as gr

from supportlm.prompts import LANGUAGES
from supportlm.serve.assistant import Assistant
from supportlm.serve.ui.common import (
    client_id,
    generation_settings,
    gpu,
    max_new_tokens_slider,
    shown,
)

EXAMPLES = [
    ["Your order {{Order Number}} has shipped and will arrive in 3 days.", "auto", "Spanish"],
    ["Thank you for contacting us. How can I help you today?", "English", "German"],
]


def translate_tab(assistant: Assistant, max_reply: int) -> None:
    with gr.Row():
        with gr.Column():
            text = gr.Textbox(label="Text to translate", lines=10, max_lines=20)
            with gr.Row():
                source = gr.Dropdown(
                    [("Detect automatically", "auto"), *((x, x) for x in LANGUAGES)],
                    value="auto",
                    label="From",
                )
                target = gr.Dropdown(LANGUAGES, value="French", label="To")
            max_new = max_new_tokens_slider(max_reply, 384)
            button = gr.Button("Translate", variant="primary")
        with gr.Column():
            output = gr.Textbox(
                label="Translation", lines=10, buttons=["copy"], elem_id="translate-output"
            )
            caption_md = gr.Markdown()
    gr.Examples(EXAMPLES, [text, source, target])

    @gpu
    def translate_ui(
        value,
        source_language,
        target_language,
        max_new_tokens,
        request: gr.Request,
        progress=gr.Progress(),  # noqa: B008 (Gradio injects it)
    ):
        settings = generation_settings(max_new_tokens=int(max_new_tokens))
        answers = assistant.run_task(
            "translate", value, settings, target_language=target_language,
            source_language=source_language, progress=progress,
            client_id=client_id(request, assistant.settings),
        )  # fmt: skip
        for text, caption_text, _ in shown(answers):
            yield text, caption_text

    button.click(
        translate_ui,
        [text, source, target, max_new],
        [output, caption_md],
        api_visibility="undocumented",
        api_name="translate_ui",
    )
