"""The reference tokens of the trained stories260K model: REFERENCE.json beside its weights."""

from __future__ import annotations

import json
from pathlib import Path


def reference_rows(model_dir: Path) -> list[dict]:
    """Every greedy row: prompt, prompt_token_ids, new_token_ids (64 at temperature 0), text, full_text."""
    return json.loads((Path(model_dir) / "REFERENCE.json").read_text())["greedy"]


def reference_greedy(model_dir: Path, which: int | str = 0) -> dict:
    """One greedy row, by its index or its prompt ("Once upon a time", "Lily and Ben", ...)."""
    rows = reference_rows(model_dir)
    if isinstance(which, int):
        return rows[which]
    return next(row for row in rows if row["prompt"] == which)
