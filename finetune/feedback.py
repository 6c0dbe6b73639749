"""The feedback store from the command line: export it as training data, review, loop, erase.

The command is `supportlm.cli.feedback`; ``python -m supportlm feedback`` runs the same.
"""

from supportlm.cli.feedback import main

if __name__ == "__main__":
    raise SystemExit(main())
