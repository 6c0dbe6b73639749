"""Builders the tests share: a random LoRA adapter on a model folder, a whole reply, a browser.

Fixtures that use them live in `conftest.py`; tests import these directly when they need a
variant (another rank, targets or weight scale).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

#: Debian's Chromium, which the browser tests drive with Playwright.
CHROMIUM = Path("/usr/bin/chromium")


def save_random_adapter(
    model_dir: str,
    folder: Path,
    *,
    r: int = 4,
    lora_alpha: int | None = None,
    target_modules: str | Sequence[str] = ("q_proj", "v_proj"),
    b_std: float | None = None,
    seed: int = 0,
) -> Path:
    """Save a LoRA adapter for `model_dir` whose update is not zero, so tuned differs from base.

    With `b_std` None, PEFT's own random initialisation (``init_lora_weights=False``); else B is
    drawn from N(0, b_std) with a seeded generator. The same arguments give the same adapter.
    """
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)  # LoRA A is random too
    config = LoraConfig(
        r=r,
        lora_alpha=8 if lora_alpha is None else lora_alpha,  # PEFT's default
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
        # False: PEFT draws B at random; True: B starts at zero and is drawn below.
        init_lora_weights=b_std is not None,
    )
    peft_model = get_peft_model(model, config)
    if b_std is not None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0.0, b_std, generator=generator)
    folder.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(folder)
    return folder


def answer(engine, messages, settings, *, use_adapter: bool = True):
    """The whole reply of `engine` to the chat `messages` (the served adapter, or the base)."""
    return engine.generate(engine.request(messages, settings, use_adapter=use_adapter))


def free_port() -> int:
    """A local TCP port nobody listens on (right now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """`app` (ASGI) served by uvicorn in a thread on a free port; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def open_page(playwright, url: str):
    """A Chromium page on `url` (1280 x 1100), with the flags this sandbox needs."""
    browser = playwright.chromium.launch(
        executable_path=str(CHROMIUM),
        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
    )
    page = browser.new_page(viewport={"width": 1280, "height": 1100})
    page.goto(url)
    return page


def call_event(
    url: str, fn_index: int, data: list, session: str, cookies: dict | None = None
) -> list[dict]:
    """Call a Gradio event by its index over raw HTTP, as a script or a browser does (private
    events too: hiding one from the API page is no protection); its SSE messages."""
    import json

    import httpx

    with httpx.Client(base_url=url, timeout=60, cookies=cookies) as http:
        joined = http.post(
            "gradio_api/queue/join",
            json={"data": data, "fn_index": fn_index, "session_hash": session, "event_data": None},
        )
        if joined.status_code != 200:
            return [{"msg": "refused", "status": joined.status_code, "text": joined.text}]
        messages = []
        with http.stream("GET", "gradio_api/queue/data", params={"session_hash": session}) as sse:
            for line in sse.iter_lines():
                if line.startswith("data:"):
                    messages.append(json.loads(line[5:]))
                    if messages[-1].get("msg") == "process_completed":
                        break
    return messages


def event_index(demo, function_name: str, module: str) -> int:
    """The index of `demo`'s first event whose function is `module`.`function_name`."""
    for index, block_fn in demo.fns.items():
        fn = block_fn.fn
        if getattr(fn, "__module__", "") == module and fn.__name__ == function_name:
            return index
    raise LookupError(f"no event runs {module}.{function_name}")


def login(url: str, user: str, password: str) -> dict:
    """The cookies of a Gradio login (what a browser keeps after the login form)."""
    import httpx

    response = httpx.post(f"{url}/login", data={"username": user, "password": password})
    assert response.status_code == 200, response.text
    return dict(response.cookies)
