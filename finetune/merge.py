"""Merge a LoRA adapter into its base model and save a standalone model folder.

The command is `supportlm.cli.merge`; ``python -m supportlm merge`` runs the same.
"""

from supportlm.cli.merge import main

if __name__ == "__main__":
    raise SystemExit(main())
