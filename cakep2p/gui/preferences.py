"""What the window remembers on this machine: its node's settings (name, interface, port, offered memory) and how the
peers table shows other clusters. One JSON file in the config dir, written atomically; a damaged file reads as the
defaults."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cakep2p import paths

PREFERENCES_FILE_NAME = "window.json"


@dataclass(frozen=True)
class Preferences:
    show_other_clusters: bool = False
    node_name: str | None = None        # None: the machine's own name
    interface: str | None = None        # an IPv4 address of this machine; None: every interface
    port: int | None = None             # None: the default port, or a free one
    max_memory: int | None = None       # bytes offered to model parts; None: all this machine can spare

    def node_options(self) -> dict[str, Any]:
        """The Node(...) keyword arguments these preferences set (the ones left at their default are absent)."""
        options: dict[str, Any] = {}
        if self.node_name:
            options["name"] = self.node_name
        if self.interface:
            options["interfaces"] = [self.interface]
        if self.port:
            options["port"] = self.port
        if self.max_memory is not None:
            options["max_memory"] = self.max_memory
        return options


class PreferencesStore:
    def __init__(self, file: str | Path | None = None):
        self.file = Path(file) if file is not None else paths.config_dir() / PREFERENCES_FILE_NAME

    def load(self) -> Preferences:
        try:
            stored = json.loads(self.file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return Preferences()
        if not isinstance(stored, dict):
            return Preferences()
        known = {field.name: field for field in dataclasses.fields(Preferences)}
        values = {name: value for name, value in stored.items() if name in known and _valid(name, value)}
        return Preferences(**values)

    def save(self, preferences: Preferences) -> Preferences:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        paths.write_atomically(self.file, json.dumps(dataclasses.asdict(preferences), indent=1).encode("utf-8"))
        return preferences

    def update(self, **changes: Any) -> Preferences:
        return self.save(dataclasses.replace(self.load(), **changes))


def _valid(name: str, value: Any) -> bool:
    if value is None:
        return name != "show_other_clusters"
    if name == "show_other_clusters":
        return isinstance(value, bool)
    if name in ("port", "max_memory"):
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return isinstance(value, str)
