"""The Compare tab: base model and fine-tuned adapter answer the same question; users vote."""

from __future__ import annotations

import gradio as gr

from supportlm.serve.assistant import Assistant
from supportlm.serve.ui.chat import EXAMPLE_QUESTIONS
from supportlm.serve.ui.common import (
    client_id,
    generation_settings,
    gpu,
    max_new_tokens_slider,
    session_id,
    user_errors,
    user_facing,
)

VOTES = [
    ("Base is better", "base"),
    ("Fine-tuned is better", "tuned"),
    ("Tie", "tie"),
    ("Both are bad", "both_bad"),
]


def compare_tab(assistant: Assistant, max_reply: int) -> None:
    enabled = assistant.engine.has_adapter
    if enabled:
        gr.Markdown(
            "The same question answered by the **base model** and the **fine-tuned adapter** (one "
            "model in memory, adapter switched off and on; greedy decoding). Vote for the better "
            "answer: votes are stored for evaluation."
        )
    else:
        gr.Markdown(
            "**No fine-tuned adapter is loaded**, so there is nothing to compare. Train one with "
            "`python finetune/train.py` or set `SUPPORTLM_ADAPTER`.",
            elem_id="compare-no-adapter",
        )
    question = gr.Textbox(
        label="Customer question", value=EXAMPLE_QUESTIONS[0], interactive=enabled
    )
    max_new = max_new_tokens_slider(max_reply, 192, interactive=enabled)
    button = gr.Button("Compare", variant="primary", interactive=enabled)
    with gr.Row():
        base_answer = gr.Textbox(
            label="Base model", lines=8, interactive=False, elem_id="compare-base"
        )
        tuned_answer = gr.Textbox(
            label="Fine-tuned (adapter)", lines=8, interactive=False, elem_id="compare-tuned"
        )
    reply_ids = gr.State(("", ""))
    with gr.Row():
        vote_buttons = [
            (gr.Button(label, size="sm", interactive=enabled), choice) for label, choice in VOTES
        ]
    vote_status = gr.Markdown(elem_id="vote-status")

    @gpu
    def compare_ui(text, max_new_tokens, request: gr.Request):
        settings = generation_settings(max_new_tokens=int(max_new_tokens))
        pairs = assistant.compare(
            text,
            settings,
            client_id=client_id(request, assistant.settings),
            conversation_id=session_id(request, assistant.settings),
        )
        for base, tuned in user_facing(pairs):
            ids = (base.request_id if base else "", tuned.request_id if tuned else "")
            yield (base.text if base else ""), (tuned.text if tuned else ""), ids

    button.click(
        compare_ui,
        [question, max_new],
        [base_answer, tuned_answer, reply_ids],
        api_visibility="undocumented",
        api_name="compare_ui",
    )
    for vote_button, choice in vote_buttons:
        vote_button.click(
            _vote_handler(assistant, choice),
            reply_ids,
            vote_status,
            api_visibility="private",
            api_name=f"vote_{choice}",
        )


def _vote_handler(assistant: Assistant, choice: str):
    @user_errors
    def vote(ids: tuple[str, str], request: gr.Request) -> str:
        assistant.record_vote(*ids, choice, client_id=client_id(request, assistant.settings))
        return f"Thanks, your vote ({choice.replace('_', ' ')}) was saved."

    return vote
