"""Serve a candidate adapter, only if it is better; or go back one version.

    python finetune/evaluate.py --adapter outputs/v2 --against latest   # writes its versus.json
    python finetune/promote.py outputs/v2                 # moves outputs/latest, or says why not
    python finetune/promote.py outputs/v2 --force         # promote anyway (logged)
    python finetune/promote.py --rollback                 # back to what the last promotion replaced

The running app switches to the new ``outputs/latest`` between requests. Every decision is a line
of outputs/promotions.jsonl. See `supportlm.train.release.promotion`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import supportlm
from supportlm.errors import SupportLMError
from supportlm.run_folder import OUTPUTS_DIR
from supportlm.train.release.promotion import decision_text, promote, rollback


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("candidate", nargs="?", help="the run folder to serve")
    parser.add_argument("--report", help="its comparison report; default: <candidate>/versus.json")
    parser.add_argument(
        "--max_test_drop", type=float, default=1.0,
        help="most points ROUGE-L or chrF may fall on the held-out test split (0-100 scale)",
    )  # fmt: skip
    parser.add_argument("--force", action="store_true", help="promote even if a check fails")
    parser.add_argument("--rollback", action="store_true", help="serve the previous version")
    parser.add_argument("--outputs_dir", default=str(OUTPUTS_DIR), help="where latest lives")
    args = parser.parse_args(argv)
    if bool(args.candidate) == args.rollback:
        parser.error("name a candidate, or pass --rollback")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    supportlm.setup_logging()
    args = parse_args(argv)
    try:
        if args.rollback:
            entry = rollback(args.outputs_dir)
            print(f"latest -> {entry['to']['path'] or '(the shipped adapter)'}")
            return 0
        decision = promote(
            args.candidate, report_path=args.report, max_test_drop=args.max_test_drop,
            force=args.force, outputs_dir=args.outputs_dir,
        )  # fmt: skip
    except SupportLMError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(decision_text(decision))
    if not decision.promote:
        print(f"refused: {args.candidate} is not served (--force to override)", file=sys.stderr)
        return 1
    print(f"promoted: latest -> {args.candidate}")
    return 0
