"""A preference stage (KTO or DPO) on the served adapter, from exported feedback.

    python finetune/align.py --method kto --adapter outputs/v2 \
        --dataset outputs/feedback-2026-12-01/kto.jsonl --output_dir outputs/v2-kto
    python finetune/align.py --method dpo --adapter latest --dataset DIR/dpo.jsonl --output_dir DIR

The reference model is the adapter given (TRL keeps a frozen copy of it), not the bare base. The
output is a candidate run folder; `finetune/evaluate.py --against` and `finetune/promote.py`
decide whether it is served. See `supportlm.train.fit.align`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from transformers import HfArgumentParser

import supportlm
from supportlm.errors import SupportLMError
from supportlm.train.fit.align import AlignArguments, align


def main(argv: Sequence[str] | None = None) -> int:
    supportlm.setup_logging()
    try:
        (args,) = HfArgumentParser(AlignArguments).parse_args_into_dataclasses(argv)
        align(args)
    except SupportLMError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
