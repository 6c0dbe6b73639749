"""Compare the base model with a fine-tuned LoRA adapter on held-out customer-service data.

The command is `supportlm.cli.evaluate`; ``python -m supportlm evaluate`` runs the same.
"""

from supportlm.cli.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
