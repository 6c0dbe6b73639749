"""supportlm's web app: `python app.py` (also the Hugging Face Space entry point).

One port serves the Gradio UI at ``/``, its Gradio API, the OpenAI-compatible ``/v1`` API and
``/health`` (`supportlm.serve.ui.server`). Settings come from ``SUPPORTLM_*`` environment
variables (see `supportlm.serve.settings.AppSettings`); host and port from Gradio's own
``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT``.
"""

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("supportlm") is None:
    # A Hugging Face Space installs requirements.txt but not this repository as a package, so the
    # library is imported from the source tree next to this file.
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from supportlm import setup_logging
from supportlm.errors import SupportLMError
from supportlm.serve.settings import AppSettings
from supportlm.serve.ui.server import build_server, serve

setup_logging()
try:
    app = build_server(AppSettings.from_env().resolve())
except SupportLMError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)

if __name__ == "__main__":
    serve(app)
