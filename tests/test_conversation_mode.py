"""One chat behaviour for the window and `cakep2p chat`: the model's template, else the same fallback, every turn
kept; raw completion only when asked for, and then one running text; answers default to a quarter of the context."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from cakep2p.engine.conversation import (Conversation, ConversationMode, Reply, conversation_mode,
                                         default_max_new_tokens, raw_text)
from cakep2p.engine.sampling import SamplingParams
from tests.kit import child_env, reference_greedy, run_cakep2p
from tests.kit.api import serve

GREEDY_12 = SamplingParams(max_new_tokens=12, temperature=0.0)
PROMPT = "Once upon a time"


@pytest.fixture
def conversation(stories_model):
    pipeline = stories_model.new_pipeline()
    yield Conversation(pipeline, stories_model.tokenizer)
    pipeline.close()


def ask(conversation: Conversation, text: str, params: SamplingParams = GREEDY_12) -> Reply:
    reply = Reply()
    for _ in conversation.ask(text, params, reply):
        pass
    return reply


# -- the decision ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("has_template, raw, expected", [
    (True, False, ConversationMode(False, "model")),
    (False, False, ConversationMode(False, "fallback")),   # no template: still a chat, never raw by default
    (True, True, ConversationMode(True, "none")),
    (False, True, ConversationMode(True, "none")),
])
def test_the_mode_is_the_template_else_the_fallback_and_raw_only_when_asked(has_template, raw, expected):
    assert conversation_mode(SimpleNamespace(has_chat_template=has_template), raw) == expected


def test_each_mode_describes_itself_in_one_line():
    texts = {ConversationMode(False, "model").describe(), ConversationMode(False, "fallback").describe(),
             ConversationMode(True, "none").describe()}
    assert len(texts) == 3 and all("\n" not in text for text in texts)


@pytest.mark.parametrize("context, answer", [(512, 128), (4096, 1024), (3, 1), (1, 1)])
def test_an_answer_defaults_to_a_quarter_of_the_context(context, answer):
    assert default_max_new_tokens(context) == answer


def test_a_model_without_a_template_chats_in_the_fallback_and_keeps_every_turn(conversation, stories_model):
    assert conversation.mode == ConversationMode(False, "fallback")
    first = ask(conversation, PROMPT)
    ask(conversation, "The dog")
    rendered = stories_model.tokenizer.decode(conversation.prompt_ids(), skip_special_tokens=False)
    assert f"User: {PROMPT}\nAssistant: {first.text}" in rendered and "User: The dog" in rendered


def test_raw_completion_is_one_running_text_that_keeps_every_turn(conversation, stories_model, stories_dir):
    conversation.set_raw(True)
    first = ask(conversation, PROMPT)
    assert reference_greedy(stories_dir, PROMPT)["text"].startswith(first.text)   # it continues the text exactly
    ask(conversation, "The dog")
    assert raw_text(conversation.messages) == f"{PROMPT}{first.text}\nThe dog{conversation.messages[-1]['content']}"
    assert conversation.prompt_ids() == stories_model.tokenizer.encode(raw_text(conversation.messages))


def test_switching_raw_completion_starts_a_new_chat(conversation):
    ask(conversation, PROMPT)
    conversation.set_raw(True)
    assert conversation.raw and conversation.messages == [] and conversation.context_used() == 0
    conversation.set_raw(False)
    assert conversation.mode.template == "fallback"


def test_raw_text_puts_a_new_message_on_a_new_line_once():
    assert raw_text([{"role": "user", "content": "a"}, {"role": "assistant", "content": " b\n"},
                     {"role": "user", "content": "c"}]) == "a b\nc"


# -- the terminal chat -----------------------------------------------------------------------------------------

def run_chat(stories_dir, home, typed: str, *extra: str):
    return run_cakep2p("chat", "--model", str(stories_dir), "--local", "--temperature", "0", "--max-new-tokens", "12",
                       *extra, env=child_env(home), input=typed)


@pytest.mark.slow
def test_chat_raw_flag_and_raw_command_give_the_same_continuation(stories_dir, tmp_path):
    continuation = reference_greedy(stories_dir, PROMPT)["text"]
    by_flag = run_chat(stories_dir, tmp_path / "a", f"{PROMPT}\n", "--raw")
    by_command = run_chat(stories_dir, tmp_path / "b", f"/raw\n{PROMPT}\n")
    assert by_flag.returncode == 0 and by_command.returncode == 0, by_flag.stderr + by_command.stderr
    answer = by_flag.stdout.removeprefix("> ").split("\n> ")[0]
    assert answer and continuation.startswith(answer)
    assert by_command.stdout.removeprefix("> > ").split("\n> ")[0] == answer
    assert "raw completion" in by_flag.stderr and "(new chat, raw completion" in by_command.stderr


@pytest.mark.slow
def test_chat_says_its_mode_and_answer_length_and_ends_each_answer_with_a_summary(stories_dir, tmp_path):
    result = run_cakep2p("chat", "--model", str(stories_dir), "--local", "--context", "64", "--temperature", "0",
                         env=child_env(tmp_path), input=f"{PROMPT}\n")
    assert result.returncode == 0, result.stderr
    assert "64 tokens of context, answers up to 16 tokens; chat with a plain User/Assistant template" in result.stderr
    assert "[16 tokens · first token" in result.stderr and "· context " in result.stderr


# -- the API's chat route ----------------------------------------------------------------------------------------

def test_the_api_chat_route_defaults_to_a_quarter_of_the_context(stories_model):
    import httpx

    from cakep2p.api import create_app

    with serve(create_app(stories_model)) as url:
        body = {"model": stories_model.name, "messages": [{"role": "user", "content": "cat " * 3}]}
        answer = httpx.post(f"{url}/v1/chat/completions", content=json.dumps(body), timeout=120).json()
    assert answer["usage"]["completion_tokens"] == stories_model.max_seq_len // 4   # stories260K never stops early
    assert answer["choices"][0]["finish_reason"] == "length"
