"""Who may call ``/v1``: an optional API key, and the app's own login when one is configured.

``SUPPORTLM_API_KEY`` is sent as ``Authorization: Bearer KEY`` (what every OpenAI client does).
When the app requires a login (``SUPPORTLM_AUTH``), ``/v1`` requires it too: HTTP Basic with one
of those pairs, or ``Bearer user:password`` for clients that only send a bearer token. A Space
with a Hugging Face sign-in has no password to check here, so there ``/v1`` is closed unless an
API key is set. Comparisons are constant-time (`hmac.compare_digest`), and wrong secrets are
throttled per account and address with the same `LoginThrottle` as the login form.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Mapping

from supportlm.serve.admission import Busy
from supportlm.serve.settings import AppSettings
from supportlm.serve.throttle import LoginThrottle
from supportlm.serve.v1.schema import ApiError


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def _basic(value: str) -> str | None:
    try:
        return base64.b64decode(value, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None


class ApiAccess:
    """Checks a request's ``Authorization`` header; returns the caller's identity."""

    def __init__(self, settings: AppSettings, throttle: LoginThrottle | None = None) -> None:
        self.throttle = throttle or LoginThrottle()
        self.api_key = settings.api_key
        self.pairs = [f"{user}:{password}" for user, password in settings.auth_pairs() or []]
        self.closed = settings.hf_oauth and not self.api_key

    @property
    def required(self) -> bool:
        return bool(self.api_key or self.pairs or self.closed)

    def check(self, headers: Mapping[str, str], address: str | None) -> str | None:
        """The caller's identity (for rate limits); raises a 401 `ApiError` when refused."""
        if not self.required:
            return address
        if self.closed:
            raise self._refuse("This app requires a Hugging Face sign-in; set SUPPORTLM_API_KEY "
                               "to open /v1 to API clients.")  # fmt: skip
        scheme, _, value = headers.get("authorization", "").partition(" ")
        secret = value.strip() if scheme.lower() == "bearer" else None
        if scheme.lower() == "basic":
            secret = _basic(value.strip())
        if secret is None:
            raise self._refuse("Missing API key: send 'Authorization: Bearer <key>'.")
        account = secret.partition(":")[0] if ":" in secret else None
        try:
            self.throttle.check(account, address)
        except Busy as error:
            raise ApiError(
                429, str(error), type="rate_limit_error", code="too_many_failures"
            ) from error
        if self.api_key and _same(secret, self.api_key):
            return f"key:{address}"
        for pair in self.pairs:
            if _same(secret, pair):
                return f"user:{pair.partition(':')[0]}"
        self.throttle.failed(account, address)
        raise self._refuse("Invalid API key or login: send 'Authorization: Bearer <key>'.")

    @staticmethod
    def _refuse(message: str) -> ApiError:
        return ApiError(401, message, type="authentication_error", code="invalid_api_key")
