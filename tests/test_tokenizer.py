"""Tokenizer: stories260K's verified vectors, chat templates (model, fallback, errors), eos ids, streaming detok."""

import json
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from cakep2p.engine.tokenizer import StreamDecoder, Tokenizer
from cakep2p.errors import ModelError
from cakep2p.engine.checkpoint import Checkpoint
from tests.kit import reference_greedy

# Block tags indented on their own lines: trim_blocks and lstrip_blocks must swallow that layout.
LLAMA3_LIKE_TEMPLATE = """\
{% for message in messages %}
    {% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' %}
    {% if loop.index0 == 0 %}
        {% set content = bos_token + content %}
    {% endif %}
{{ content }}{% endfor %}
{% if add_generation_prompt %}
{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}
"""

# Qwen2-style ChatML, written with whitespace-control dashes as Qwen's tokenizer_config.json does.
CHATML_TEMPLATE = """\
{%- for message in messages %}
    {%- if loop.first and messages[0]['role'] != 'system' %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

STREAM_TEXTS = [
    "Emoji test 😀🐱🚀 and more 🎉!",
    "日本語のテキスト、中文字符",
    "naïve café résumé Привет",
    "mixed: a😀b 日 c é\n  two  spaces",
]


@pytest.fixture(scope="module")
def stories_tokenizer(stories_dir) -> Tokenizer:
    return Tokenizer.from_checkpoint(Checkpoint.open(stories_dir))


def model_copy(stories_dir: Path, target: Path, tokenizer_config: dict | None = None,
               config_changes: dict | None = None, generation_config: dict | None = None) -> Path:
    """A folder with stories260K's weights (linked) and tokenizer.json, and edited json files."""
    target.mkdir()
    shutil.copy(stories_dir / "tokenizer.json", target / "tokenizer.json")
    (target / "model.safetensors").symlink_to(stories_dir / "model.safetensors")
    config = json.loads((stories_dir / "config.json").read_text())
    config.update(config_changes or {})
    (target / "config.json").write_text(json.dumps(config))
    if tokenizer_config is None:
        tokenizer_config = json.loads((stories_dir / "tokenizer_config.json").read_text())
    (target / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    if generation_config is not None:
        (target / "generation_config.json").write_text(json.dumps(generation_config))
    return target


def with_template(stories_dir: Path, tmp_path: Path, template) -> Tokenizer:
    config = json.loads((stories_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    return Tokenizer.from_checkpoint(Checkpoint.open(model_copy(stories_dir, tmp_path / "model", tokenizer_config=config)))


def stream(tokenizer: Tokenizer, ids: list[int], prefix: list[int] = ()) -> list[str]:
    decoder = tokenizer.stream_decoder(prefix)
    return [decoder.push(token_id) for token_id in ids] + [decoder.flush()]


@pytest.fixture(scope="module")
def verified_rows(stories_dir) -> list[dict]:
    """The 20 tokenizer vectors (emoji, CJK, byte fallback, spaces) checked against llama2.c and transformers."""
    return json.loads((stories_dir / "VERIFICATION.json").read_text())["tokenizer"]["rows"]


def test_encode_matches_verified_ids(stories_tokenizer, verified_rows):
    mismatches = [row["text"] for row in verified_rows if stories_tokenizer.encode(row["text"]) != row["tokenizer_json_ids"]]
    assert len(verified_rows) == 20
    assert mismatches == []


def test_decode_round_trips_verified_text(stories_tokenizer, verified_rows):
    mismatches = [row["text"] for row in verified_rows if stories_tokenizer.decode(row["tokenizer_json_ids"]) != row["text"]]
    assert mismatches == []


def test_stream_of_verified_ids_joins_to_text(stories_tokenizer, verified_rows):
    mismatches = [row["text"] for row in verified_rows
                  if "".join(stream(stories_tokenizer, row["tokenizer_json_ids"])) != row["text"]]
    assert mismatches == []


def test_stories_special_ids_and_eos_exclude_bos(stories_tokenizer):
    assert stories_tokenizer.bos_id == 1
    assert stories_tokenizer.eos_ids == frozenset({2})
    assert stories_tokenizer.adds_bos


def test_encode_without_special_tokens_has_no_bos(stories_tokenizer):
    assert stories_tokenizer.encode("Once upon a time", add_special_tokens=False) == [403, 407, 261, 378]


def test_eos_ids_merge_config_generation_config_and_tokenizer_config(stories_dir, tmp_path):
    tokenizer_config = {"eos_token": {"__type": "AddedToken", "content": "<unk>", "special": True},
                        "bos_token": {"content": "<s>"}}
    folder = model_copy(stories_dir, tmp_path / "model", tokenizer_config=tokenizer_config,
                        config_changes={"eos_token_id": [2, 5]}, generation_config={"eos_token_id": 7})
    tokenizer = Tokenizer.from_checkpoint(Checkpoint.open(folder))
    assert tokenizer.eos_ids == frozenset({0, 2, 5, 7})
    assert tokenizer.bos_id == 1


def test_add_bos_token_false_drops_bos(stories_dir, tmp_path):
    config = json.loads((stories_dir / "tokenizer_config.json").read_text())
    config["add_bos_token"] = False
    tokenizer = Tokenizer.from_checkpoint(Checkpoint.open(model_copy(stories_dir, tmp_path / "model", tokenizer_config=config)))
    assert tokenizer.encode("Once upon a time") == [403, 407, 261, 378]


def test_llama3_like_template_renders_like_transformers(stories_dir, tmp_path):
    tokenizer = with_template(stories_dir, tmp_path, LLAMA3_LIKE_TEMPLATE)
    messages = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "Hi!"}]
    assert tokenizer.apply_chat_template(messages) == (
        "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_chatml_template_adds_default_system_and_generation_prompt(stories_dir, tmp_path):
    tokenizer = with_template(stories_dir, tmp_path, CHATML_TEMPLATE)
    messages = [{"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(messages) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=False).endswith("Hi<|im_end|>\n")


@pytest.mark.parametrize("template", [LLAMA3_LIKE_TEMPLATE, CHATML_TEMPLATE], ids=["llama3", "chatml"])
def test_template_rendering_equals_transformers(stories_dir, tmp_path, template):
    transformers = pytest.importorskip("transformers")
    config = json.loads((stories_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    folder = model_copy(stories_dir, tmp_path / "model", tokenizer_config=config)
    reference = transformers.AutoTokenizer.from_pretrained(str(folder))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Again"}]
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert Tokenizer.from_checkpoint(Checkpoint.open(folder)).apply_chat_template(messages) == expected


def test_named_template_list_uses_default(stories_dir, tmp_path):
    templates = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "{{ messages[0]['content'] }}"}]
    tokenizer = with_template(stories_dir, tmp_path, templates)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hello"}]) == "hello"


def test_template_tojson_keeps_unicode_and_extra_variables(stories_dir, tmp_path):
    tokenizer = with_template(stories_dir, tmp_path, "{{ tools | tojson }}|{{ messages[0] | tojson }}")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "café"}], tools=[{"name": "f"}])
    assert text == '[{"name": "f"}]|{"role": "user", "content": "café"}'


def test_template_raise_exception_becomes_model_error(stories_dir, tmp_path):
    template = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system message must come first') }}{% endif %}"
    tokenizer = with_template(stories_dir, tmp_path, template)
    with pytest.raises(ModelError, match="a system message must come first"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_syntax_error_becomes_one_line_model_error(stories_dir, tmp_path):
    tokenizer = with_template(stories_dir, tmp_path, "{% for message in messages %}{{ message }")
    with pytest.raises(ModelError, match="chat template") as raised:
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert "\n" not in str(raised.value)


def test_template_sandbox_blocks_attribute_escape(stories_dir, tmp_path):
    tokenizer = with_template(stories_dir, tmp_path, "{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ModelError):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_fallback_template_for_base_model(stories_tokenizer):
    assert not stories_tokenizer.has_chat_template
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Tell a story."}]
    text = stories_tokenizer.apply_chat_template(messages)
    assert text == "<s>System: Be kind.\nUser: Tell a story.\nAssistant:"
    assert stories_tokenizer.encode(text, add_special_tokens=False)[0] == stories_tokenizer.bos_id


def test_missing_tokenizer_json_is_model_error(stories_dir, tmp_path):
    folder = model_copy(stories_dir, tmp_path / "model")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match="has no tokenizer.json"):
        Tokenizer.from_checkpoint(Checkpoint.open(folder))


def test_corrupt_tokenizer_json_is_one_line_model_error(stories_dir, tmp_path):
    folder = model_copy(stories_dir, tmp_path / "model")
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ')
    with pytest.raises(ModelError, match="tokenizer.json is corrupt") as raised:
        Tokenizer.from_checkpoint(Checkpoint.open(folder))
    assert "\n" not in str(raised.value)


def test_corrupt_tokenizer_config_is_model_error(stories_dir, tmp_path):
    folder = model_copy(stories_dir, tmp_path / "model")
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ModelError, match="tokenizer_config.json is not valid JSON"):
        Tokenizer.from_checkpoint(Checkpoint.open(folder))


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_chunks_are_whole_characters_and_join_to_decode(stories_tokenizer, text):
    ids = stories_tokenizer.encode(text)
    chunks = stream(stories_tokenizer, ids)
    for chunk in chunks:
        chunk.encode("utf-8")  # no lone surrogates
        assert "\ufffd" not in chunk
    assert "".join(chunks) == stories_tokenizer.decode(ids) == text


def byte_level_tokenizer() -> Tokenizer:
    """GPT-2 / Llama-3 / Qwen style: byte-level BPE, where one token may hold part of a character's bytes."""
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    raw.train_from_iterator(["the cat sat on the mat", "日本語 café 😀😀 the end"] * 20, trainer)
    return Tokenizer(raw, name="byte-level")


def metaspace_tokenizer() -> Tokenizer:
    """Mistral style: Metaspace pre-tokenizer, byte fallback, and a decoder that strips the first space per text."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{byte:02X}>": 3 + byte for byte in range(256)}}
    for piece in "▁abcdefghijklmnopqrstuvwxyzé日":
        vocab[piece] = len(vocab)
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    raw = RawTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    raw.add_special_tokens(["<unk>", "<s>", "</s>"])
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    raw.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="first")])
    return Tokenizer(raw, name="metaspace")


@pytest.mark.parametrize("make_tokenizer", [byte_level_tokenizer, metaspace_tokenizer])
@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_other_tokenizer_styles_join_to_decode(make_tokenizer, text):
    tokenizer = make_tokenizer()
    ids = tokenizer.encode(text)
    chunks = stream(tokenizer, ids)
    assert all("\ufffd" not in chunk for chunk in chunks)
    assert "".join(chunks) == tokenizer.decode(ids)


def test_stream_emoji_really_uses_byte_fallback_tokens(stories_tokenizer):
    ids = stories_tokenizer.encode("😀", add_special_tokens=False)
    assert [stories_tokenizer.id_to_token(i) for i in ids][-4:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    chunks = stream(stories_tokenizer, ids)
    assert [chunk for chunk in chunks if chunk][-1].endswith("😀")
    assert "".join(chunks).strip() == "😀"


def test_stream_holds_split_character_until_complete(stories_tokenizer):
    decoder = stories_tokenizer.stream_decoder()
    emoji_bytes = [stories_tokenizer.token_to_id(f"<0x{byte:02X}>") for byte in "😀".encode()]
    assert [decoder.push(token_id) for token_id in emoji_bytes] == ["", "", "", "😀"]


def test_stream_flush_emits_cut_off_bytes_like_decode(stories_tokenizer):
    ids = stories_tokenizer.encode("a😀", add_special_tokens=False)[:-2]
    chunks = stream(stories_tokenizer, ids)
    assert "".join(chunks) == stories_tokenizer.decode(ids)
    assert chunks[-1].endswith("\ufffd")


def test_stream_after_prompt_keeps_leading_space(stories_tokenizer, stories_dir):
    reference = reference_greedy(stories_dir, "Lily and Ben")
    chunks = stream(stories_tokenizer, reference["new_token_ids"], prefix=reference["prompt_token_ids"])
    assert "".join(chunks) == reference["text"]
    assert chunks[0].startswith(" we")


def test_stream_skips_special_tokens_like_decode(stories_tokenizer):
    ids = stories_tokenizer.encode("The cat.") + [1] + stories_tokenizer.encode("The dog.", add_special_tokens=False)
    assert "".join(stream(stories_tokenizer, ids)) == stories_tokenizer.decode(ids) == "The cat. The dog."


def test_stream_decodes_a_small_window_per_token(stories_tokenizer):
    decoded_lengths = []

    def counting_decode(ids):
        decoded_lengths.append(len(ids))
        return stories_tokenizer.decode(ids)

    ids = stories_tokenizer.encode("Once upon a time there was a cat 😀 日本 " * 40, add_special_tokens=False)
    decoder = StreamDecoder(counting_decode)
    text = "".join(decoder.push(token_id) for token_id in ids) + decoder.flush()
    assert text == stories_tokenizer.decode(ids)
    assert max(decoded_lengths) <= 8
