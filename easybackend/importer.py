"""
C{easybackend-import DIR [--db PATH]}: bring the old design's conversation
files into the database.

The old design kept one file per conversation, C{DIR/<id>.json}: a JSON
list of strings shaped C{"User: <prompt>\\n\\n\\nChatGPT: <answer><|im_end|>\\n"}.
Each file becomes one conversation with the file's stem as its id, written
in one transaction through L{easybackend.store.Store} (so the schema and
its migrations are the store's).  A file is skipped, with its reason, when
its stem is not a valid id, it is not such a list, or the conversation
already exists: running the command twice imports nothing twice.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

from attrs import define, field, frozen
from twisted.internet import task

from easybackend.model import CONVERSATION_ID, Turn
from easybackend.store import Store, StoreError

#: Where the database is when neither --db nor EASYBACKEND_DB says.
DEFAULT_DB = os.path.join("conversations", "easybackend.sqlite3")

_USER = re.compile(r"\A\s*User:[ \t]?")
_ANSWER = re.compile(r"\n[ \t]*ChatGPT:[ \t]?")
_END = "<|im_end|>"


def approximate_tokens(text: str) -> int:
    """
    A cheap token count, about four characters a token; the default, as
    the exact count would need the tokenizer loaded.
    """
    return len(text) // 4 + 1


class InvalidFile(ValueError):
    """The file is not a conversation of the old design; says why."""


@frozen
class OldTurn:
    """One entry of an old file: a prompt and its (maybe empty) answer."""

    prompt: str
    answer: str


def parse_entry(entry: object, number: int) -> OldTurn:
    """
    Split one old entry into prompt and answer.  Tolerates CRLF, a missing
    C{<|im_end|>} and a missing C{ChatGPT:} part (an empty answer); an
    entry that is not a string starting with C{User:}, or that holds the
    NUL character, is invalid.
    """
    if not isinstance(entry, str):
        raise InvalidFile(f"entry {number} is not a string")
    if "\x00" in entry:
        # PostgreSQL cannot store it; the server refuses it in prompts too.
        raise InvalidFile(f"entry {number} holds the NUL character (U+0000)")
    text = entry.replace("\r\n", "\n").replace("\r", "\n")
    start = _USER.match(text)
    if start is None:
        raise InvalidFile(f'entry {number} does not start with "User:"')
    text = text[start.end():].rstrip()
    while text.endswith(_END):
        text = text[: -len(_END)].rstrip()
    split = _ANSWER.search(text)
    if split is None:
        return OldTurn(prompt=text.strip(), answer="")
    return OldTurn(
        prompt=text[: split.start()].strip(), answer=text[split.end():].strip()
    )


def parse_file(data: bytes) -> list[OldTurn]:
    """The turns of one old file's bytes; L{InvalidFile} says what is wrong."""
    try:
        entries = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise InvalidFile("not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise InvalidFile(f"not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(entries, list):
        raise InvalidFile("not a JSON list")
    if not entries:
        raise InvalidFile("no turns")
    return [parse_entry(entry, n) for n, entry in enumerate(entries, 1)]


def conversation_id_for(name: str) -> str:
    """
    The conversation id for a file stem; L{InvalidFile} unless it is a valid
    id (no path separators, nothing outside C{CONVERSATION_ID}).
    """
    if not CONVERSATION_ID.match(name):
        raise InvalidFile(f"{name!r} is not a valid conversation id")
    return name


@define
class Report:
    """What one import did: file names imported, and skipped with reasons."""

    imported: list[str] = field(factory=list)
    skipped: list[tuple[str, str]] = field(factory=list)
    #: how many of C{skipped} were there already
    existing: int = 0


async def import_directory(
    store: Store,
    directory: str | os.PathLike[str],
    *,
    count_tokens: Callable[[str], int] = approximate_tokens,
    model: str | None = None,
    owner: str | None = None,
    out: TextIO | None = None,
) -> Report:
    """
    Import every C{directory/*.json} file, in name order, printing one line
    per file to C{out}.  Each file is one transaction: it is stored whole or
    not at all.  The turns' times are the file's modification time.
    """
    report = Report()
    for path in sorted(Path(directory).glob("*.json")):
        reason = None
        try:
            cid = conversation_id_for(path.stem)
            if not path.is_file():
                raise InvalidFile("not a regular file")
            old = parse_file(path.read_bytes())
            now = path.stat().st_mtime
        except InvalidFile as e:
            reason = str(e)
        except OSError as e:
            reason = f"cannot read it ({e.strerror})"
        else:
            turns = [
                Turn(
                    conversation_id=cid,
                    parent_id=None,
                    prompt=t.prompt,
                    prompt_tokens=count_tokens(t.prompt),
                    answer=t.answer,
                    answer_tokens=count_tokens(t.answer),
                    model=model or "",
                    finish_reason=None,
                    usage=None,
                    owner=owner,
                )
                for t in old
            ]
            if await store.import_conversation(turns, now, model=model):
                report.imported.append(path.name)
                _say(out, f"imported {path.name}: {len(turns)} turns")
                continue
            reason = "the conversation already exists"
            report.existing += 1
        report.skipped.append((path.name, reason))
        _say(out, f"skipped  {path.name}: {reason}")
    _say(
        out,
        f"{len(report.imported)} imported, {len(report.skipped)} skipped"
        f" ({report.existing} already there)",
    )
    return report


def _say(out: TextIO | None, line: str) -> None:
    print(line, file=out if out is not None else sys.stdout)


def parse_args(
    argv: Sequence[str] | None, environ: dict[str, str] | None = None
) -> argparse.Namespace:
    """The command line, with C{--db} defaulting to C{EASYBACKEND_DB}."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="easybackend-import",
        description="Import the old design's DIR/*.json conversation files.",
    )
    parser.add_argument("directory", metavar="DIR")
    parser.add_argument(
        "--db",
        default=environ.get("EASYBACKEND_DB") or DEFAULT_DB,
        help="the SQLite database (default: $EASYBACKEND_DB or %(default)s);"
        " its folder must exist",
    )
    parser.add_argument("--model", help="record this model on the imports")
    parser.add_argument("--owner", help="the key name that owns the imports")
    return parser.parse_args(argv)


async def _run(reactor: Any, args: argparse.Namespace) -> None:
    if not os.path.isdir(args.directory):
        raise SystemExit(f"easybackend-import: {args.directory} is not a folder")
    try:
        store = await Store.open(args.db, reactor)
    except StoreError as e:
        raise SystemExit(f"easybackend-import: {e}") from None
    try:
        await import_directory(
            store, args.directory, model=args.model, owner=args.owner
        )
    finally:
        store.close()


def main(argv: Sequence[str] | None = None) -> None:
    """The C{easybackend-import} console command."""
    task.react(_run, (parse_args(argv),))


if __name__ == "__main__":
    main()
