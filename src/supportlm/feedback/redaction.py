"""PII redaction: personal data and secrets become placeholders before anything is stored.

What is redacted (``docs/privacy.md`` has the table of what is and is not):

* ``[EMAIL]`` e-mail addresses, Unicode ones included (``josé@bücher.de``);
* ``[SECRET]`` API keys and tokens (``hf_…``, ``sk-…``, ``AKIA…``, ``ghp_…``, ``xox…``, JWTs);
* ``[PASSWORD]`` the word after "password is", "pwd:", "PIN =" …;
* ``[IBAN]`` and ``[SSN]`` identifiers that pass their checksums (`python-stdnum`);
* ``[CARD]`` 13-19 digit card numbers that pass the Luhn checksum, grouped or not;
* ``[IP]`` IPv4 and IPv6 addresses (`ipaddress` validates them);
* ``[PHONE]`` numbers `phonenumbers` finds valid in any of `PHONE_REGIONS`, international ones
  in every region; numbers right after "order", "tracking", "invoice", "ISBN", "#" … stay.

Every pattern runs on RE2 (`google-re2`), which matches in time linear in the text, so hostile
input ("1 " * 800, "a" * 50,000) costs milliseconds; the checks that follow a match are bounded
too (a card is tried on at most 19 digits from each group), and `phonenumbers` reads only
runs of digits, at most `MAX_PHONE_CHARS` characters of them per text ("1/" * 2000: 0.33 s in
the old phone pass, 0.025 s in the whole `redact` now; `bench/redaction.py`). Redaction is a
safety net, not a guarantee: names and street addresses, for instance, are kept.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any

import phonenumbers
import re2
from stdnum import iban, luhn
from stdnum.us import ssn

#: Regions whose national phone formats (no country code) are recognised.
PHONE_REGIONS = ("US", "GB", "DE", "FR", "ES", "IT", "NL", "IN")

#: An e-mail address; also protected from translation by `supportlm.serve.tasks`.
EMAIL_PATTERN = r"[\p{L}\p{N}._%+-]+@[\p{L}\p{N}-]+(?:\.[\p{L}\p{N}-]+)*\.\p{L}{2,}"

_SECRET = re2.compile(
    r"\b(?:hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|(?:AKIA|ASIA)[0-9A-Z]{16}"
    r"|gh[pousr]_[A-Za-z0-9]{30,}|xox[abprs]-[A-Za-z0-9-]{10,}"
    r"|eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,})"
)
_PASSWORD = re2.compile(
    r"(?i)(\b(?:password|passcode|passphrase|passwd|pwd|pin)\b(?:\s+(?:is|was)\s*:?|\s*[:=])\s*)"
    r"(\S*[^\s.,;:!?)\]]|\S)"
)
_EMAIL = re2.compile(EMAIL_PATTERN)
_IBAN = re2.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}")
_SSN = re2.compile(r"\b\d{3}[- ]\d{2}[- ]\d{4}\b")
_DIGIT_GROUPS = re2.compile(r"\d+(?:[ -]\d+)*")
_IPV4 = re2.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b")
_IPV6 = re2.compile(r"[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}")
_ISO_DATE = re2.compile(r"^\d{4}-\d{2}-\d{2}")
# A number right after one of these words is an order, parcel or book number, not a phone.
_REFERENCE_WORD = re2.compile(
    r"(?i)(?:order|tracking|invoice|ticket|ref|reference|isbn|account|no\.?|nr\.?|#)\s*:?\s*$"
)


def _is_word(text: str, index: int) -> bool:
    return 0 <= index < len(text) and (text[index].isalnum() or text[index] == "_")


def _iban(match: Any) -> str:
    """The longest IBAN at the start of the candidate; the rest of the candidate is kept."""
    candidate = match.group()
    for end in range(len(candidate), 14, -1):
        if candidate[end - 1] != " " and iban.is_valid(candidate[:end]):
            if end == len(candidate) or not candidate[end].isalnum():
                return "[IBAN]" + candidate[end:]
            break
    return candidate


def _cards(text: str) -> str:
    def replace(match: Any) -> str:
        run = match.group()
        if _is_word(text, match.start() - 1) or _is_word(text, match.end()):
            return run
        groups = [(m.start(), m.end()) for m in re2.finditer(r"\d+", run)]
        pieces, position, first = [], 0, 0
        while first < len(groups):
            last = _card_end(run, groups, first)
            if last is None:
                first += 1
                continue
            pieces += [run[position : groups[first][0]], "[CARD]"]
            position, first = groups[last][1], last + 1
        return "".join([*pieces, run[position:]])

    return _DIGIT_GROUPS.sub(replace, text)


def _card_end(run: str, groups: list[tuple[int, int]], first: int) -> int | None:
    """The last group of the longest Luhn-valid 13-19 digit card starting at group `first`."""
    digits, best = "", None
    for last in range(first, len(groups)):
        digits += run[groups[last][0] : groups[last][1]]
        if len(digits) > 19:
            break
        if len(digits) >= 13 and luhn.is_valid(digits):
            best = last
    return best


def _ip(match: Any) -> str:
    try:
        ipaddress.ip_address(match.group())
    except ValueError:
        return match.group()
    return "[IP]"


def _not_a_phone(text: str, start: int, raw: str) -> bool:
    """A date, a number after a reference word, or the tail of a code ("ORD-2024-000123")."""
    before = text[start - 1] if start else " "
    return (
        before.isalnum()
        or before in "-/#_.$€£"
        or _ISO_DATE.search(raw) is not None
        or _REFERENCE_WORD.search(text[max(0, start - 16) : start]) is not None
    )


#: A run of digits and the separators phone numbers use: what `phonenumbers` is shown.
_PHONE_RUN = re2.compile(r"[+(]?\p{Nd}[\p{Nd}\p{Zs}\t().\/-]{4,}\p{Nd}")
#: A longer run is no one phone number ("1/" * 2000): it is redacted whole, unread (failing
#: closed: digit soup is not worth a model's training data).
MAX_PHONE_RUN = 64
#: Characters of runs `phonenumbers` reads per text (it costs about 10 us a character and
#: region); runs past this budget are redacted whole, so hostile input fails closed.
MAX_PHONE_CHARS = 600


def _phones(text: str, regions: Sequence[str]) -> str:
    """Phone numbers as ``[PHONE]``; `phonenumbers` reads only the digit runs, each run on its
    own and within `MAX_PHONE_CHARS`, so a write's cost is bounded (milliseconds)."""
    spans: dict[int, int] = {}
    budget = MAX_PHONE_CHARS
    for run in _PHONE_RUN.finditer(text):
        start, end = run.start(), run.end()
        if end - start > MAX_PHONE_RUN or end - start > budget:
            spans[start] = end
            continue
        budget -= end - start
        for found in _phone_matches(run.group(), regions):
            if not _not_a_phone(text, start + found.start, found.raw_string):
                first = start + found.start
                spans[first] = max(spans.get(first, 0), start + found.end)
    pieces, position = [], 0
    for start in sorted(spans):
        if start >= position:
            pieces += [text[position:start], "[PHONE]"]
            position = spans[start]
    return "".join([*pieces, text[position:]])


def _phone_matches(run: str, regions: Sequence[str]) -> list[Any]:
    return [
        found
        for region in regions
        for found in phonenumbers.PhoneNumberMatcher(
            run, region, leniency=phonenumbers.Leniency.VALID
        )
    ]


def redact(text: str, *, regions: Sequence[str] = PHONE_REGIONS) -> str:
    """Replace personal data and secrets in `text` with placeholders (see the module doc).

    >>> redact("Mail anna@example.com or call +1 415-555-0100 about order #88231.")
    'Mail [EMAIL] or call [PHONE] about order #88231.'
    >>> redact("my password is hunter2, card #4111111111111111")
    'my password is [PASSWORD], card #[CARD]'
    """
    text = _SECRET.sub("[SECRET]", text)
    text = _PASSWORD.sub(lambda m: m.group(1) + "[PASSWORD]", text)
    text = _EMAIL.sub("[EMAIL]", text)
    text = _IBAN.sub(_iban, text)
    text = _SSN.sub(lambda m: "[SSN]" if ssn.is_valid(m.group()) else m.group(), text)
    text = _cards(text)
    text = _IPV4.sub(_ip, text)
    text = _IPV6.sub(_ip, text)
    return _phones(text, regions)


def redact_json(value: Any) -> Any:
    """`redact` every string inside a JSON-like value (dict keys are kept)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {key: redact_json(item) for key, item in value.items()}
    if isinstance(value, Sequence):
        return [redact_json(item) for item in value]
    return value
