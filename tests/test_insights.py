"""What the Insights tab shows: satisfaction per adapter version, unhappy questions and intents."""

import pytest

from supportlm.feedback.insights import by_day, by_version, most_disliked, unhappy_intents
from supportlm.feedback.store import FeedbackStore, ReplyRecord


@pytest.fixture
def store(tmp_path):
    store = FeedbackStore(tmp_path / "fb.sqlite3")
    replies = [  # (id, version, intent, question, feedback)
        ("a1", "v-old", "track_order", "Where is my parcel?", ["dislike", "correction"]),
        ("a2", "v-old", "track_order", "Where is my parcel?", ["dislike"]),
        ("a3", "v-old", "get_refund", "Refund please", ["like"]),
        ("b1", "v-new", "track_order", "Where is my order?", ["like"]),
        ("b2", "v-new", "get_refund", "My money back?", []),
        ("b3", "v-new", "get_refund", "Refund?", ["like"]),
    ]
    for reply_id, version, intent, question, kinds in replies:
        conversation = [{"role": "user", "content": question}]
        store.add_reply(
            ReplyRecord(
                reply_id, conversation, "An answer.", adapter_version=version, intent=intent
            )
        )
        for kind in kinds:
            answer = "The right answer." if kind == "correction" else None
            store.add_feedback(kind, reply_id, corrected_answer=answer)
    store.add_reply(ReplyRecord("base", [{"role": "user", "content": "Refund?"}], "Base."))
    store.add_vote("base", "b3", "tuned")
    return store


def test_like_share_correction_rate_and_votes_per_version(store):
    rows = {row["version"]: row for row in by_version(store)}
    old, new = rows["v-old"], rows["v-new"]
    assert (old["replies"], old["likes"], old["dislikes"], old["corrections"]) == (3, 1, 2, 1)
    assert old["like_share"] == pytest.approx(1 / 3, abs=1e-3)
    assert old["correction_rate"] == pytest.approx(1 / 3, abs=1e-3)
    assert new["like_share"] == 1.0 and new["correction_rate"] == 0.0
    assert new["votes_tuned"] == 1 and old["votes_tuned"] == 0
    assert rows["(base)"]["like_share"] is None  # no rating: no share, not zero


def test_per_day_rows_feed_the_plots(store):
    rows = by_day(store)
    assert {row["version"] for row in rows} == {"v-old", "v-new", "(base)"}
    assert sum(row["replies"] for row in rows) == 7


def test_the_most_disliked_question_and_intent_come_first(store):
    top = most_disliked(store)[0]
    assert top["question"] == "Where is my parcel?" and top["intent"] == "track_order"
    assert (top["dislikes"], top["corrections"]) == (2, 1)  # over both its replies
    intents = unhappy_intents(store)
    assert intents[0]["intent"] == "track_order"
    assert intents[0]["unhappy_share"] == pytest.approx(2 / 3, abs=1e-3)


class SignedIn:
    """What `gr.Request` carries for a user signed in with SUPPORTLM_AUTH."""

    def __init__(self, username):
        self.username = username


def test_insights_are_for_agents_when_a_login_is_configured():
    import gradio as gr

    from supportlm.serve.settings import AppSettings
    from supportlm.serve.ui.insights import is_agent, require_agent

    open_app = AppSettings(model="echo", backend="transformers")
    assert not is_agent(None, open_app)  # no login: nobody is an agent, Insights are off
    with pytest.raises(gr.Error, match="Insights are off"):
        require_agent(None, open_app)
    operated = AppSettings(model="echo", backend="transformers", admin_token="s3cret")
    assert require_agent(None, operated, "s3cret") == "operator"
    for wrong in ("", "s3cre", "s3cret "):
        with pytest.raises(gr.Error, match="admin token"):
            require_agent(None, operated, wrong)
    team = AppSettings(model="echo", backend="transformers", auth="ann:1,bob:2", agents="ann")
    assert is_agent(SignedIn("ann"), team) and require_agent(SignedIn("ann"), team) == "ann"
    assert not is_agent(SignedIn("bob"), team) and not is_agent(None, team)
    with pytest.raises(gr.Error, match="signed-in agents"):
        require_agent(SignedIn("bob"), team)
