"""`Answer`: what every surface gets back from the assistant, one step of a streamed answer.

The tabs, the Gradio API, ``/v1`` and MCP all read the same fields (text, notices, intent,
hand-over, reply id), so none of them composes notices, parses a caption or rewrites an id.
"""

from __future__ import annotations

from dataclasses import dataclass

from supportlm.engines.base import StreamEvent
from supportlm.serve.handover import Routing


@dataclass(frozen=True)
class Answer:
    """The answer so far: the engine's event plus what the assistant changed and detected."""

    event: StreamEvent  # text so far, tokens, timings, finish reason, usage
    #: What was changed in what the user sent (cut, left out), for them to see.
    notices: tuple[str, ...] = ()
    #: The message's intent and whether a person takes it over (None: no classifier, or a task).
    routing: Routing | None = None

    @property
    def text(self) -> str:
        return self.event.text

    @property
    def reply_id(self) -> str:
        """The server-issued id of the reply, what feedback names (stored ones only are rated)."""
        return self.event.request_id

    @property
    def finished(self) -> bool:
        return self.event.finished

    @property
    def intent(self) -> str | None:
        return self.routing.intent if self.routing else None

    @property
    def handover(self) -> bool:
        return bool(self.routing and self.routing.handover)
