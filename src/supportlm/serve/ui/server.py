"""One server, one port: the OpenAI-compatible ``/v1`` API with the Gradio app mounted at ``/``.

`gr.mount_gradio_app` is Gradio's documented way to serve a Blocks inside a FastAPI app; the
parent app owns ``/v1`` and ``/health`` (`supportlm.serve.v1.routes`), so its CORS policy is the
one that applies there, and Gradio keeps its own for the UI. Both share one `Assistant`, so the
model is loaded once. Host and port are Gradio's ``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT``
(a Space sets them), so `python app.py` listens where ``demo.launch()`` would have.
"""

from __future__ import annotations

import importlib.util
import os

import gradio as gr
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.routing import Mount

from supportlm.errors import SupportLMError
from supportlm.serve.admission import RateLimit
from supportlm.serve.assistant import Assistant
from supportlm.serve.plan import ServingPlan
from supportlm.serve.settings import AppSettings
from supportlm.serve.ui import build_demo, launch_options, start_assistant
from supportlm.serve.ui.guard import GradioGuard
from supportlm.serve.v1.access import ApiAccess
from supportlm.serve.v1.routes import create_api
from supportlm.serve.v1.schema import ApiError

MCP_PATH = "/gradio_api/mcp"


def mcp_enabled(settings: AppSettings) -> bool:
    """``SUPPORTLM_MCP=1`` needs Gradio's ``mcp`` extra; without it the app refuses to start."""
    if settings.mcp and importlib.util.find_spec("mcp") is None:
        raise SupportLMError(
            "SUPPORTLM_MCP=1 needs the MCP extra: pip install 'gradio[mcp]' (see requirements.txt)."
        )
    return bool(settings.mcp)


class McpAccess:
    """ASGI middleware: the MCP endpoint asks for the same key or login as ``/v1``.

    Gradio's login protects its pages and queue, not the MCP routes it mounts, so this closes
    them when the app has a login or an API key (`ApiAccess`).
    """

    def __init__(self, app, access: ApiAccess) -> None:
        self.app, self.access = app, access

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(MCP_PATH) and self.access.required:
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            try:
                self.access.check(headers, None)
            except ApiError as error:
                response = JSONResponse(error.body(), status_code=401)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_server(demo: gr.Blocks, assistant: Assistant) -> FastAPI:
    """``/v1`` and ``/health`` for `assistant`, with `demo` mounted at ``/`` (and MCP)."""
    settings = assistant.settings
    app = create_api(assistant)
    mcp = mcp_enabled(settings)
    if mcp:
        app.add_middleware(McpAccess, access=ApiAccess(settings, assistant.logins))
    server = gr.mount_gradio_app(app, demo, path="/", mcp_server=mcp, **launch_options(settings))
    gradio_app = next(route.app for route in server.routes if isinstance(route, Mount))
    server.add_middleware(
        GradioGuard, gradio_app=gradio_app, login_required=bool(settings.auth),
        throttle=assistant.logins, uploads=RateLimit(settings.upload_bytes_per_hour, 3600.0),
        max_upload_bytes=settings.max_upload_bytes,
    )  # fmt: skip
    return server


def build_server(plan: ServingPlan | None = None) -> FastAPI:
    """The whole app for `plan` (default: the ``SUPPORTLM_*`` settings): UI, API and MCP."""
    assistant, switcher = start_assistant(plan)
    return create_server(build_demo(assistant=assistant, switcher=switcher), assistant)


def serve(app: FastAPI) -> None:
    """Run `app` where Gradio would listen (``GRADIO_SERVER_NAME``/``PORT``; 127.0.0.1:7860)."""
    host = os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")
    port = int(os.environ.get("GRADIO_SERVER_PORT", "7860"))
    print(f"* Running on local URL:  http://{host}:{port}  (OpenAI API: /v1)", flush=True)
    # Open streams (a browser tab, a gradio_client heartbeat) get 5 s to end on shutdown.
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
