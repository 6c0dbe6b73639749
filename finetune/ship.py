"""Make a training run the adapter shipped in the repository (float16, with its report and card).

The command is `supportlm.cli.ship`; ``python -m supportlm ship`` runs the same.
"""

from supportlm.cli.ship import main

if __name__ == "__main__":
    raise SystemExit(main())
