"""Placeholders a customer must never see: filled from the shop's details, or asked for.

Bitext-style training data writes shop- and customer-specific values as ``{{Placeholder}}``
(``{{Customer Support Phone Number}}``, ``{{Order Number}}`` …) and a tuned model reproduces them.
`ShopDetails.fill` replaces each placeholder the shop file names (``data/shop.yaml``, or
``SUPPORTLM_SHOP``) with its value, and any other with a request for the detail: ``{{Order
Number}}`` → "your order number". While a reply streams, a placeholder still being written
(``"… call {{Customer Sup"``) is held back until it is complete.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import re2
import yaml

from supportlm.errors import SupportLMError

#: The shop file of the bundled data (Fennel & Finch).
DEFAULT_SHOP_FILE = Path(__file__).resolve().parents[2] / "data" / "shop.yaml"

PLACEHOLDER = re2.compile(r"\{\{([^{}\n]{1,80})\}\}")
_UNFINISHED = re2.compile(r"\{\{?[^{}\n]{0,80}$")
_NOT_WORD = re2.compile(r"[^0-9a-z]+")


def placeholder_key(name: str) -> str:
    """``"Order Number Anonymized"`` → ``"order_number"``: how names are matched."""
    key = _NOT_WORD.sub("_", name.lower()).strip("_")
    return key.removesuffix("_anonymized")


@dataclass(frozen=True)
class ShopDetails:
    """The values placeholders are filled with, by `placeholder_key`."""

    values: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> ShopDetails:
        """The shop file at `path` (default: the bundled shop); a missing default is no values."""
        path = Path(path) if path else DEFAULT_SHOP_FILE
        if not path.is_file():
            if path == DEFAULT_SHOP_FILE:
                return cls()
            raise SupportLMError(f"The shop file {path} does not exist (SUPPORTLM_SHOP).")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as error:
            raise SupportLMError(f"Could not read the shop file {path}: {error}") from error
        if not isinstance(raw, Mapping) or not all(
            isinstance(value, str | int | float) for value in raw.values()
        ):
            raise SupportLMError(f"{path} must map placeholder names to text values.")
        return cls({placeholder_key(str(k)): str(v) for k, v in raw.items()})

    def fill(self, text: str, *, final: bool = True) -> str:
        """`text` with every placeholder filled or turned into a request for the detail.

        With ``final=False`` (a reply still streaming) an unfinished placeholder at the end is
        left out, so it never flashes on the screen.
        """
        pieces, position = [], 0
        for match in PLACEHOLDER.finditer(text):
            before = text[position : match.start()]
            pieces += [before, self._value(match.group(1), "".join(pieces) + before)]
            position = match.end()
        rest = text[position:]
        if not final:
            rest = _UNFINISHED.sub("", rest)
        return "".join([*pieces, rest])

    def _value(self, name: str, before: str) -> str:
        key = placeholder_key(name)
        if key in self.values:
            return self.values[key]
        detail = key.replace("_", " ")
        return detail if before.lower().endswith(("your ", "the ")) else f"your {detail}"


def raw_placeholders(text: str) -> list[str]:
    """The ``{{…}}`` placeholders left in `text`."""
    return [match.group() for match in PLACEHOLDER.finditer(text)]
