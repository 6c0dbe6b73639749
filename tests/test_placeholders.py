"""Placeholders a customer must never see (issue 10, part 8)."""

import csv
import json
from pathlib import Path

import pytest
from test_abuse import EchoEngine, make_assistant

from supportlm.errors import SupportLMError
from supportlm.placeholders import ShopDetails, raw_placeholders

REPO_ROOT = Path(__file__).resolve().parents[1]
BITEXT = REPO_ROOT.parent / "shared" / "data" / "bitext-customer-support" / "train.csv"
SHOP = ShopDetails.load()


def test_known_placeholders_are_filled_from_the_shop_file():
    text = "Call {{Customer Support Phone Number}} or write to {{customer_support_email}}."
    assert SHOP.fill(text) == "Call +31 10 555 0142 or write to help@fennelandfinch.example."


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Please send me {{Order Number}}.", "Please send me your order number."),
        ("Check your {{Order Number Anonymized}}.", "Check your order number."),
        ("Open the {{Order History}} page.", "Open the order history page."),
    ],
)
def test_unknown_placeholders_become_a_request_for_the_detail(text, expected):
    assert SHOP.fill(text) == expected


def test_a_placeholder_being_streamed_is_held_back_until_complete():
    assert SHOP.fill("Call us on {{Customer Sup", final=False) == "Call us on "
    assert SHOP.fill("Call us on {", final=False) == "Call us on "
    assert SHOP.fill("Prices in {curly} stay", final=False) == "Prices in {curly} stay"


def test_a_bad_shop_file_is_one_clear_message(tmp_path):
    with pytest.raises(SupportLMError, match="does not exist"):
        ShopDetails.load(tmp_path / "missing.yaml")
    bad = tmp_path / "shop.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(SupportLMError, match="must map"):
        ShopDetails.load(bad)


def test_the_chat_never_streams_a_raw_placeholder_and_stores_what_it_showed(
    smollm2_tokenizer, tmp_path
):
    reply = "Call {{Customer Support Phone Number}} with {{Order Number}} at hand."
    engine = EchoEngine(smollm2_tokenizer, reply=reply)
    assistant = make_assistant(smollm2_tokenizer, tmp_path, engine=engine)
    request = assistant.chat_request("Where is my order?", [], None, assistant_settings())
    events = list(assistant.chat(request, assistant_settings()))
    assert all("{" not in event.text for event in events)
    assert events[-1].text == "Call +31 10 555 0142 with your order number at hand."
    stored = assistant.feedback.list_replies()[0]["reply"]
    assert "{{" not in stored and "your order number" in stored


def assistant_settings():
    from supportlm.engines.base import GenerationSettings

    return GenerationSettings(max_new_tokens=8, temperature=0.0)


def test_no_answer_of_the_bundled_data_or_bitext_keeps_a_raw_placeholder():
    answers = [
        message["content"]
        for line in (REPO_ROOT / "data" / "customer_support.jsonl").read_text().splitlines()
        for message in json.loads(line)["messages"]
        if message["role"] == "assistant"
    ]
    if BITEXT.is_file():
        with BITEXT.open(encoding="utf-8") as file:
            answers += [row["response"] for row in csv.DictReader(file)]
    with_placeholders = [a for a in answers if raw_placeholders(a)]
    assert len(with_placeholders) > 100
    assert [a for a in with_placeholders if raw_placeholders(SHOP.fill(a))] == []
