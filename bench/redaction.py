"""Redaction cost on hostile and ordinary texts: the app's `redact` beside the phone pass it
replaced (`phonenumbers` over the whole text in every region), side by side in one run.

    python bench/redaction.py [--json docs/results/redaction.json]

Each figure is the median of 5 runs, in seconds. Issue 33 measured `redact("1/" * 2000)` at
0.6-1.0 s on the request thread; the whole-text phone pass is what made it so.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import phonenumbers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from supportlm.feedback.redaction import PHONE_REGIONS, redact

TEXTS = {
    '"1/" * 2000': "1/" * 2000,
    '"1/" * 4000': "1/" * 4000,
    '"1 " * 2000': "1 " * 2000,
    '"(1) " * 1000': "(1) " * 1000,
    "a support message (4,000 chars)": (
        "Hi, my order #88231 has not arrived. Call me on +44 20 7946 0958 or mail "
        "ann.lee@example.com. Tracking 1Z999AA10123456784, sent 2026-11-30. "
    )
    * 25,
}


def median_s(function, text: str, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        function(text)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times), 4)


def whole_text_phone_pass(text: str) -> None:
    """The phone pass before issue 33: every region's matcher over the whole text."""
    for region in PHONE_REGIONS:
        for _ in phonenumbers.PhoneNumberMatcher(
            text, region, leniency=phonenumbers.Leniency.VALID
        ):
            pass


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args(argv)
    rows = {
        name: {"redact_s": median_s(redact, text), "whole_text_phone_pass_s":
               median_s(whole_text_phone_pass, text), "chars": len(text)}
        for name, text in TEXTS.items()
    }  # fmt: skip
    for name, row in rows.items():
        ratio = row["whole_text_phone_pass_s"] / max(row["redact_s"], 1e-6)
        print(f"{name:34} redact {row['redact_s']:.4f} s   old phone pass alone "
              f"{row['whole_text_phone_pass_s']:.4f} s   ({ratio:.1f}x)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
