"""A preference stage (KTO or DPO) on the served adapter, from exported feedback.

The command is `supportlm.cli.align`; ``python -m supportlm align`` runs the same.
"""

from supportlm.cli.align import main

if __name__ == "__main__":
    raise SystemExit(main())
