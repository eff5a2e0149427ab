"""A model folder's generation settings: eos ids from config.json and generation_config.json, and sampling defaults."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cakep2p.errors import ModelError


@dataclass(frozen=True)
class GenerationDefaults:
    """What the model's authors recommend; greedy (temperature 0) unless generation_config.json sets do_sample."""

    eos_ids: frozenset[int] = frozenset()
    bos_id: int | None = None
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, {} when the file is absent; ModelError when it is not a JSON object."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelError(f"{path} is not valid JSON ({reason}); restore the file") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} does not hold a JSON object; restore the file")
    return data


def token_ids(value: Any) -> frozenset[int]:
    """An `eos_token_id` value as a set: it may be an int, a list of ints, or null."""
    if isinstance(value, bool):
        return frozenset()
    if isinstance(value, int):
        return frozenset({value})
    if isinstance(value, (list, tuple)):
        return frozenset(item for item in value if isinstance(item, int) and not isinstance(item, bool))
    return frozenset()


def _number(config: dict[str, Any], key: str, default: float) -> float:
    value = config.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return default


def read_generation_defaults(model_dir: Path, config: dict[str, Any]) -> GenerationDefaults:
    """Merge the parsed config.json and model_dir's generation_config.json (the latter wins for sampling values)."""
    generation = read_json_object(model_dir / "generation_config.json")
    eos_ids = token_ids(config.get("eos_token_id")) | token_ids(generation.get("eos_token_id"))
    bos_candidates = token_ids(generation.get("bos_token_id")) or token_ids(config.get("bos_token_id"))
    bos_id = min(bos_candidates) if bos_candidates else None
    if not generation.get("do_sample", False):
        return GenerationDefaults(eos_ids=eos_ids, bos_id=bos_id,
                                  repetition_penalty=_number(generation, "repetition_penalty", 1.0))
    return GenerationDefaults(
        eos_ids=eos_ids,
        bos_id=bos_id,
        temperature=_number(generation, "temperature", 1.0),
        top_k=int(_number(generation, "top_k", 50)),  # transformers' default when sampling
        top_p=_number(generation, "top_p", 1.0),
        repetition_penalty=_number(generation, "repetition_penalty", 1.0),
    )
