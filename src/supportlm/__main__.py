"""``python -m supportlm <command>``: see `supportlm.cli`."""

from supportlm.cli import main

raise SystemExit(main())
