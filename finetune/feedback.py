"""The feedback store from the command line: export it as training data, erase, purge, list.

    python finetune/feedback.py export --out outputs/feedback-2026-12-01/   # sft/kto/dpo/heldout
    python finetune/feedback.py export --out DIR --adapter_version v-... --since 2026-11-01

    python finetune/feedback.py erase --conversation ID      # the id shown under the chat
    python finetune/feedback.py erase --reply REPLY_ID       # the conversation of that reply
    python finetune/feedback.py purge --days 30              # rows older than 30 days
    python finetune/feedback.py handovers                    # messages a person must handle

``--db`` names the store (default: ``SUPPORTLM_FEEDBACK_DB``, else .supportlm/feedback.sqlite3).
See `supportlm.serve.feedback_export` and `supportlm.serve.retention`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import supportlm
from supportlm.errors import SupportLMError
from supportlm.serve.feedback import FeedbackStore
from supportlm.serve.feedback_export import ExportFilter, export_feedback
from supportlm.serve.retention import erase_conversation, erase_reply_conversation, purge_older_than
from supportlm.serve.settings import AppSettings


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--db", help="the SQLite store; default: the app's")
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write the feedback as TRL training data")
    export.add_argument("--out", required=True, help="a new folder for the export")
    export.add_argument("--adapter_version", help="only feedback on replies of this version")
    export.add_argument("--since", help="only feedback from this date on (YYYY-MM-DD)")
    export.add_argument("--until", help="only feedback up to this date (YYYY-MM-DD)")
    export.add_argument(
        "--heldout_share", type=float, default=0.2, help="questions held out for evaluation"
    )
    export.add_argument(
        "--no_likes", action="store_true", help="liked replies are not supervised examples"
    )
    erase = commands.add_parser("erase", help="delete one conversation's rows")
    which = erase.add_mutually_exclusive_group(required=True)
    which.add_argument("--conversation", help="the conversation id shown under the chat")
    which.add_argument("--reply", help="a reply id of the conversation")
    purge = commands.add_parser("purge", help="delete rows older than --days")
    purge.add_argument("--days", type=int, required=True)
    handovers = commands.add_parser("handovers", help="list messages handed over to a person")
    handovers.add_argument("--limit", type=int, default=20, help="newest messages shown")
    return parser.parse_args(argv)


def print_handovers(store: FeedbackStore, limit: int) -> None:
    """Counts by intent, then the newest handed-over messages (redacted, as stored)."""
    counts = store.handover_counts()
    print(f"handed over: {sum(counts.values())}")
    for intent, count in counts.items():
        print(f"  {intent}: {count}")
    for reply in store.list_handovers(limit):
        question = next(
            (m["content"] for m in reversed(reply["conversation"]) if m["role"] == "user"), ""
        )
        print(f"{reply['created_at']}  {reply['intent']}  {reply['conversation_id']}  {question}")


def run_export(store: FeedbackStore, args: argparse.Namespace) -> None:
    filters = ExportFilter(args.adapter_version, args.since, args.until)
    report = export_feedback(
        store,
        args.out,
        filters=filters,
        heldout_share=args.heldout_share,
        include_likes=not args.no_likes,
    )
    print(report.to_markdown())
    print(f"written to {args.out}")


def main(argv: Sequence[str] | None = None) -> int:
    supportlm.setup_logging()
    args = parse_args(argv)
    try:
        store = FeedbackStore(args.db or AppSettings.from_env().feedback_db)
        if args.command == "export":
            run_export(store, args)
            return 0
        if args.command == "handovers":
            print_handovers(store, args.limit)
            return 0
        if args.command == "purge":
            counts = purge_older_than(store, args.days)
        elif args.conversation:
            counts = erase_conversation(store, args.conversation)
        else:
            counts = erase_reply_conversation(store, args.reply)
    except SupportLMError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("deleted: " + ", ".join(f"{count} {table}" for table, count in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
