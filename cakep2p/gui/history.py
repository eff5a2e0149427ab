"""Chat history on disk: one append-only JSONL file per chat in the data dir (text only), exportable as Markdown.

A ChatLog follows the window's Transcript: each time the transcript's history changes, the log writes the
few records that make its messages equal it again (a new message, a truncated end, a dropped oldest turn).
Each record is fsync'ed as soon as it exists, so a crash loses at most the answer being written; a torn
last line is skipped when the file is read back.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from cakep2p import paths

HISTORY_DIR_NAME = "chats"


@dataclass(frozen=True)
class StoredMessage:
    role: str
    content: str


def history_dir() -> Path:
    path = paths.data_dir() / HISTORY_DIR_NAME
    path.mkdir(parents=True, exist_ok=True)
    return path


class ChatLog:
    """One chat's file. Records: {"type": "meta"}, {"type": "message", role, content}, {"type": "truncate", keep},
    {"type": "drop_first", count}, {"type": "title", title}."""

    def __init__(self, path: Path, *, model: str = "", system_prompt: str | None = None):
        self.path = Path(path)
        self.model = model
        self.system_prompt = system_prompt
        self._messages: list[StoredMessage] = []
        self._title: str | None = None     # a name the user gave the chat
        self.created = time.time()
        if self.path.exists():
            self._replay()

    @property
    def messages(self) -> list[StoredMessage]:
        return list(self._messages)

    @property
    def title(self) -> str:
        if self._title:
            return self._title
        first = next((message.content for message in self._messages if message.role == "user"), "")
        line = " ".join(first.split())
        return (line[:60] + "…") if len(line) > 60 else (line or "(empty chat)")

    def follow(self, history: Sequence[Mapping[str, str]]) -> None:
        """Make the stored messages equal `history` ({"role", "content"} dicts) with the fewest records: keep the
        longest run of stored messages that still opens `history` (after dropping some oldest ones, or none),
        then append the rest."""
        wanted = [StoredMessage(str(message["role"]), str(message["content"])) for message in history]
        stored = self._messages
        if wanted == stored:
            return
        kept_at_start = 0
        while kept_at_start < min(len(stored), len(wanted)) and stored[kept_at_start] == wanted[kept_at_start]:
            kept_at_start += 1
        dropped = next((count for count in range(1, len(stored)) if wanted and stored[count] == wanted[0]
                        and stored[count:] == wanted[:len(stored) - count]), len(stored))
        if dropped < len(stored) and len(stored) - dropped > kept_at_start:
            self.drop_first(dropped)
        else:
            self.truncate(kept_at_start)
        for message in wanted[len(self._messages):]:
            self.append(message.role, message.content)

    def append(self, role: str, content: str, **extra) -> None:
        """Store one message now (user messages when sent, answers when they end)."""
        self._messages.append(StoredMessage(role, content))
        self._write({"type": "message", "role": role, "content": content, "time": time.time(), **extra})

    def truncate(self, keep: int) -> None:
        """Keep only the first `keep` messages (regenerate, or dropping the oldest turn uses `drop_first`)."""
        keep = max(0, min(keep, len(self._messages)))
        if keep != len(self._messages):
            del self._messages[keep:]
            self._write({"type": "truncate", "keep": keep})

    def drop_first(self, count: int) -> None:
        """Forget the first `count` messages (the oldest turn, when the chat outgrew the context)."""
        count = max(0, min(count, len(self._messages)))
        if count:
            del self._messages[:count]
            self._write({"type": "drop_first", "count": count})

    def rename(self, title: str) -> None:
        """Give the chat a name (an empty one goes back to its first question)."""
        self._title = " ".join(title.split())[:120] or None
        self._write({"type": "title", "title": self._title or ""})

    @property
    def updated(self) -> float:
        """When the chat last changed (its file's modification time; its creation before it has one)."""
        try:
            return self.path.stat().st_mtime
        except OSError:
            return self.created

    def to_markdown(self) -> str:
        lines = [f"# {self.title}", ""]
        if self.model:
            lines += [f"*Model: {self.model} — {time.strftime('%Y-%m-%d %H:%M', time.localtime(self.created))}*", ""]
        if self.system_prompt:
            lines += ["**System:** " + self.system_prompt, ""]
        for message in self._messages:
            heading = "You" if message.role == "user" else "Assistant" if message.role == "assistant" else message.role
            lines += [f"## {heading}", "", message.content.strip(), ""]
        return "\n".join(lines).rstrip() + "\n"

    def export_markdown(self, target: str | Path) -> Path:
        target = Path(target)
        target.write_text(self.to_markdown(), encoding="utf-8")
        return target

    def _write(self, record: dict) -> None:
        fresh = not self.path.exists()
        with open(self.path, "a", encoding="utf-8") as handle:
            if fresh:
                meta = {"type": "meta", "model": self.model, "system_prompt": self.system_prompt,
                        "created": self.created}
                handle.write(json.dumps(meta, ensure_ascii=False) + "\n")
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def _replay(self) -> None:
        with open(self.path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a crash
                if not isinstance(record, dict):
                    continue
                kind = record.get("type")
                if kind == "meta":
                    self.model = str(record.get("model") or "")
                    self.system_prompt = record.get("system_prompt")
                    self.created = float(record.get("created") or self.created)
                elif kind == "message" and isinstance(record.get("content"), str):
                    self._messages.append(StoredMessage(str(record.get("role")), record["content"]))
                elif kind == "truncate":
                    del self._messages[int(record.get("keep", len(self._messages))):]
                elif kind == "drop_first":
                    del self._messages[:int(record.get("count", 0))]
                elif kind == "title":
                    self._title = str(record.get("title") or "") or None


class ChatHistory:
    """All stored chats, the most recently changed first."""

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory) if directory is not None else history_dir()
        self.directory.mkdir(parents=True, exist_ok=True)

    def new_chat(self, *, model: str = "", system_prompt: str | None = None) -> ChatLog:
        """A log whose file appears with its first message (empty chats leave nothing behind)."""
        path = self.directory / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}.jsonl"
        return ChatLog(path, model=model, system_prompt=system_prompt)

    def chats(self) -> list[ChatLog]:
        logs = [ChatLog(path) for path in sorted(self.directory.glob("*.jsonl"), reverse=True)]
        return sorted(logs, key=lambda log: log.updated, reverse=True)

    def open(self, path: str | Path) -> ChatLog:
        return ChatLog(Path(path))

    def delete(self, path: str | Path) -> None:
        """Remove a stored chat for good."""
        path = Path(path)
        if path.parent.resolve() == self.directory.resolve():
            path.unlink(missing_ok=True)
