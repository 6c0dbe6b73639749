"""The feedback store's schema as numbered migrations (`supportlm.feedback.store` applies them).

Migration N (1-based) brings a database from version N-1 to N; a database written by an older
version is brought up to date when it is opened, one migration per transaction.
"""

from __future__ import annotations

#: Schema migrations; migration N (1-based) brings a database from version N-1 to N.
MIGRATIONS: tuple[str, ...] = (
    # 1: feedback and votes, as the first release wrote them.
    """
    CREATE TABLE IF NOT EXISTS feedback (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        created_at TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('like', 'dislike', 'correction')),
        conversation TEXT NOT NULL,
        message_index INTEGER,
        reply TEXT,
        corrected_answer TEXT,
        model_id TEXT,
        adapter_id TEXT,
        backend TEXT,
        settings TEXT
    );
    CREATE TABLE IF NOT EXISTS votes (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        created_at TEXT NOT NULL,
        question TEXT NOT NULL,
        base_answer TEXT NOT NULL,
        tuned_answer TEXT NOT NULL,
        choice TEXT NOT NULL CHECK (choice IN ('base', 'tuned', 'tie', 'both_bad')),
        model_id TEXT,
        adapter_id TEXT,
        settings TEXT
    );
    """,
    # 2: server-issued replies with the adapter version that wrote them; feedback names them.
    """
    CREATE TABLE replies (
        reply_id TEXT PRIMARY KEY,
        created_at TEXT NOT NULL,
        conversation TEXT NOT NULL,
        reply TEXT NOT NULL,
        finish_reason TEXT,
        model_id TEXT,
        adapter_id TEXT,
        adapter_version TEXT,
        backend TEXT,
        settings TEXT
    );
    ALTER TABLE feedback ADD COLUMN reply_id TEXT REFERENCES replies (reply_id);
    ALTER TABLE feedback ADD COLUMN adapter_version TEXT;
    ALTER TABLE votes ADD COLUMN base_reply_id TEXT REFERENCES replies (reply_id);
    ALTER TABLE votes ADD COLUMN tuned_reply_id TEXT REFERENCES replies (reply_id);
    ALTER TABLE votes ADD COLUMN adapter_version TEXT;
    """,
    # 3: the conversation (browser session) a reply belongs to, so one can be erased on request.
    """
    ALTER TABLE replies ADD COLUMN conversation_id TEXT;
    CREATE INDEX replies_conversation ON replies (conversation_id);
    CREATE INDEX replies_created ON replies (created_at);
    """,
    # 4: the intent the classifier detected, and whether it was handed over to a person.
    """
    ALTER TABLE replies ADD COLUMN intent TEXT;
    ALTER TABLE replies ADD COLUMN handover INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX replies_handover ON replies (handover, created_at);
    """,
    # 5: who gave the feedback, and the trust gate (supportlm.feedback.review): a row becomes
    # training data when a signed-in agent wrote it or a person approved it.
    """
    ALTER TABLE feedback ADD COLUMN author TEXT;
    ALTER TABLE feedback ADD COLUMN trusted INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE feedback ADD COLUMN review TEXT;
    ALTER TABLE feedback ADD COLUMN reviewed_by TEXT;
    ALTER TABLE feedback ADD COLUMN reviewed_at TEXT;
    ALTER TABLE votes ADD COLUMN author TEXT;
    ALTER TABLE votes ADD COLUMN trusted INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE votes ADD COLUMN review TEXT;
    ALTER TABLE votes ADD COLUMN reviewed_by TEXT;
    ALTER TABLE votes ADD COLUMN reviewed_at TEXT;
    """,
    # 6: which assistant turns the server wrote. A reply's `turn_digest` hashes its conversation
    # and its own text; `history_verified` says every earlier assistant turn in its conversation
    # is a reply this server stored (found by digest), so none was typed by a client. Feedback
    # copies the flag: an unverified history never becomes training data (feedback_export).
    # Rows from before it stay unverified. `exports` lists the export folders written from this
    # store, so erasure and retention reach those copies too (supportlm.feedback.derived).
    """
    ALTER TABLE replies ADD COLUMN turn_digest TEXT;
    ALTER TABLE replies ADD COLUMN history_verified INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX replies_turn_digest ON replies (turn_digest);
    ALTER TABLE feedback ADD COLUMN history_verified INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE exports (path TEXT PRIMARY KEY, created_at TEXT NOT NULL);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
