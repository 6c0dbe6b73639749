"""Fine-tune a LoRA adapter for customer service.

The command is `supportlm.cli.train`; ``python -m supportlm train`` runs the same.
"""

from supportlm.cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())
