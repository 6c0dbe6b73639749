"""PII redaction: e-mail addresses, payment card numbers and phone numbers become placeholders.

Redaction is a pattern-based safety net, not a guarantee: names and street addresses, for
instance, are kept. Everything the feedback store writes passes through `redact` first.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

#: An e-mail address; also protected from translation by `supportlm.serve.tasks`.
EMAIL_PATTERN = r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
_EMAIL = re.compile(EMAIL_PATTERN)

# Digit groups joined by single spaces or dashes, as card numbers are written. Which consecutive
# groups form the card is decided afterwards with the Luhn checksum (see `_redact_cards`).
_DIGIT_GROUPS = re.compile(r"(?<![\w#])\d+(?:[ -]\d+)*(?![\w])")

# A phone-number candidate: optional country code, optional area code in parentheses, then digit
# groups separated by one space, dot or dash. Not preceded by a word character, '#', a currency
# sign, '/', '.' or '-' (order numbers, prices, paths, versions), and not followed by more digits,
# a decimal part or a word character. `_is_phone` then checks the number of digits.
_PHONE_CANDIDATE = re.compile(
    r"(?<![\w#$€£¥/.\-+])"
    r"(?P<number>(?:\+\d{1,3}[ .\-]?)?(?:\(\d{1,5}\)[ .\-]?)?\d{1,14}(?:[ .\-]\d{1,8}){0,5})"
    r"(?![\w/]|[.,]\d)"
)


def _luhn_valid(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _redact_cards(text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        run = match.group()
        groups = [(m.start(), m.end()) for m in re.finditer(r"\d+", run)]
        # Longest run of whole consecutive groups with 13-19 digits that passes Luhn, so a card
        # followed by an expiry date ("4111 1111 1111 1111 12 26") is still found.
        pieces: list[str] = []
        position = 0
        first = 0
        while first < len(groups):
            best = None
            for last in range(len(groups) - 1, first - 1, -1):
                digits = "".join(run[s:e] for s, e in groups[first : last + 1])
                if 13 <= len(digits) <= 19 and _luhn_valid(digits):
                    best = last
                    break
            if best is None:
                first += 1
                continue
            pieces.append(run[position : groups[first][0]])
            pieces.append("[CARD]")
            position = groups[best][1]
            first = best + 1
        pieces.append(run[position:])
        return "".join(pieces)

    return _DIGIT_GROUPS.sub(replace, text)


def _is_phone(candidate: str) -> bool:
    digits = re.sub(r"\D", "", candidate)
    separated = re.search(r"[ .\-()]", candidate) is not None
    if candidate.startswith("+"):
        return 8 <= len(digits) <= 15
    if "(" in candidate:
        return 9 <= len(digits) <= 12
    if not separated:
        # A bare run of digits is as likely an order or account number as a phone number; only
        # runs with a national trunk prefix ("0...") are taken for phones.
        return digits.startswith("0") and 10 <= len(digits) <= 11
    if re.match(r"\d{4}-\d{2}-\d{2}", candidate):
        # An ISO date followed by another number ("2024-05-01 14 items").
        return False
    return 9 <= len(digits) <= 13


def _redact_phones(text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        number = match.group("number")
        return "[PHONE]" if _is_phone(number) else number

    return _PHONE_CANDIDATE.sub(replace, text)


def redact(text: str) -> str:
    """Replace e-mail addresses, payment card numbers and phone numbers with placeholders.

    Card numbers are 13-19 digits, optionally grouped with spaces or dashes, that pass the Luhn
    checksum. Phone numbers are international (``+44 20 7946 0958``) or national numbers with
    separators (``(555) 123-4567``, ``06 12 34 56 78``, ``030-1234-5678``); order numbers
    (``#12345``), dates, times and prices are kept.

    >>> redact("Mail anna@example.com or call +1 415-555-0100 about order #88231.")
    'Mail [EMAIL] or call [PHONE] about order #88231.'
    """
    text = _EMAIL.sub("[EMAIL]", text)
    text = _redact_cards(text)
    return _redact_phones(text)


def redact_json(value: Any) -> Any:
    """`redact` every string inside a JSON-like value (dict keys are kept)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {key: redact_json(item) for key, item in value.items()}
    if isinstance(value, Sequence):
        return [redact_json(item) for item in value]
    return value
