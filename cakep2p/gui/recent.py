"""Recently opened model folders, newest first, kept as JSON in the data dir."""

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
        """The stored folders that still exist (a damaged file reads as empty)."""
        try:
            items = json.loads(self.file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []
        if not isinstance(items, list):
            return []
        return [item for item in items if isinstance(item, str) and Path(item).is_dir()][:MAX_RECENT]

    def remember(self, folder: str | Path) -> list[str]:
        folder = str(Path(folder).expanduser().resolve())
        items = [folder] + [item for item in self.load() if item != folder]
        items = items[:MAX_RECENT]
        temporary = self.file.with_suffix(".tmp")
        temporary.write_text(json.dumps(items, indent=1), encoding="utf-8")
        temporary.replace(self.file)
        return items
