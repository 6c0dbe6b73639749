"""Fine-tune a LoRA adapter for customer service.

    python finetune/train.py [--config finetune/configs/default.yaml] [--flag value ...]

Without `--config` the checked-in default run (finetune/configs/default.yaml) is used. Flags
override the YAML; `--help` lists every setting. See `supportlm.train.fit.config` and
`supportlm.train.fit.trainer`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import supportlm
from supportlm.errors import SupportLMError
from supportlm.run_folder import SCRIPTS_DIR
from supportlm.train.fit.config import parse_config
from supportlm.train.fit.distributed import use_cpu_ranks
from supportlm.train.fit.run import train

DEFAULT_CONFIG = SCRIPTS_DIR / "configs" / "default.yaml"


def main(argv: Sequence[str] | None = None) -> int:
    supportlm.setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv and not any(arg.startswith("--config=") for arg in argv):
        argv = ["--config", str(DEFAULT_CONFIG), *argv]
    use_cpu_ranks()  # `accelerate launch --num_processes N` on a CPU machine: gloo ranks
    try:
        config = parse_config(argv)
        train(config)
    except SupportLMError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
