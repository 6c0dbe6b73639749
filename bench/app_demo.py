"""Record the app on a real model: one chat, summary and translation through the API, and
screenshots of every tab in Chromium.

    python bench/app_demo.py --output_dir docs/demo/tuned --adapter outputs/smollm2-support
    python bench/app_demo.py --output_dir docs/demo/base      # the embedded model, no adapter
    python bench/app_demo.py --startup --json docs/results/startup.json   # start-up, cold and warm

Starts `python app.py` exactly as a user would (environment variables only), measures time to
first token and decode speed of the chat reply around the streamed API chunks, and writes
`demo.json`, `demo.md` and `<tab>.png` screenshots into the output folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from gradio_client import Client

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import free_port, start_app

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from supportlm.modeling import load_tokenizer

CHROMIUM = "/usr/bin/chromium"
QUESTION = "I ordered a lamp two weeks ago and it still hasn't arrived. What can I do?"
TICKET = (
    "Customer: Hi, I ordered a walnut side table (order {{Order Number}}) on 3 May. The tracking "
    "page has said 'in transit' for nine days and nobody answers the courier's phone line. I need "
    "it before my move on 20 May, otherwise I want to cancel and get my money back.\n"
    "Agent: I'm sorry about the delay. I've asked the courier for an update and will email you "
    "by tomorrow. If it cannot arrive before 20 May we will cancel and refund you in full."
)
TRANSLATION_SOURCE = (
    "Thank you for your message. Your refund for order {{Order Number}} was issued today and "
    "should reach your account within 5 business days.\n"
    "Track it at https://example.com/orders."
)


def stream_chat(client: Client, tokenizer, question: str, max_new_tokens: int) -> dict:
    start = time.perf_counter()
    first = None
    updates = 0
    job = client.submit(question, api_name="/chat", max_new_tokens=max_new_tokens)
    for chunk in job:
        if chunk and first is None:
            first = time.perf_counter() - start
        updates += 1
    reply = job.result()
    total = time.perf_counter() - start
    tokens = len(tokenizer(reply, add_special_tokens=False)["input_ids"])
    decode = (tokens - 1) / (total - first) if first is not None and total > first else 0.0
    return {
        "question": question,
        "reply": reply,
        "time_to_first_token_s": round(first or 0.0, 3),
        "decode_tok_s": round(decode, 1),
        "tokens": tokens,
        "streamed_updates": updates,
        "total_s": round(total, 2),
    }


def screenshots(url: str, output_dir: Path) -> list[str]:
    from playwright.sync_api import expect, sync_playwright

    paths = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(url)
        box = page.locator("textarea[placeholder^='Type a message']")
        box.fill(QUESTION)
        box.press("Enter")
        expect(page.locator("#chat-caption")).to_contain_text("tok/s", timeout=180_000)
        page.screenshot(path=output_dir / "chat.png", full_page=True)
        paths.append("chat.png")
        for tab, label, text, output in (
            ("Summarise", "Text to summarise", TICKET, "#summary-output"),
            ("Translate", "Text to translate", TRANSLATION_SOURCE, "#translate-output"),
        ):
            page.get_by_role("tab", name=tab).click()
            page.get_by_label(label).fill(text)
            page.get_by_role("button", name=tab, exact=True).click()
            expect(page.locator(f"{output} textarea")).not_to_have_value("", timeout=180_000)
            page.wait_for_timeout(500)
            page.screenshot(path=output_dir / f"{tab.lower()}.png", full_page=True)
            paths.append(f"{tab.lower()}.png")
        page.get_by_role("tab", name="About").click()
        page.wait_for_timeout(1000)
        page.screenshot(path=output_dir / "about.png", full_page=True)
        paths.append("about.png")
        browser.close()
    return paths


def startup(backend: str, warm_runs: int) -> dict:
    """`python app.py` as a fresh clone runs it (no model variables: the shipped adapter), from
    launch to HTTP ready: first with an empty cache (every conversion: the GGUF to safetensors,
    the adapter merged into a Q8_0 GGUF), then `warm_runs` times on that cache. The operating
    system's file cache stays warm: a new machine's very first start also reads the packages
    from disk."""
    cache = Path(tempfile.mkdtemp(prefix="supportlm-cache-"))
    work = Path(tempfile.mkdtemp(prefix="supportlm-startup-"))  # no outputs/latest here
    env = {"SUPPORTLM_CACHE": str(cache), "SUPPORTLM_FEEDBACK_DB": str(work / "fb.sqlite3")}
    runs, info = [], None
    for run in range(1 + warm_runs):
        port = free_port()
        process, startup_s, _ = start_app(None, backend, port, env, 900, cwd=work)
        try:
            if info is None:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                info = client.predict(api_name="/info")
        finally:
            process.terminate()
            process.wait(timeout=30)
        runs.append({"cache": "empty" if run == 0 else "warm", "startup_s": round(startup_s, 2)})
        print(f"start-up ({runs[-1]['cache']} cache): {startup_s:.1f} s", flush=True)
    warm = sorted(r["startup_s"] for r in runs[1:])
    return {
        "info": info,
        "cold_startup_s": runs[0]["startup_s"],
        "warm_startup_s_median": warm[len(warm) // 2] if warm else None,
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded", help="SUPPORTLM_MODEL for the app.")
    parser.add_argument("--adapter", default=None, help="SUPPORTLM_ADAPTER (default: none).")
    parser.add_argument("--backend", default="auto", choices=["auto", "transformers", "llama.cpp"])
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument(
        "--output_dir", type=Path, help="the demo's folder (required without --startup)"
    )
    parser.add_argument("--no_screenshots", action="store_true")
    parser.add_argument("--startup", action="store_true", help="only time start-up, cold and warm")
    parser.add_argument("--warm_runs", type=int, default=3)
    parser.add_argument("--json", type=Path, help="--startup: write the report here")
    args = parser.parse_args()
    if args.startup:
        report = startup(args.backend, args.warm_runs)
        print(json.dumps(report, indent=2))
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
        return
    if args.output_dir is None:
        parser.error("--output_dir is required (or --startup)")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    env = {"SUPPORTLM_FEEDBACK_DB": str(args.output_dir / "feedback.sqlite3")}
    if args.adapter:
        env["SUPPORTLM_ADAPTER"] = args.adapter
    port = free_port()
    process, startup_s, log_path = start_app(args.model, args.backend, port, env, 600)
    url = f"http://127.0.0.1:{port}/"
    try:
        client = Client(url, verbose=False)
        tokenizer = load_tokenizer(args.model)
        stream_chat(client, tokenizer, "Hello", 8)  # warm-up: first-call allocations
        chat = stream_chat(client, tokenizer, QUESTION, args.max_new_tokens)
        summary = client.predict(TICKET, "bullets", api_name="/summarize")
        translation = client.predict(TRANSLATION_SOURCE, "French", api_name="/translate")
        shots = [] if args.no_screenshots else screenshots(url, args.output_dir)
    finally:
        process.terminate()
        process.wait(timeout=30)
    result = {
        "model": args.model,
        "adapter": args.adapter,
        "startup_s": round(startup_s, 1),
        "chat": chat,
        "summary": {"style": "bullets", "text": TICKET, "summary": summary},
        "translation": {"target": "French", "text": TRANSLATION_SOURCE, "translation": translation},
        "screenshots": shots,
        "app_log": log_path.read_text().splitlines()[-40:],
    }
    (args.output_dir / "demo.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    markdown = [
        f"# App demo: {args.model}" + (f" + {args.adapter}" if args.adapter else " (no adapter)"),
        "",
        f"Start-up to ready: {result['startup_s']} s. Chat through `/chat`: time to first token "
        f"{chat['time_to_first_token_s']} s, {chat['decode_tok_s']} tok/s, {chat['tokens']} "
        f"tokens in {chat['streamed_updates']} streamed updates.",
        "",
        f"**Chat** — {QUESTION}",
        "",
        "```text",
        chat["reply"],
        "```",
        "",
        "**Summary** (bullets) of the ticket:",
        "",
        "```text",
        summary,
        "```",
        "",
        "**Translation** into French:",
        "",
        "```text",
        translation,
        "```",
    ]
    (args.output_dir / "demo.md").write_text("\n".join(markdown) + "\n")
    print("\n".join(markdown))


if __name__ == "__main__":
    main()
