"""A promoted adapter served live, seen in a real browser: About and Insights name the new one."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import save_random_adapter
from test_browser import CHROMIUM

from supportlm.run_folder import RunFolder, point_latest
from supportlm.serve.settings import AppSettings
from supportlm.serve.ui import build_demo

pytestmark = pytest.mark.skipif(
    not CHROMIUM.is_file(), reason="Debian's Chromium (/usr/bin/chromium) is not installed"
)


def run_adapter(base: str, folder: Path, seed: int) -> RunFolder:
    save_random_adapter(base, folder, seed=seed, b_std=0.5)
    run = RunFolder(folder)
    run.write_record(base, {"method": "sft"})
    return run


def ask(page, text: str) -> None:
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Chat").click()
    box = page.locator("textarea[placeholder^='Type a message']")
    box.fill(text)
    box.press("Enter")
    expect(page.locator("#chat-caption")).to_contain_text("tok/s", timeout=60_000)


def test_a_promotion_is_served_live_and_shown(tiny_chat_model_dir, tmp_path, monkeypatch):
    from playwright.sync_api import expect, sync_playwright

    monkeypatch.chdir(tmp_path)  # the app follows ./outputs/latest
    old = run_adapter(tiny_chat_model_dir, tmp_path / "outputs" / "v1", 0)
    new = run_adapter(tiny_chat_model_dir, tmp_path / "outputs" / "v2", 1)
    point_latest(old)
    settings = AppSettings(
        backend="transformers", feedback_db=tmp_path / "fb.sqlite3", adapter_watch_s=0.5
    )
    demo = build_demo(settings.resolve())
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=str(CHROMIUM),
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
            )
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.goto(url)
            ask(page, "Where is my order?")
            point_latest(new)  # what promote.py does; the app's watcher switches
            page.get_by_role("tab", name="About").click()
            for _ in range(60):  # the page renders the About text at load: reload until new
                page.reload()
                page.get_by_role("tab", name="About").click()
                if new.adapter_version() in page.locator("#about-serving").inner_text():
                    break
                page.wait_for_timeout(500)
            expect(page.locator("#about-serving")).to_contain_text(new.adapter_version())
            ask(page, "Can I change my address?")
            page.get_by_role("tab", name="Insights").click()
            for version in (old.adapter_version(), new.adapter_version()):
                expect(page.get_by_text(version).first).to_be_visible(timeout=30_000)
            browser.close()
    finally:
        demo.close()
