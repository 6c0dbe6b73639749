"""What is serving, as a dict an API caller can check (the ``/info`` endpoint).

Names, never server paths: a local model or adapter folder is reported by its folder name, the
embedded model by the Hub id its weights come from. ``adapter_version`` is the run folder's
content hash, the same one every stored reply carries.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from supportlm.embedded import EMBEDDED_MODEL, upstream_id
from supportlm.run_folder import SHIPPED_ADAPTER, RunFolder
from supportlm.serve.assistant import Assistant


def public_name(spec: str) -> str:
    """A model spec as a caller may see it: a Hub id or the embedded model's id as is, a local
    file or folder by its name."""
    if spec == EMBEDDED_MODEL:
        return upstream_id(spec)
    path = Path(spec).expanduser()
    return path.name if path.exists() else spec


_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@]*@")
_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://\S+")
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])(?:~|\.{1,2})?/(?:[\w.+-]+/)*(?P<name>[\w.+-]+)/?")


def public_text(text: str) -> str:
    """`text` (an engine description, a serving note) fit for a public page: a URL keeps its
    scheme and host only (no password, user, path or query), a server path becomes its last
    name. The log keeps the whole text."""
    text = _CREDENTIALS.sub(r"\g<scheme>", text)
    text = _URL.sub(lambda match: _origin(match.group(0)), text)
    pieces = re.split(r"([a-zA-Z][a-zA-Z0-9+.-]*://[^\s/]+)", text)  # keep origins whole
    return "".join(
        piece if i % 2 else _ABSOLUTE_PATH.sub(lambda m: m.group("name"), piece)
        for i, piece in enumerate(pieces)
    )


def _origin(url: str) -> str:
    scheme, _, rest = url.partition("://")
    host = re.split(r"[/?#]", rest, maxsplit=1)[0]
    trailing = "".join(ch for ch in rest[len(host) :][-1:] if ch in ".,;:)")
    return f"{scheme}://{host}{trailing}"


def serving_info(assistant: Assistant) -> dict[str, Any]:
    """The engine, the backend setting and why it chose that engine, the model and the adapter."""
    plan, engine = assistant.plan, assistant.engine
    adapter = engine.adapter
    shipped = RunFolder(SHIPPED_ADAPTER)
    return {
        "engine": engine.name,
        "backend": plan.settings.backend,  # what was asked for: "auto" unless set
        "why": public_text(plan.backend_reason),
        "model": public_name(plan.model),
        "adapter": adapter.name if adapter else None,
        "adapter_version": adapter.version if adapter else None,
        "adapter_shipped": bool(
            adapter and shipped.is_adapter() and adapter.version == shipped.adapter_version()
        ),
    }
