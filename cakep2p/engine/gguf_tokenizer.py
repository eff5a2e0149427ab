"""A `tokenizers.Tokenizer` rebuilt from a GGUF's tokenizer metadata (byte-level BPE or SentencePiece-style BPE)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from cakep2p.engine.gguf_file import GGUFFile
from cakep2p.errors import ModelError

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # SentencePiece's visible space

# The splits llama.cpp applies before byte-level BPE (llama-vocab.cpp), as tokenizers regexes.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class PreTokenizer:
    """How one `tokenizer.ggml.pre` value splits text before BPE."""

    splits: tuple[str, ...]       # regexes applied in turn, each match isolated (llama.cpp's regex_exprs)
    ignore_merges: bool = False   # a word that is itself a token is not merged (llama3, tekken)
    add_bos: bool = False         # llama.cpp's default when the file has no add_bos_token flag
    nfc: bool = False             # the model's own tokenizer.json normalizes to NFC (Qwen2)


_GPT2_STYLE = PreTokenizer((_GPT2,))
_DIGITS_THEN_GPT2 = PreTokenizer((r"\p{N}", _GPT2))
_LLAMA3_STYLE = PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True)
_QWEN2_STYLE = PreTokenizer((_QWEN2,), nfc=True)
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "default": _GPT2_STYLE, "gpt2": _GPT2_STYLE, "gpt-2": _GPT2_STYLE, "mpt": _GPT2_STYLE, "olmo": _GPT2_STYLE,
    "smollm": _DIGITS_THEN_GPT2, "starcoder": _DIGITS_THEN_GPT2, "refact": _DIGITS_THEN_GPT2,
    "command-r": _DIGITS_THEN_GPT2, "codeshell": _DIGITS_THEN_GPT2, "exaone": _DIGITS_THEN_GPT2,
    "llama3": _LLAMA3_STYLE, "llama-v3": _LLAMA3_STYLE, "llama-bpe": _LLAMA3_STYLE, "falcon3": _LLAMA3_STYLE,
    "dbrx": PreTokenizer((_LLAMA3,)), "smaug-bpe": PreTokenizer((_LLAMA3,)),
    "qwen2": _QWEN2_STYLE, "deepseek-r1-qwen": _QWEN2_STYLE, "megrez": _QWEN2_STYLE,
    "tekken": PreTokenizer((_TEKKEN,), ignore_merges=True, add_bos=True),
}


def spm_merges(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a normal piece into two normal pieces,
    best merged-piece score first (ties: lower merged id, then lower left and right ids)."""
    ids = {token: index for index, token in enumerate(tokens) if types[index] == NORMAL}
    ranked = []
    for piece, index in ids.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-scores[index], index, ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _token_id(gguf: GGUFFile, key: str, count: int) -> int | None:
    """A special token id; absent, or out of range (llama.cpp writes -1 as 4294967295), is None."""
    value = gguf.metadata.get(f"tokenizer.ggml.{key}")
    return value if isinstance(value, int) and 0 <= value < count else None


def _required_array(gguf: GGUFFile, key: str, count: int) -> list:
    values = gguf.array(key)
    if values is None:
        raise ModelError(f"{gguf.path.name} lacks {key}, which its tokenizer needs; convert the model again")
    if len(values) != count:
        raise ModelError(f"{gguf.path.name}: {key} has {len(values)} entries for {count} tokens; the file is corrupt")
    return values


def _vocab(tokens: Sequence[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)  # a duplicated string keeps its first id, as llama.cpp's text_to_token does
    return vocab


def _byte_level(gguf: GGUFFile, tokens: list[str]) -> tuple[Tokenizer, PreTokenizer]:
    pre_name = gguf.metadata.get("tokenizer.ggml.pre", "default")
    if pre_name not in PRE_TOKENIZERS:
        raise ModelError(f"{gguf.path.name}: pre-tokenizer {pre_name!r} is not supported; "
                         f"supported: {', '.join(sorted(PRE_TOKENIZERS))}")
    pre = PRE_TOKENIZERS[pre_name]
    merges = gguf.array("tokenizer.ggml.merges")
    if merges is None:
        raise ModelError(f"{gguf.path.name} lacks tokenizer.ggml.merges, which a gpt2 tokenizer needs")
    pairs = [tuple(merge.split(" ")) for merge in merges]
    if any(len(pair) != 2 for pair in pairs):
        raise ModelError(f"{gguf.path.name}: tokenizer.ggml.merges holds an entry that is not two tokens")
    tokenizer = Tokenizer(models.BPE(vocab=_vocab(tokens), merges=pairs, ignore_merges=pre.ignore_merges))
    if pre.nfc:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in pre.splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer, pre


def _sentencepiece(gguf: GGUFFile, tokens: list[str], types: list[int], unk: int | None) -> Tokenizer:
    scores = _required_array(gguf, "tokenizer.ggml.scores", len(tokens))
    prefix = gguf.metadata.get("tokenizer.ggml.add_space_prefix", True)
    model = models.BPE(vocab=_vocab(tokens), merges=spm_merges(tokens, scores, types),
                       unk_token=tokens[unk] if unk is not None else None, fuse_unk=True, byte_fallback=True)
    tokenizer = Tokenizer(model)
    spaces = [normalizers.Replace(" ", SPACE)]
    tokenizer.normalizer = normalizers.Sequence(([normalizers.Prepend(SPACE)] if prefix else []) + spaces)
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
                                          + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tokenizer


def _post_processor(tokens: list[str], bos: int | None, eos: int | None, add_bos: bool,
                    add_eos: bool) -> processors.TemplateProcessing | None:
    before = [tokens[bos]] if add_bos and bos is not None else []
    after = [tokens[eos]] if add_eos and eos is not None else []
    if not before and not after:
        return None
    specials = {tokens[i]: i for i in (bos if before else None, eos if after else None) if i is not None}
    single = " ".join(before + ["$A"] + after)
    pair = " ".join(before + ["$A"] + after + before + ["$B:1"] + after)
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(specials.items()))


def special_token_ids(gguf: GGUFFile) -> tuple[frozenset[int], int | None]:
    """(the ids that end a turn: eos, eot, eom; the bos id) from the metadata, without building the tokenizer."""
    count = gguf.array_length("tokenizer.ggml.tokens")
    stops = (_token_id(gguf, key, count) for key in ("eos_token_id", "eot_token_id", "eom_token_id"))
    return frozenset(i for i in stops if i is not None), _token_id(gguf, "bos_token_id", count)


def build_tokenizer(gguf: GGUFFile) -> tuple[Tokenizer, dict[str, Any], frozenset[int], int | None]:
    """(raw tokenizer, tokenizer_config-like dict, eos ids, bos id) from the file's tokenizer.* metadata."""
    kind = gguf.metadata.get("tokenizer.ggml.model")
    tokens = gguf.array("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelError(f"{gguf.path.name} has no tokenizer.ggml.tokens; convert the model again")
    count = len(tokens)
    types = gguf.array("tokenizer.ggml.token_type") or [NORMAL] * count
    if len(types) != count:
        raise ModelError(f"{gguf.path.name}: tokenizer.ggml.token_type has {len(types)} entries for {count} tokens")
    bos, eos = _token_id(gguf, "bos_token_id", count), _token_id(gguf, "eos_token_id", count)
    unk, pad = _token_id(gguf, "unknown_token_id", count), _token_id(gguf, "padding_token_id", count)
    try:
        if kind == "gpt2":
            tokenizer, pre = _byte_level(gguf, tokens)
            default_bos = pre.add_bos
        elif kind == "llama":
            tokenizer, default_bos = _sentencepiece(gguf, tokens, types, unk), True
        else:
            raise ModelError(f"{gguf.path.name}: tokenizer model {kind!r} is not supported; supported: gpt2, llama")
    except ModelError:
        raise
    except Exception as error:  # the Rust library raises plain Exception for malformed vocabularies
        raise ModelError(f"{gguf.path.name}: its tokenizer cannot be built ({error}); the file is corrupt") from None
    # Control tokens (<|im_start|>, <s>) stay whole and are special; user-defined ones stay whole, not special.
    tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                  for i, kind_ in enumerate(types) if kind_ in (CONTROL, UNKNOWN)])
    tokenizer.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                          for i, kind_ in enumerate(types) if kind_ == USER_DEFINED])
    add_bos = bool(gguf.metadata.get("tokenizer.ggml.add_bos_token", default_bos))
    add_eos = bool(gguf.metadata.get("tokenizer.ggml.add_eos_token", False))
    processor = _post_processor(tokens, bos, eos, add_bos, add_eos)
    if processor is not None:
        tokenizer.post_processor = processor
    config = {
        "bos_token": tokens[bos] if bos is not None else None,
        "eos_token": tokens[eos] if eos is not None else None,
        "unk_token": tokens[unk] if unk is not None else None,
        "pad_token": tokens[pad] if pad is not None else None,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "chat_template": gguf.metadata.get("tokenizer.chat_template"),
    }
    eos_ids, _ = special_token_ids(gguf)
    return tokenizer, config, eos_ids, bos
