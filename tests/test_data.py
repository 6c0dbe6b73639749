"""Tests for `supportlm.train.data`: loading the four shapes, cleaning, splitting, the report."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from supportlm.errors import SupportLMError
from supportlm.prompts import (
    CHATML_TEMPLATE,
    IGNORE_INDEX,
    tokenize_conversation,
    with_system_prompt,
)
from supportlm.train.data.arguments import DataArguments
from supportlm.train.data.dataset import (
    assign_split,
    clean_examples,
    normalize_text,
    prepare_dataset,
    split_examples,
)
from supportlm.train.data.examples import DEFAULT_DATASET, REPO_ROOT, SHAPES, Example, load_examples
from supportlm.train.data.sampling import sample_examples, stratified_sample

BITEXT_CSV = Path("/work/shared/data/bitext-customer-support/train.csv")

QUESTION = "Where is my order?"
ANSWER = "It is on its way.\n\n1. Track it online.\n2. Call us."


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


def exchange(question: str, answer: str, **meta: str) -> Example:
    return Example(messages=[user(question), assistant(answer)], meta=meta)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def write_csv(path: Path, records: list[dict]) -> Path:
    """CSV with chat turns stored as JSON cells, as `supportlm.train.data.examples` reads them."""
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(records[0]))
        writer.writeheader()
        for record in records:
            writer.writerow(
                {k: json.dumps(v) if isinstance(v, list) else v for k, v in record.items()}
            )
    return path


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level ChatML tokenizer: one token per word or punctuation run, readable counts."""
    vocab = {token: i for i, token in enumerate(["[UNK]", "<|im_start|>", "<|im_end|>"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


# --- the four shapes --------------------------------------------------------------------------

SHAPE_CASES = {
    "chat": (
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                user(QUESTION),
                assistant(ANSWER),
                user("Thanks!"),
                assistant("You're welcome."),
            ],
            "intent": "track_order",
            "category": "ORDER",
            "task": "chat",
        },
        [
            {"role": "system", "content": "Be brief."},
            user(QUESTION),
            assistant(ANSWER),
            user("Thanks!"),
            assistant("You're welcome."),
        ],
    ),
    "instruction_response": (
        {"instruction": QUESTION, "intent": "track_order", "category": "ORDER", "response": ANSWER},
        [user(QUESTION), assistant(ANSWER)],
    ),
    "alpaca": (
        {"instruction": "Translate into French.", "input": "Thank you", "output": "Merci"},
        [user("Translate into French.\n\nThank you"), assistant("Merci")],
    ),
    "sharegpt": (
        {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": QUESTION},
                {"from": "gpt", "value": ANSWER},
            ]
        },
        [{"role": "system", "content": "Be brief."}, user(QUESTION), assistant(ANSWER)],
    ),
}


@pytest.mark.parametrize("file_format", ["jsonl", "csv"])
@pytest.mark.parametrize("shape", list(SHAPE_CASES))
def test_each_shape_loads_as_chat_messages(tmp_path, shape, file_format):
    record, expected_messages = SHAPE_CASES[shape]
    writer = write_jsonl if file_format == "jsonl" else write_csv
    path = writer(tmp_path / f"data.{file_format}", [record, record])

    examples, stats = load_examples(path)

    assert stats.shape == shape
    assert (stats.num_records, stats.num_malformed) == (2, 0)
    assert [e.messages for e in examples] == [expected_messages, expected_messages]
    expected_meta = {k: record[k] for k in ("intent", "category", "task") if k in record}
    # Header = line 1 in a CSV, so its rows start one line later than in JSON Lines.
    first_line = 1 if file_format == "jsonl" else 2
    assert examples[0].meta == {**expected_meta, "source_line": first_line}


def test_alpaca_without_input_keeps_instruction_alone(tmp_path):
    path = write_jsonl(
        tmp_path / "alpaca.jsonl", [{"instruction": "Say hi.", "input": "", "output": "Hi!"}]
    )
    examples, _ = load_examples(path)
    assert examples[0].messages == [user("Say hi."), assistant("Hi!")]


def test_json_list_file_reports_line_numbers(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(
        '[\n  {"instruction": "a?", "response": "b"},\n'
        '  {"instruction": "c?"},\n'
        '  {"instruction": "d?", "response": "e"}\n]\n'
    )
    examples, stats = load_examples(path)
    assert [e.meta["source_line"] for e in examples] == [2, 4]
    assert [str(m) for m in stats.malformed] == ["line 3: missing field 'response'"]


def test_unknown_shape_lists_the_accepted_shapes(tmp_path):
    jsonl = write_jsonl(tmp_path / "qa.jsonl", [{"question": "a?", "answer": "b"}])
    with pytest.raises(SupportLMError) as error:
        load_examples(jsonl)
    message = str(error.value)
    assert message.startswith(f"{jsonl} has no record in an accepted shape (line 1: keys question")
    for shape, example in SHAPES.items():
        assert f"{shape} {example}" in message

    csv_path = tmp_path / "qa.csv"
    csv_path.write_text("question,answer\na?,b\n")
    with pytest.raises(SupportLMError, match="columns question, answer, which fit none") as error:
        load_examples(csv_path)
    assert all(shape in str(error.value) for shape in SHAPES)


def test_shape_is_detected_from_the_first_valid_record(tmp_path):
    path = write_jsonl(
        tmp_path / "data.jsonl",
        [
            {"messages": "not a list"},
            {"instruction": "a?", "response": "b"},
            {"messages": [user("c?"), assistant("d")]},
        ],
    )
    examples, stats = load_examples(path)
    assert stats.shape == "instruction_response"
    assert len(examples) == 1
    assert [str(m) for m in stats.malformed] == [
        "line 1: field 'messages' must be a non-empty list",
        "line 3: missing field 'instruction'",
    ]


# --- malformed records and missing data --------------------------------------------------------

MALFORMED_JSONL = "\n".join(
    [
        json.dumps({"messages": [user("a?"), assistant("b")]}),
        '{"messages": [',
        "",
        json.dumps({"messages": [user("a?"), {"role": "bot", "content": "b"}]}),
        json.dumps({"messages": [user("a?"), assistant(42)]}),
        json.dumps({"messages": [assistant("b"), user("a?")]}),
        json.dumps({"messages": [user("c?"), assistant("d")]}),
    ]
)


def test_malformed_jsonl_lines_are_skipped_and_counted(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(MALFORMED_JSONL)

    examples, stats = load_examples(path)

    assert [e.meta["source_line"] for e in examples] == [1, 7]
    assert (stats.num_records, stats.num_malformed, stats.num_loaded) == (6, 4, 2)
    assert [str(m) for m in stats.malformed] == [
        "line 2: invalid JSON (Expecting value at column 15)",
        "line 4: message 2 has role 'bot' where 'assistant' was expected "
        "(after an optional system message, user and assistant alternate)",
        "line 5: message 2 needs text 'role' and 'content'",
        "line 6: message 1 has role 'assistant' where 'user' was expected "
        "(after an optional system message, user and assistant alternate)",
    ]


def test_malformed_jsonl_line_raises_in_strict_mode(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(MALFORMED_JSONL)
    with pytest.raises(SupportLMError, match=r"x\.jsonl line 2: invalid JSON \(Expecting value"):
        load_examples(path, strict=True)


def test_csv_malformed_row_is_reported_with_its_file_line(tmp_path):
    path = tmp_path / "x.csv"
    # The first answer spans three physical lines, so the short row is on file line 5.
    path.write_text(
        "instruction,response,intent\n"
        'cancel my order,"Sure:\n\n1. Open Orders.",cancel_order\n'
        "where is my refund?\n"
        "change my address,Open Account settings.,change_address\n"
    )

    examples, stats = load_examples(path)
    assert [e.meta["source_line"] for e in examples] == [2, 6]
    assert examples[0].messages[1]["content"] == "Sure:\n\n1. Open Orders."
    assert [str(m) for m in stats.malformed] == ["line 5: 1 fields where the header has 3"]

    with pytest.raises(SupportLMError, match=r"x\.csv line 5: 1 fields where the header has 3"):
        load_examples(path, strict=True)


def test_missing_file_is_one_clear_sentence(tmp_path):
    with pytest.raises(SupportLMError, match=r"^Data file not found: .*nope\.jsonl\.$"):
        load_examples(tmp_path / "nope.jsonl")


def test_unreachable_hub_dataset_is_a_clear_error():
    # A subprocess, because the Hub's offline switch is read when huggingface_hub is imported;
    # offline, the failure is immediate instead of retried for half a minute.
    script = (
        "from supportlm.train.data.examples import load_examples\n"
        "from supportlm.errors import SupportLMError\n"
        "try:\n"
        "    load_examples('no-such-owner/no-such-dataset')\n"
        "except SupportLMError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.startswith(
        "'no-such-owner/no-such-dataset' is neither a local file nor a Hugging Face dataset"
    )


@pytest.mark.skipif(
    not (REPO_ROOT / DEFAULT_DATASET).is_file(), reason="the bundled dataset is not written yet"
)
def test_default_dataset_is_found_from_another_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    examples, stats = load_examples(DEFAULT_DATASET)
    assert stats.shape == "chat"
    assert examples


# --- cleaning ----------------------------------------------------------------------------------


def test_normalize_text_exact():
    raw = (
        "Cafe\u0301  is\t\topen\u00a0 now.  \r\n\r\n\r\n\r\n1. Tea  \r\n\t a. green\r2. Coffee   \n"
    )
    assert normalize_text(raw) == "Café is open now.\n\n1. Tea\n     a. green\n2. Coffee"
    assert normalize_text(" \n\t \n") == ""


def test_clean_drops_empty_and_duplicates_after_normalisation():
    examples = [
        exchange(QUESTION, ANSWER, intent="track_order"),
        exchange("Where  is my order?\t", ANSWER.replace("\n", "\r\n") + "  "),
        exchange(QUESTION, "Let me check that for you."),
        exchange("Cafe\u0301?", "Yes."),
        exchange("Café?", "Yes."),
        exchange("Hello?", " \n "),
    ]

    cleaned, stats = clean_examples(examples)

    assert [e.messages for e in cleaned] == [
        [user(QUESTION), assistant(ANSWER)],
        [user(QUESTION), assistant("Let me check that for you.")],
        [user("Café?"), assistant("Yes.")],
    ]
    assert cleaned[0].meta == {"intent": "track_order"}
    assert (stats.num_input, stats.empty_dropped, stats.duplicates_dropped) == (6, 1, 2)
    assert stats.num_tokens == []


def test_too_long_examples_are_dropped_with_the_system_prompt_counted(tokenizer):
    short = exchange("Where is my order?", "On its way.")
    long = exchange("Where is my order?", "It left our warehouse this morning. " * 10)
    system_prompt = "Be kind."
    short_ids = tokenize_conversation(tokenizer, with_system_prompt(short.messages, system_prompt))
    limit = len(short_ids["input_ids"])

    cleaned, stats = clean_examples(
        [short, long], tokenizer=tokenizer, system_prompt=system_prompt, max_seq_length=limit
    )

    assert [e.messages for e in cleaned] == [short.messages]
    assert stats.too_long_dropped == 1
    assert stats.num_tokens == [limit]
    supervised = sum(label != IGNORE_INDEX for label in short_ids["labels"])
    # "On its way." is 4 word tokens; the closing <|im_end|> is supervised too.
    assert stats.num_supervised_tokens == [supervised] == [5]

    # One token shorter and the system prompt alone pushes the short example out as well.
    with pytest.raises(SupportLMError, match="of 2, 0 had an empty message, 0 were duplicates"):
        clean_examples(
            [short, long],
            tokenizer=tokenizer,
            system_prompt=system_prompt,
            max_seq_length=limit - 1,
        )
    kept, _ = clean_examples([short], tokenizer=tokenizer, max_seq_length=limit - 1)
    assert len(kept) == 1


def test_empty_after_cleaning_is_a_clear_error():
    with pytest.raises(SupportLMError, match=r"^No examples left after cleaning: of 2, 2 had"):
        clean_examples([exchange("Hi?", ""), exchange("Hello?", "\t")])


def test_with_system_prompt_keeps_an_existing_system_message():
    messages = [user("a?"), assistant("b")]
    assert with_system_prompt(messages, "Be kind.") == [
        {"role": "system", "content": "Be kind."},
        *messages,
    ]
    own = [{"role": "system", "content": "Be brief."}, *messages]
    assert with_system_prompt(own, "Be kind.") == own


# --- splitting ---------------------------------------------------------------------------------


def _question_bank(n: int) -> list[Example]:
    """`n` questions, each asked twice with different answers and spellings."""
    examples = []
    for i in range(n):
        examples.append(exchange(f"How do I change order {i}?", f"Open order {i}."))
        examples.append(exchange(f"how do I  change ORDER {i}?", f"Call us about order {i}."))
    return examples


def test_split_is_deterministic_leak_free_and_order_independent():
    examples = _question_bank(500)

    splits = split_examples(examples)

    split_of = {id(e): name for name, members in splits.items() for e in members}
    assert all(assign_split(e) == split_of[id(e)] for e in examples)
    # The same question (up to case and spacing) never lands in two splits.
    for i in range(0, len(examples), 2):
        assert split_of[id(examples[i])] == split_of[id(examples[i + 1])]
    sizes = {name: len(members) for name, members in splits.items()}
    assert sum(sizes.values()) == 1000
    assert 60 <= sizes["validation"] <= 140 and 60 <= sizes["test"] <= 140

    shuffled = examples[:]
    random.Random(0).shuffle(shuffled)
    subset = shuffled[:37]
    for other in (split_examples(shuffled), split_examples(subset)):
        for name, members in other.items():
            assert all(split_of[id(e)] == name for e in members)


def test_split_ratios_are_configurable_and_checked():
    examples = _question_bank(50)
    splits = split_examples(examples, validation_ratio=0, test_ratio=0)
    assert {name: len(members) for name, members in splits.items()} == {
        "train": 100,
        "validation": 0,
        "test": 0,
    }
    with pytest.raises(SupportLMError, match="leave some examples for training"):
        split_examples(examples, validation_ratio=0.5, test_ratio=0.5)


def test_sample_examples_is_deterministic_and_keeps_file_order():
    examples = [exchange(f"question {i}?", f"answer {i}") for i in range(100)]
    sample = sample_examples(examples, 10)
    shuffled = examples[:]
    random.Random(1).shuffle(shuffled)
    assert len(sample) == 10
    assert sorted(id(e) for e in sample_examples(shuffled, 10)) == sorted(id(e) for e in sample)
    positions = [examples.index(e) for e in sample]
    assert positions == sorted(positions)
    assert positions != list(range(10))


def test_stratified_sample_keeps_each_intent_in_proportion_and_is_fixed():
    examples = []
    for intent, count in (("refund", 60), ("cancel_order", 30), ("delivery", 9), ("rare", 1)):
        for i in range(count):
            examples.append(exchange(f"{intent} question {i}?", f"answer {i}"))
            examples[-1].meta["intent"] = intent
    sample = stratified_sample(examples, 20)
    counts = Counter(e.meta["intent"] for e in sample)
    assert len(sample) == 20
    assert counts["refund"] == 12 and counts["cancel_order"] == 6  # 60 % and 30 % of 20
    assert 1 <= counts["delivery"] <= 2 and counts["rare"] <= 1
    shuffled = examples[:]
    random.Random(3).shuffle(shuffled)
    assert {id(e) for e in stratified_sample(shuffled, 20)} == {id(e) for e in sample}
    positions = [examples.index(e) for e in sample]
    assert positions == sorted(positions)
    assert stratified_sample(examples, 500) == examples


# --- the whole pipeline and its report ---------------------------------------------------------


def test_prepare_dataset_reports_every_step(tmp_path, tokenizer):
    records = [
        {"instruction": f"Where is order {i}?", "response": "On its way.", "intent": "track_order"}
        for i in range(30)
    ]
    records += [
        {"instruction": "Where is order 0?", "response": "On  its way.", "intent": "track_order"},
        {"instruction": "Refund me", "response": "", "intent": "get_refund"},
        {"instruction": "Refund me please", "response": "Done. " * 40, "intent": "get_refund"},
        {"instruction": "Refund me now", "response": "Sure.", "intent": "get_refund"},
    ]
    path = write_jsonl(tmp_path / "data.jsonl", records)
    with path.open("a") as file:
        file.write("not json\n")

    data = DataArguments(dataset=str(path), max_seq_length=40, validation_ratio=0.2)
    prepared = prepare_dataset(data, tokenizer, system_prompt="Be kind.")
    report = prepared.report

    assert report.num_records == 35
    assert report.dropped == {
        "malformed": 1,
        "empty": 1,
        "duplicate": 1,
        "not_sampled": 0,
        "too_long": 1,
    }
    assert report.num_examples == 31
    assert sum(report.splits.values()) == 31
    assert report.splits == {name: len(members) for name, members in prepared.splits.items()}
    assert report.by_intent == {"track_order": 30, "get_refund": 1}
    assert report.malformed_examples == ["line 35: invalid JSON (Expecting value at column 1)"]
    assert report.multi_turn == 0
    # "On its way." is 4 tokens plus the supervised <|im_end|>; "Sure." (3) is under 10%.
    assert report.token_lengths["supervised"] == {
        "p50": 5,
        "p90": 5,
        "p95": 5,
        "p99": 5,
        "max": 5,
    }
    assert report.token_lengths["total"]["max"] <= 40

    report.save(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "data_report.json").read_text()) == report.to_dict()
    markdown = (tmp_path / "out" / "data_report.md").read_text()
    assert "| malformed records skipped | 1 | 34 |" in markdown
    assert "| longer than 40 tokens | 1 | 31 |" in markdown
    assert "max_examples" not in markdown
    assert "| track_order | 30 |" in markdown
    assert "line 35: invalid JSON" in markdown


def test_prepare_dataset_max_examples_samples_after_deduplication(tmp_path, tokenizer):
    records = [{"instruction": f"Question {i}?", "response": "Answer."} for i in range(20)]
    path = write_jsonl(tmp_path / "data.jsonl", records + records)

    data = DataArguments(dataset=str(path), max_seq_length=100, max_examples=8)
    prepared = prepare_dataset(data, tokenizer, system_prompt=None)

    assert sum(len(members) for members in prepared.splits.values()) == 8
    assert prepared.report.dropped["duplicate"] == 20
    assert prepared.report.dropped["not_sampled"] == 12
    assert "| not sampled (max_examples) | 12 | 8 |" in prepared.report.to_markdown()


@pytest.mark.skipif(not BITEXT_CSV.is_file(), reason="Bitext customer-support CSV not available")
def test_real_bitext_csv_loads_every_row_with_intents():
    examples, stats = load_examples(BITEXT_CSV, strict=True)

    assert stats.shape == "instruction_response"
    assert len(examples) == 3828
    assert all(len(e.messages) == 2 and e.meta["intent"] for e in examples)
    assert len({e.meta["intent"] for e in examples}) == 27
    assert {e.meta["category"] for e in examples} >= {"ORDER", "REFUND", "ACCOUNT"}
    cleaned, _ = clean_examples(examples)
    assert len(cleaned) == 3828
    assert all("\r" not in m["content"] for e in cleaned for m in e.messages)


def test_the_bundled_dataset_is_found_from_any_working_directory(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert (REPO_ROOT / DEFAULT_DATASET).is_file()
    examples, _ = load_examples(DEFAULT_DATASET)
    assert len(examples) > 100
