"""A promoted adapter served live, seen in a real browser: About and Insights name the new one,
and each reply is stored with the version that wrote it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from helpers import CHROMIUM, open_page, save_random_adapter

from supportlm.run_folder import RunFolder, point_latest
from supportlm.serve.settings import AppSettings
from supportlm.serve.ui import build_demo, start_assistant

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


def about_names(page, version: str, tries: int = 60) -> bool:
    """Whether About names `version` within `tries` reloads (it is rendered at page load)."""
    for _ in range(tries):
        page.reload()
        page.get_by_role("tab", name="About").click()
        if version in page.locator("#about-serving").inner_text():
            return True
        page.wait_for_timeout(500)
    return False


def test_a_promotion_is_served_live_and_shown(
    tiny_chat_model_dir, tmp_path, monkeypatch, repo_root: Path
):
    from playwright.sync_api import expect, sync_playwright

    monkeypatch.chdir(tmp_path)  # the app follows ./outputs/latest, as `python app.py` does
    old = run_adapter(tiny_chat_model_dir, tmp_path / "outputs" / "v1", 0)
    new = run_adapter(tiny_chat_model_dir, tmp_path / "outputs" / "v2", 1)
    point_latest(old)
    db = tmp_path / "feedback.sqlite3"
    settings = AppSettings(
        backend="transformers", feedback_db=db, adapter_watch_s=0.5, admin_token="operator-secret"
    )
    assistant, switcher = start_assistant(settings.resolve())
    demo = build_demo(assistant=assistant, switcher=switcher)
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as playwright:
            page = open_page(playwright, url)
            assert about_names(page, old.adapter_version(), tries=1)
            ask(page, "Where is my order?")
            point_latest(new)  # what promote.py does; the app's watcher switches
            assert about_names(page, new.adapter_version()), "About never named the new adapter"
            ask(page, "Can I change my address?")
            page.get_by_role("tab", name="Insights").click()
            page.locator("#insights-token input").fill("operator-secret")
            page.locator("#insights-token input").press("Enter")
            versions = page.locator("#insights-versions")
            for version in (old.adapter_version(), new.adapter_version()):
                expect(versions).to_contain_text(version, timeout=30_000)
            shot = repo_root / "test-artifacts" / "browser-switch.png"
            page.screenshot(path=shot, full_page=True)
            page.context.browser.close()
    finally:
        switcher.stop()  # the watcher outlives demo.close(); this test's cwd is about to go
        demo.close()
    with sqlite3.connect(db) as connection:
        stored = connection.execute("SELECT adapter_version FROM replies ORDER BY rowid").fetchall()
    assert stored == [(old.adapter_version(),), (new.adapter_version(),)]
