"""The app in a real browser (Playwright + Debian's Chromium) on the tiny model with an adapter."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from helpers import CHROMIUM, open_page, save_random_adapter

from supportlm.run_folder import RunFolder
from supportlm.serve.settings import AppSettings
from supportlm.serve.ui import build_demo

pytestmark = pytest.mark.skipif(
    not CHROMIUM.is_file(), reason="Debian's Chromium (/usr/bin/chromium) is not installed"
)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory, tiny_chat_model_dir: str) -> Path:
    """A LoRA adapter with non-zero B, plus the metrics.json and loss.png training writes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = tmp_path_factory.mktemp("browser-adapter")
    # A large B, so that "tuned" clearly differs from "base".
    save_random_adapter(tiny_chat_model_dir, folder, b_std=0.5, seed=1)
    (folder / "metrics.json").write_text(json.dumps({"eval_loss": 2.5, "rougeL": 0.31}))
    figure, axis = plt.subplots(figsize=(4, 2.5))
    axis.plot([3.0, 2.6, 2.4])
    figure.savefig(folder / "loss.png")
    plt.close(figure)
    return folder


ADMIN_TOKEN = "operator-secret"  # no login here: Insights open with the admin token only


@pytest.fixture(scope="module")
def app_url(tiny_chat_model_dir: str, adapter_dir: Path, tmp_path_factory):
    feedback_db = tmp_path_factory.mktemp("browser-app") / "feedback.sqlite3"
    plan = AppSettings(
        model=tiny_chat_model_dir,
        adapter=str(adapter_dir),
        backend="transformers",
        feedback_db=feedback_db,
        admin_token=ADMIN_TOKEN,
    ).resolve()
    demo = build_demo(plan)
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True)  # Gradio picks a free port
    yield url, feedback_db
    demo.close()


@pytest.fixture(scope="module")
def page(app_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        page = open_page(playwright, app_url[0])
        yield page
        page.context.browser.close()


def test_chat_streams_and_like_is_stored(page, app_url, repo_root: Path) -> None:
    from playwright.sync_api import expect

    box = page.locator("textarea[placeholder^='Type a message']")
    box.fill("Where is my order #123? Mail me at anna@example.com")
    box.press("Enter")
    reply = page.locator("[data-testid='bot']").last
    expect(reply).not_to_have_text("", timeout=30_000)
    expect(page.locator("#chat-caption")).to_contain_text("tok/s", timeout=60_000)
    page.locator("button[aria-label='Like']").last.click()
    expect(page.locator("#feedback-status")).to_contain_text("like was saved", timeout=30_000)
    artifacts = repo_root / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    page.screenshot(path=artifacts / "browser-chat.png", full_page=True)
    with sqlite3.connect(app_url[1]) as connection:
        kind, conversation = connection.execute(
            "SELECT kind, conversation FROM feedback ORDER BY id DESC LIMIT 1"
        ).fetchone()
    assert kind == "like"
    assert "[EMAIL]" in conversation and "anna@example.com" not in conversation


def test_summarise_tab(page) -> None:
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Summarise").click()
    page.get_by_label("Text to summarise").fill("The parcel is late. The customer wants a refund.")
    expect(page.locator("#summary-token-count")).to_contain_text("tokens", timeout=30_000)
    page.get_by_role("button", name="Summarise", exact=True).click()
    expect(page.locator("#summary-output textarea")).not_to_have_value("", timeout=60_000)


def test_translate_tab(page) -> None:
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Translate").click()
    page.get_by_label("Text to translate").fill("Thank you for your order.")
    page.get_by_role("button", name="Translate", exact=True).click()
    expect(page.locator("#translate-output textarea")).not_to_have_value("", timeout=60_000)


def test_compare_tab_votes(page, app_url) -> None:
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Compare").click()
    page.get_by_role("button", name="Compare", exact=True).click()
    expect(page.locator("#compare-tuned textarea")).not_to_have_value("", timeout=60_000)
    page.get_by_role("button", name="Fine-tuned is better").click()
    expect(page.locator("#vote-status")).to_contain_text("saved", timeout=30_000)
    with sqlite3.connect(app_url[1]) as connection:
        (choice,) = connection.execute("SELECT choice FROM votes ORDER BY id DESC").fetchone()
    assert choice == "tuned"


def test_about_tab_shows_the_adapter(page, adapter_dir: Path) -> None:
    from playwright.sync_api import expect

    page.get_by_role("tab", name="About").click()
    expect(page.locator("#about-serving")).to_contain_text(adapter_dir.name)
    expect(page.locator("#about-serving")).not_to_contain_text(str(adapter_dir.parent))  # no path
    version = RunFolder(adapter_dir).adapter_version()
    expect(page.locator("#about-serving")).to_contain_text(version)
    expect(page.get_by_text("rougeL")).to_be_visible()
    expect(page.locator("img").last).to_be_visible()


def test_insights_shows_satisfaction_and_approves_the_queue(
    page, app_url, adapter_dir: Path, repo_root: Path
) -> None:
    """Without a login Insights open with the admin token only: then they show this adapter's like
    share, and the anonymous like and vote wait in the queue until approved there."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Insights").click()
    expect(page.locator("#insights-access")).to_contain_text("admin token", timeout=30_000)
    expect(page.locator("#review-queue")).not_to_contain_text("vote")
    token = page.locator("#insights-token input")
    token.fill(ADMIN_TOKEN)
    token.press("Enter")
    versions = page.locator("#insights-versions")
    expect(versions).to_contain_text(RunFolder(adapter_dir).adapter_version(), timeout=30_000)
    # Today's like share is drawn although it is the only day: a LinePlot draws a one-day series
    # as nothing but a hidden hover point (opacity 0).
    drawn = '#insights-like-share g.role-mark path[aria-roledescription="point"]:not([opacity="0"])'
    expect(page.locator(drawn)).to_have_count(1)
    expect(page.locator("#review-queue")).to_contain_text("like")
    expect(page.locator("#review-queue")).to_contain_text("vote")
    page.locator("#review-approve").click()
    expect(page.locator("#review-status")).to_contain_text("Approved: 2 items", timeout=30_000)
    with sqlite3.connect(app_url[1]) as connection:
        reviews = connection.execute(
            "SELECT review, reviewed_by FROM feedback "
            "UNION ALL SELECT review, reviewed_by FROM votes"
        ).fetchall()
    assert reviews == [("approved", "operator"), ("approved", "operator")]
    page.screenshot(path=repo_root / "test-artifacts" / "browser-insights.png", full_page=True)
