"""Fine-tune a LoRA adapter for customer service.

    python finetune/train.py --config finetune/configs/default.yaml [--flag value ...]

Flags override the YAML; `--help` lists every setting. See `supportlm.config` and
`supportlm.training`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import supportlm
from supportlm.config import parse_config
from supportlm.errors import SupportLMError
from supportlm.training import train


def main(argv: Sequence[str] | None = None) -> int:
    supportlm.setup_logging()
    try:
        config = parse_config(argv)
        train(config)
    except SupportLMError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
