"""Serve a candidate adapter, only if it is better; or go back one version.

The command is `supportlm.cli.promote`; ``python -m supportlm promote`` runs the same.
"""

from supportlm.cli.promote import main

if __name__ == "__main__":
    raise SystemExit(main())
