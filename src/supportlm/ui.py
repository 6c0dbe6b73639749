"""The Gradio app: chat, summarise, translate, compare and about tabs (the only Gradio import).

Public API endpoints (for `gradio_client`) are plain functions registered with `gr.api`, so their
contract stays simple whatever the UI shows: ``/chat`` streams the reply text, ``/summarize`` and
``/translate`` return strings. The UI's own events are undocumented endpoints with other names.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import gradio as gr

from supportlm.errors import SupportLMError
from supportlm.generation import Engine, GenerationSettings, StreamEvent
from supportlm.prompts import LANGUAGES, SUMMARY_STYLES
from supportlm.serving import AppSettings, Assistant, build_engine, flatten_metrics, gpu

logger = logging.getLogger(__name__)

T = TypeVar("T")

EXAMPLE_QUESTIONS = [
    "I want to cancel my order, how do I do that?",
    "My package hasn't arrived yet. Can you check where it is?",
    "How can I get a refund for a damaged item?",
    "I forgot my password and can't log in to my account.",
]

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

_DEFAULTS = GenerationSettings()
_VOTES = [
    ("Base is better", "base"),
    ("Fine-tuned is better", "tuned"),
    ("Tie", "tie"),
    ("Both are bad", "both_bad"),
]


def _generation_settings(
    temperature: float, top_p: float, max_new_tokens: int, repetition_penalty: float
) -> GenerationSettings:
    try:
        return GenerationSettings(
            max_new_tokens=int(max_new_tokens),
            temperature=float(temperature),
            top_p=float(top_p),
            repetition_penalty=float(repetition_penalty),
        )
    except SupportLMError as error:
        raise gr.Error(str(error)) from error


def _user_facing(events: Iterator[T]) -> Iterator[T]:
    """Turn a failure inside generation into a message for the user instead of a dead request.

    The engine recovers on its own (its lock and thread are released), so the next request works.
    """
    try:
        yield from events
    except gr.Error:
        raise
    except SupportLMError as error:
        raise gr.Error(str(error)) from error
    except Exception as error:
        logger.exception("Generation failed")
        raise gr.Error(
            f"Sorry, the model failed to answer ({type(error).__name__}: {error}). "
            "Please try again."
        ) from error


def _notify(notices: list[str]) -> str:
    for notice in notices:
        gr.Warning(notice)
    return "".join(f"⚠️ {notice}  \n" for notice in notices)


def _texts(updates: Iterator[tuple[str, str]]) -> Iterator[str]:
    """The reply texts of (text, caption) updates, each new one once (API streams)."""
    last = None
    for text, _ in _user_facing(updates):
        if text != last:
            last = text
            yield text
    if last is None:
        yield ""


def _caption(event: StreamEvent, notices: str = "") -> str:
    return f"{notices}<small>{event.caption()}</small>"


def _capped(assistant: Assistant, text: str) -> tuple[str, str]:
    text, notice = assistant.cap(text)
    return text, _notify([notice] if notice else [])


def build_demo(
    settings: AppSettings | None = None,
    *,
    engine: Engine | None = None,
    assistant: Assistant | None = None,
) -> gr.Blocks:
    """The whole app around one shared model; `engine` or `assistant` skip loading (tests)."""
    if assistant is None:
        settings = settings or AppSettings.from_env()
        assistant = Assistant(engine or build_engine(settings), settings)
    settings = assistant.settings
    engine = assistant.engine
    max_reply = max(16, min(1024, assistant.context_length - settings.max_input_tokens - 64))

    # ------------------------------------------------------------------ shared handlers
    @gpu
    def chat_events(
        message: str,
        history: list[dict[str, Any]] | None,
        system_prompt: str,
        generation: GenerationSettings,
    ) -> Iterator[tuple[str, str]]:
        request = assistant.chat_request(message, history, system_prompt, generation)
        notices = _notify(request.notices)
        for event in assistant.stream(request.prompt_ids, generation):
            yield event.text, _caption(event, notices)

    @gpu
    def summary_events(text: str, style: str, generation: GenerationSettings, progress=None):
        text, notices = _capped(assistant, text)
        for event in assistant.summarize(text, style, generation, progress=progress):
            yield event.text, _caption(event, notices)

    @gpu
    def translation_events(
        text: str, target: str, source: str, generation: GenerationSettings, progress=None
    ):
        text, notices = _capped(assistant, text)
        events = assistant.translate(
            text, target, generation, source_language=source, progress=progress
        )
        for event in events:
            yield event.text, _caption(event, notices)

    def check_text(text: str, what: str) -> None:
        if not text or not text.strip():
            raise gr.Error(f"Please paste or upload the text to {what}.")

    with gr.Blocks(title="supportlm · customer-service assistant", fill_width=False) as demo:
        tuned = " with a fine-tuned LoRA adapter" if engine.has_adapter else ""
        gr.Markdown(
            f"# supportlm\nA customer-service assistant on a small language model{tuned}. "
            f"Serving **{engine.description}**."
        )
        with gr.Tabs():
            # -------------------------------------------------------------- chat
            with gr.Tab("Chat", id="chat"):
                with gr.Accordion("Generation settings", open=False):
                    system_prompt = gr.Textbox(
                        assistant.system_prompt, label="System prompt", lines=3
                    )
                    temperature = gr.Slider(
                        0.0,
                        1.5,
                        _DEFAULTS.temperature,
                        step=0.05,
                        label="Temperature (0 = greedy)",
                    )
                    top_p = gr.Slider(0.05, 1.0, _DEFAULTS.top_p, step=0.05, label="Top-p")
                    max_new_tokens = gr.Slider(
                        16,
                        max_reply,
                        min(_DEFAULTS.max_new_tokens, max_reply),
                        step=16,
                        label="Max new tokens",
                    )
                    repetition_penalty = gr.Slider(
                        1.0,
                        2.0,
                        _DEFAULTS.repetition_penalty,
                        step=0.05,
                        label="Repetition penalty",
                    )
                chat_settings = [
                    system_prompt,
                    temperature,
                    top_p,
                    max_new_tokens,
                    repetition_penalty,
                ]
                caption = gr.Markdown(elem_id="chat-caption", render=False)
                chatbot = gr.Chatbot(
                    label="Assistant",
                    height=440,
                    placeholder="Ask a customer-service question, or pick an example.",
                    editable="user",
                    elem_id="chatbot",
                )

                def respond(message, history, prompt, temp, p, max_new, penalty):
                    generation = _generation_settings(temp, p, max_new, penalty)
                    yield from _user_facing(chat_events(message, history, prompt, generation))

                gr.ChatInterface(
                    respond,
                    chatbot=chatbot,
                    additional_inputs=chat_settings,
                    additional_outputs=[caption],
                    editable=True,
                    examples=[[question] for question in EXAMPLE_QUESTIONS],
                    api_name="chat_ui",
                    api_visibility="undocumented",
                    fill_height=False,
                )
                caption.render()
                with gr.Accordion("Correct the last answer", open=False):
                    correction = gr.Textbox(
                        label="What should the assistant have answered?", lines=3
                    )
                    send_correction = gr.Button("Save correction", size="sm")
                feedback_status = gr.Markdown(elem_id="feedback-status")

                def generation_record(prompt, temp, p, max_new, penalty) -> dict[str, Any]:
                    record = _generation_settings(temp, p, max_new, penalty).to_dict()
                    return {**record, "system_prompt": prompt}

                def on_like(history, prompt, temp, p, max_new, penalty, like: gr.LikeData):
                    if like.liked in (True, "Like"):
                        kind = "like"
                    elif like.liked in (False, "Dislike"):
                        kind = "dislike"
                    else:
                        return gr.skip()
                    index = like.index if isinstance(like.index, int) else like.index[0]
                    record = generation_record(prompt, temp, p, max_new, penalty)
                    try:
                        assistant.record_feedback(kind, history, index, record)
                    except SupportLMError as error:
                        raise gr.Error(str(error)) from error
                    return f"Thanks, your {kind} was saved."

                chatbot.like(
                    on_like,
                    [chatbot, *chat_settings],
                    feedback_status,
                    api_visibility="undocumented",
                    api_name="like",
                )

                def on_correction(history, answer, prompt, temp, p, max_new, penalty):
                    replies = [i for i, m in enumerate(history or []) if m["role"] == "assistant"]
                    if not replies:
                        raise gr.Error("There is no answer to correct yet.")
                    record = generation_record(prompt, temp, p, max_new, penalty)
                    try:
                        assistant.record_feedback(
                            "correction", history, replies[-1], record, corrected_answer=answer
                        )
                    except SupportLMError as error:
                        raise gr.Error(str(error)) from error
                    return "", "Thanks, your correction was saved."

                send_correction.click(
                    on_correction,
                    [chatbot, correction, *chat_settings],
                    [correction, feedback_status],
                    api_visibility="undocumented",
                    api_name="correct",
                )

            # -------------------------------------------------------------- summarise
            with gr.Tab("Summarise", id="summarise"):
                with gr.Row():
                    with gr.Column():
                        summary_input = gr.Textbox(
                            label="Text to summarise",
                            lines=12,
                            max_lines=20,
                            placeholder="Paste a ticket, an e-mail thread or a chat transcript.",
                        )
                        token_count = gr.Markdown(elem_id="summary-token-count")
                        summary_file = gr.File(
                            label="…or upload a .txt / .md file",
                            file_types=[".txt", ".md"],
                            type="filepath",
                            height=110,
                        )
                        summary_style = gr.Radio(
                            [
                                (label, key)
                                for key, label in SUMMARY_STYLE_LABELS.items()
                                if key in SUMMARY_STYLES
                            ],
                            value="paragraph",
                            label="Style",
                        )
                        summary_max_new = gr.Slider(
                            16, max_reply, min(192, max_reply), step=16, label="Max new tokens"
                        )
                        summary_button = gr.Button("Summarise", variant="primary")
                    with gr.Column():
                        summary_output = gr.Textbox(
                            label="Summary", lines=12, buttons=["copy"], elem_id="summary-output"
                        )
                        summary_caption = gr.Markdown()
                gr.Examples([[EXAMPLE_TICKET, "action_items"]], [summary_input, summary_style])

                def load_file(path: str | None) -> Any:
                    if not path:
                        return gr.skip()
                    return Path(path).read_text(encoding="utf-8", errors="replace")

                summary_file.upload(
                    load_file, summary_file, summary_input, api_visibility="undocumented"
                )

                def show_token_count(text: str) -> str:
                    count = assistant.count_tokens(text or "")
                    limit = settings.max_input_tokens
                    over = (
                        f" (over the {limit}-token limit: it will be cut)" if count > limit else ""
                    )
                    return f"<small>{count} tokens{over}</small>"

                summary_input.change(
                    show_token_count,
                    summary_input,
                    token_count,
                    api_visibility="undocumented",
                    show_progress="hidden",
                    trigger_mode="always_last",
                )

                def summarize_ui(text, style, max_new, progress=gr.Progress()):  # noqa: B008
                    check_text(text, "summarise")
                    generation = GenerationSettings(max_new_tokens=int(max_new))
                    yield from _user_facing(summary_events(text, style, generation, progress))

                summary_button.click(
                    summarize_ui,
                    [summary_input, summary_style, summary_max_new],
                    [summary_output, summary_caption],
                    api_visibility="undocumented",
                    api_name="summarize_ui",
                )

            # -------------------------------------------------------------- translate
            with gr.Tab("Translate", id="translate"):
                with gr.Row():
                    with gr.Column():
                        translate_input = gr.Textbox(
                            label="Text to translate", lines=10, max_lines=20
                        )
                        with gr.Row():
                            source_language = gr.Dropdown(
                                [("Detect automatically", "auto"), *((x, x) for x in LANGUAGES)],
                                value="auto",
                                label="From",
                            )
                            target_language = gr.Dropdown(LANGUAGES, value="French", label="To")
                        translate_max_new = gr.Slider(
                            16, max_reply, min(384, max_reply), step=16, label="Max new tokens"
                        )
                        translate_button = gr.Button("Translate", variant="primary")
                    with gr.Column():
                        translate_output = gr.Textbox(
                            label="Translation",
                            lines=10,
                            buttons=["copy"],
                            elem_id="translate-output",
                        )
                        translate_caption = gr.Markdown()
                gr.Examples(
                    [
                        [
                            "Your order {{Order Number}} has shipped and will arrive in 3 days.",
                            "auto",
                            "Spanish",
                        ],
                        [
                            "Thank you for contacting us. How can I help you today?",
                            "English",
                            "German",
                        ],
                    ],
                    [translate_input, source_language, target_language],
                )

                def translate_ui(text, source, target, max_new, progress=gr.Progress()):  # noqa: B008
                    check_text(text, "translate")
                    generation = GenerationSettings(max_new_tokens=int(max_new))
                    yield from _user_facing(
                        translation_events(text, target, source, generation, progress)
                    )

                translate_button.click(
                    translate_ui,
                    [translate_input, source_language, target_language, translate_max_new],
                    [translate_output, translate_caption],
                    api_visibility="undocumented",
                    api_name="translate_ui",
                )

            # -------------------------------------------------------------- compare
            with gr.Tab("Compare", id="compare"):
                if engine.has_adapter:
                    gr.Markdown(
                        "The same question answered by the **base model** and the **fine-tuned "
                        "adapter** (one model in memory, adapter switched off and on; greedy "
                        "decoding). Vote for the better answer: votes are stored for evaluation."
                    )
                else:
                    gr.Markdown(
                        "**No fine-tuned adapter is loaded**, so there is nothing to compare. "
                        "Train one with `python finetune/train.py` or set `SUPPORTLM_ADAPTER`.",
                        elem_id="compare-no-adapter",
                    )
                compare_question = gr.Textbox(
                    label="Customer question",
                    value=EXAMPLE_QUESTIONS[0],
                    interactive=engine.has_adapter,
                )
                compare_max_new = gr.Slider(
                    16,
                    max_reply,
                    min(192, max_reply),
                    step=16,
                    label="Max new tokens",
                    interactive=engine.has_adapter,
                )
                compare_button = gr.Button(
                    "Compare", variant="primary", interactive=engine.has_adapter
                )
                with gr.Row():
                    base_answer = gr.Textbox(
                        label="Base model", lines=8, interactive=False, elem_id="compare-base"
                    )
                    tuned_answer = gr.Textbox(
                        label="Fine-tuned (adapter)",
                        lines=8,
                        interactive=False,
                        elem_id="compare-tuned",
                    )
                with gr.Row():
                    vote_buttons = [
                        (gr.Button(label, size="sm", interactive=engine.has_adapter), choice)
                        for label, choice in _VOTES
                    ]
                vote_status = gr.Markdown(elem_id="vote-status")

                @gpu
                def compare_events(question: str, generation: GenerationSettings):
                    request = assistant.chat_request(question, [], None, generation)
                    _notify(request.notices)
                    base = ""
                    for event in assistant.stream(
                        request.prompt_ids, generation, use_adapter=False
                    ):
                        base = event.text
                        yield base, ""
                    for event in assistant.stream(request.prompt_ids, generation, use_adapter=True):
                        yield base, event.text

                def compare_ui(question, max_new):
                    generation = GenerationSettings(max_new_tokens=int(max_new))
                    yield from _user_facing(compare_events(question, generation))

                compare_button.click(
                    compare_ui,
                    [compare_question, compare_max_new],
                    [base_answer, tuned_answer],
                    api_visibility="undocumented",
                    api_name="compare_ui",
                )

                def make_vote(choice: str):
                    def vote(question, base, tuned, max_new):
                        record = GenerationSettings(max_new_tokens=int(max_new)).to_dict()
                        try:
                            assistant.record_vote(question, base, tuned, choice, record)
                        except SupportLMError as error:
                            raise gr.Error(str(error)) from error
                        return f"Thanks, your vote ({choice.replace('_', ' ')}) was saved."

                    return vote

                for button, choice in vote_buttons:
                    button.click(
                        make_vote(choice),
                        [compare_question, base_answer, tuned_answer, compare_max_new],
                        vote_status,
                        api_visibility="undocumented",
                        api_name=f"vote_{choice}",
                    )

            # -------------------------------------------------------------- about
            with gr.Tab("About", id="about"):
                gr.Markdown(_about_markdown(assistant), elem_id="about-serving")
                metrics, loss_plot = assistant.adapter_report()
                if metrics:
                    gr.Dataframe(
                        [list(row) for row in flatten_metrics(metrics)],
                        headers=["metric", "value"],
                        label="Adapter metrics (metrics.json)",
                        interactive=False,
                    )
                if loss_plot is not None:
                    gr.Image(str(loss_plot), label="Training loss", interactive=False)

        # ------------------------------------------------------------------ API
        default_prompt = assistant.system_prompt

        def chat(
            message: str,
            history: list[dict] | None = None,
            system_prompt: str = default_prompt,
            temperature: float = _DEFAULTS.temperature,
            top_p: float = _DEFAULTS.top_p,
            max_new_tokens: int = _DEFAULTS.max_new_tokens,
            repetition_penalty: float = _DEFAULTS.repetition_penalty,
        ) -> Iterator[str]:
            """Answer `message` given the earlier `history` (role/content dicts); streams text."""
            generation = _generation_settings(
                temperature, top_p, max_new_tokens, repetition_penalty
            )
            yield from _texts(chat_events(message, history, system_prompt, generation))

        def summarize(
            text: str, style: str = "paragraph", max_new_tokens: int = 192
        ) -> Iterator[str]:
            """Summarise `text`: style is paragraph, bullets or action_items; streams text."""
            check_text(text, "summarise")
            generation = _generation_settings(0.0, 1.0, max_new_tokens, 1.1)
            yield from _texts(summary_events(text, style, generation))

        def translate(
            text: str,
            target_language: str = "French",
            source_language: str = "auto",
            max_new_tokens: int = 384,
        ) -> Iterator[str]:
            """Translate `text` into `target_language` (source auto-detected by default)."""
            check_text(text, "translate")
            generation = _generation_settings(0.0, 1.0, max_new_tokens, 1.1)
            yield from _texts(
                translation_events(text, target_language, source_language, generation)
            )

        gr.api(chat, api_name="chat")
        gr.api(summarize, api_name="summarize")
        gr.api(translate, api_name="translate")

    demo.queue(default_concurrency_limit=settings.concurrency, max_size=settings.max_queue)
    return demo


def _about_markdown(assistant: Assistant) -> str:
    settings = assistant.settings
    engine = assistant.engine
    lines = [
        "## What is serving",
        f"- **Engine:** {engine.description}",
        f"- **Backend:** {engine.name}",
        f"- **Model:** `{settings.model}`",
        f"- **Adapter:** `{settings.adapter}`" if settings.adapter else "- **Adapter:** none",
        f"- **Context window:** {assistant.context_length} tokens; inputs are cut at "
        f"{settings.max_input_chars} characters / {settings.max_input_tokens} tokens",
        f"- **Concurrency:** {settings.concurrency} requests at once, "
        f"{settings.max_queue} waiting at most",
    ]
    if settings.notes:
        lines += ["", "### How this was chosen", *(f"- {note}" for note in settings.notes)]
    if settings.adapter and assistant.adapter_report() == (None, None):
        lines += ["", "The adapter folder has no `metrics.json` or `loss.png`."]
    return "\n".join(lines)
