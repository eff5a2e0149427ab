"""Text <-> token ids for a checkpoint: `tokenizers` for the vocabulary, a jinja2 sandbox for the chat
template, and a streaming decoder that never emits half a character."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as RawTokenizer

from cakep2p.engine.checkpoint import Checkpoint
from cakep2p.engine.generation_config import read_json_object
from cakep2p.engine.gguf_tokenizer import build_tokenizer
from cakep2p.errors import ModelError

# Used when a model ships no chat template (base models). Renders, for a system and a user message:
#     System: You are terse.\nUser: Hello\nAssistant:
# Each message is "<Role>: <content>" on its own line; the generation prompt is "Assistant:".
# When the tokenizer puts a bos token before plain text, the rendered prompt starts with it too, so
# `encode(apply_chat_template(...), add_special_tokens=False)` is right for every model.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

REPLACEMENT_CHARACTER = "\ufffd"
STREAM_PREFIX_TOKENS = 8  # prompt tokens a StreamDecoder keeps so the first new token's spacing is right


class _ChatTemplateError(Exception):
    """Raised by a template's `raise_exception(...)`; becomes a ModelError naming the model."""


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise _ChatTemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format_string: str) -> str:
    return datetime.now().strftime(format_string)


def compile_chat_template(source: str) -> jinja2.Template:
    """A sandboxed template configured as transformers configures it (trim_blocks, lstrip_blocks, tojson...)."""
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment.from_string(source)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string, or an AddedToken dict with `content`."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _pick_chat_template(value: Any, source: Path) -> str | None:
    """`chat_template` is a string or a list of {"name", "template"}; the one named "default" wins."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {item.get("name"): item.get("template") for item in value if isinstance(item, dict)}
        chosen = named.get("default") or next((t for t in named.values() if isinstance(t, str)), None)
        if isinstance(chosen, str):
            return chosen
    raise ModelError(f"{source} has a chat_template that is neither a string nor a list of named templates")


def _read_chat_template(model_dir: Path, tokenizer_config: dict[str, Any]) -> str | None:
    config_path = model_dir / "tokenizer_config.json"
    if "chat_template" in tokenizer_config:
        return _pick_chat_template(tokenizer_config["chat_template"], config_path)
    jinja_path = model_dir / "chat_template.jinja"  # where newer transformers versions save it
    if jinja_path.is_file():
        try:
            return jinja_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ModelError(f"cannot read {jinja_path} ({_first_line(error)}); restore the file") from None
    json_path = model_dir / "chat_template.json"
    if json_path.is_file():
        return _pick_chat_template(read_json_object(json_path).get("chat_template"), json_path)
    return None


class Tokenizer:
    """A model's tokenizer: encode, decode, chat template, stop ids and streaming decode."""

    def __init__(self, raw: RawTokenizer, *, name: str = "model", tokenizer_config: dict[str, Any] | None = None,
                 chat_template: str | None = None, eos_ids: frozenset[int] = frozenset(),
                 bos_id: int | None = None):
        config = tokenizer_config or {}
        self._raw = raw
        self.name = name
        self.special_tokens: dict[str, str] = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            content = _token_content(config.get(key))
            if content is not None:
                self.special_tokens[key] = content
        bos_content = self.special_tokens.get("bos_token")
        configured_bos = raw.token_to_id(bos_content) if bos_content is not None else None
        self.bos_id: int | None = configured_bos if configured_bos is not None else bos_id
        if "bos_token" not in self.special_tokens and self.bos_id is not None:
            bos_text = raw.id_to_token(self.bos_id)
            if bos_text is not None:
                self.special_tokens["bos_token"] = bos_text
        eos_content = self.special_tokens.get("eos_token")
        eos_from_config = raw.token_to_id(eos_content) if eos_content is not None else None
        self.eos_ids: frozenset[int] = frozenset(eos_ids) | (
            frozenset({eos_from_config}) if eos_from_config is not None else frozenset())
        self.chat_template_source: str | None = chat_template
        self._compiled_template: jinja2.Template | None = None
        self._bos_policy = config.get("add_bos_token") if isinstance(config.get("add_bos_token"), bool) else None
        self._post_processor_adds_bos = self._probe_post_processor_bos()
        self._longest_piece_bytes: int | None = None

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint) -> "Tokenizer":
        """Read the checkpoint folder's tokenizer.json, tokenizer_config.json and chat template (bos and eos come from
        the checkpoint's generation defaults), or rebuild a GGUF's from its metadata. ModelError when unusable."""
        if checkpoint.gguf is not None:
            raw, config, eos_ids, bos_id = build_tokenizer(checkpoint.gguf)
            return cls(raw, name=checkpoint.name, tokenizer_config=config, chat_template=config["chat_template"],
                       eos_ids=eos_ids, bos_id=bos_id)
        model_dir = checkpoint.path
        tokenizer_path = model_dir / "tokenizer.json"
        if not tokenizer_path.is_file():
            raise ModelError(f"model folder {model_dir} has no tokenizer.json; copy it from the model's repository")
        try:
            raw = RawTokenizer.from_file(str(tokenizer_path))
        except Exception as error:  # the Rust library raises plain Exception for every parse failure
            raise ModelError(f"{tokenizer_path} is corrupt ({_first_line(error)}); restore the file") from None
        tokenizer_config = read_json_object(model_dir / "tokenizer_config.json")
        defaults = checkpoint.generation
        return cls(raw, name=checkpoint.name, tokenizer_config=tokenizer_config,
                   chat_template=_read_chat_template(model_dir, tokenizer_config),
                   eos_ids=defaults.eos_ids, bos_id=defaults.bos_id)

    def _probe_post_processor_bos(self) -> bool:
        if self.bos_id is None:
            return False
        with_special = self._raw.encode("a", add_special_tokens=True).ids
        without = self._raw.encode("a", add_special_tokens=False).ids
        return with_special[:1] == [self.bos_id] and without[:1] != [self.bos_id]

    @property
    def adds_bos(self) -> bool:
        """Whether `encode(text)` puts the bos token first (tokenizer_config's add_bos_token wins)."""
        if self._bos_policy is None or self.bos_id is None:
            return self._post_processor_adds_bos
        return self._bos_policy

    @property
    def vocab_size(self) -> int:
        return self._raw.get_vocab_size(with_added_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template_source is not None

    def fewest_tokens(self, text: str) -> int:
        """A lower bound on len(encode(text)), without encoding: no token covers more UTF-8 bytes than the longest
        piece of the vocabulary (a byte-level or sentencepiece piece's characters stand for at most 4 bytes each)."""
        if self._longest_piece_bytes is None:
            self._longest_piece_bytes = 4 * max((len(piece) for piece in self._raw.get_vocab(True)), default=1)
        return len(text.encode("utf-8", "surrogatepass")) // self._longest_piece_bytes

    def token_to_id(self, token: str) -> int | None:
        return self._raw.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._raw.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with special tokens, bos first when the model wants it."""
        # encode_batch lets other threads run (encode holds the GIL: a 5 MB prompt froze an API's event loop 3 s)
        ids = self._raw.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        if add_special_tokens and self.bos_id is not None:
            if self.adds_bos and not self._post_processor_adds_bos:
                ids = [self.bos_id, *ids]
            elif not self.adds_bos and self._post_processor_adds_bos:
                ids = ids[1:]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens (bos, eos, chat markers) are left out unless asked for."""
        return self._raw.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def _template(self) -> jinja2.Template:
        if self._compiled_template is None:
            source = self.chat_template_source or FALLBACK_CHAT_TEMPLATE
            try:
                self._compiled_template = compile_chat_template(source)
            except jinja2.TemplateError as error:
                raise ModelError(
                    f"the chat template of {self.name} is invalid ({_first_line(error)}); fix tokenizer_config.json"
                ) from None
        return self._compiled_template

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **template_variables: Any) -> str:
        """The prompt text for `messages` ({"role", "content"} dicts), as the model's template renders it.

        Encode the result with `add_special_tokens=False`: the text already holds any bos token.
        Extra keyword arguments (tools, documents, enable_thinking...) are passed to the template.
        """
        variables = {**self.special_tokens, **template_variables}
        try:
            text = self._template().render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        except _ChatTemplateError as error:
            raise ModelError(f"the chat template of {self.name} rejected the conversation: {_first_line(error)}") from None
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError) as error:
            raise ModelError(
                f"the chat template of {self.name} failed ({type(error).__name__}: {_first_line(error)}); "
                "check the messages or fix the template"
            ) from None
        if self.chat_template_source is None and self.adds_bos:
            text = self.special_tokens["bos_token"] + text
        return text

    def stream_decoder(self, prefix_ids: Sequence[int] = (), skip_special_tokens: bool = True) -> "StreamDecoder":
        """A decoder for ids generated after `prefix_ids` (the prompt); see StreamDecoder."""
        return StreamDecoder(lambda ids: self.decode(ids, skip_special_tokens), prefix_ids)


class StreamDecoder:
    """Incremental detokenization: `push` returns the text a new id completes, "" while a character is split.

    Only a small window of ids is decoded per push: the ids since the previous emission's start.
    Text is emitted only when the window's text has grown and does not end in U+FFFD (an incomplete
    UTF-8 sequence), so every chunk is whole characters; `flush` emits what is left. The chunks of
    all pushes plus flush concatenate to `decode(prefix + ids)` minus `decode(prefix)`, which is
    `decode(ids)` when there is no prefix. With the prompt as prefix, the first word keeps its
    leading space, which sentencepiece decoders strip at the start of a text.
    """

    def __init__(self, decode: Callable[[list[int]], str], prefix_ids: Sequence[int] = ()):
        self._decode = decode
        self._window: list[int] = self._clean_start(list(prefix_ids)[-STREAM_PREFIX_TOKENS:])
        self._window_text = decode(self._window)  # text of the ids already emitted (or given as prefix)
        self._emitted_count = len(self._window)

    def _clean_start(self, ids: list[int]) -> list[int]:
        """Drop leading ids that are the middle of a character, so the window starts on a boundary."""
        while ids and self._decode(ids).startswith(REPLACEMENT_CHARACTER):
            ids = ids[1:]
        return ids

    def push(self, token_id: int) -> str:
        self._window.append(token_id)
        text = self._decode(self._window)
        if len(text) <= len(self._window_text) or text.endswith(REPLACEMENT_CHARACTER):
            return ""
        return self._emit(text)

    def flush(self) -> str:
        """Whatever the pushed ids hold that was not emitted yet (possibly U+FFFD for cut-off bytes)."""
        text = self._decode(self._window)
        if len(text) <= len(self._window_text):
            return ""
        return self._emit(text)

    def _emit(self, text: str) -> str:
        new_text = text[len(self._window_text):]
        # The next window starts at the ids that produced this chunk: decoding them again gives the same
        # text, including any leading space a decoder would strip from a text's first token.
        self._window = self._window[self._emitted_count:]
        self._emitted_count = len(self._window)
        self._window_text = self._decode(self._window)
        return new_text
