"""Make a training run the adapter shipped in the repository (float16, with its report and card).

    python finetune/train.py --config finetune/configs/release.yaml
    python finetune/evaluate.py --adapter outputs/release --limit 60     # outputs/release/eval.json
    python finetune/ship.py outputs/release --evaluation outputs/release/eval.json

Replaces models/supportlm-smollm2/ whole; commit it in one commit with its new report. See
`supportlm.train.release.ship`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import supportlm
from supportlm.errors import SupportLMError
from supportlm.run_folder import SHIPPED_ADAPTER, RunFolder
from supportlm.train.release.ship import ship


def main(argv: Sequence[str] | None = None) -> int:
    supportlm.setup_logging()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="the run folder to ship")
    parser.add_argument("--evaluation", required=True, help="its finetune/evaluate.py report")
    parser.add_argument("--dest", default=str(SHIPPED_ADAPTER), help="where it is shipped")
    parser.add_argument("--command", default="", help="the commands that made it, for the card")
    args = parser.parse_args(argv)
    try:
        dest = ship(RunFolder(args.run), args.dest, args.evaluation, args.command)
    except SupportLMError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"shipped {args.run} to {dest} ({RunFolder(dest).adapter_version()})")
    return 0
