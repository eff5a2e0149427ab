"""Recently opened models (folders and .gguf files), newest first, kept as JSON in the data dir."""

from __future__ import annotations

import json
from pathlib import Path

from cakep2p import paths

RECENT_FILE_NAME = "recent-models.json"
MAX_RECENT = 10


class RecentModels:
    def __init__(self, file: str | Path | None = None):
        self.file = Path(file) if file is not None else paths.data_dir() / RECENT_FILE_NAME

    def load(self) -> list[str]:
        """The stored models that still exist (a damaged file reads as empty)."""
        try:
            items = json.loads(self.file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []
        if not isinstance(items, list):
            return []
        return [item for item in items if isinstance(item, str) and Path(item).exists()][:MAX_RECENT]

    def remember(self, model: str | Path) -> list[str]:
        model = str(Path(model).expanduser().resolve())
        items = [model] + [item for item in self.load() if item != model]
        items = items[:MAX_RECENT]
        paths.write_atomically(self.file, json.dumps(items, indent=1).encode("utf-8"))
        return items
