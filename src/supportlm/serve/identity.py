"""Conversation ids the server issues, never a client's own string.

Gradio names a browser session by a ``session_hash`` the client chooses: any text, of any size
(an e-mail address and a phone number were sent as one, and a 5,000,000-character one). Stored
raw it would keep personal data unredacted and let one visitor grow the database at will. The
stored id is a keyed hash of it instead (HMAC-SHA-256, 24 hex digits): the same session always
gets the same id, so a customer can quote it for erasure, and nothing of the client's text is
kept. The key is ``SUPPORTLM_SECRET``; without it, a random key per process (ids then change
when the app restarts, as browser sessions do; replicas need the variable to agree).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

_PROCESS_KEY = secrets.token_bytes(32)
PREFIX = "c-"


def conversation_id(session_hash: str | None, secret: str | None = None) -> str | None:
    """The stored id of the conversation a client calls `session_hash` (None: no session)."""
    if not session_hash:
        return None
    key = secret.encode("utf-8") if secret else _PROCESS_KEY
    data = str(session_hash).encode("utf-8", "surrogatepass")
    return PREFIX + hmac.new(key, data, hashlib.sha256).hexdigest()[:24]
