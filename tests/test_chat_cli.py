"""`cakep2p chat` in the terminal: streamed answers, /reset, /exit, end of input, Ctrl-C and a full context."""

from __future__ import annotations

import io
import signal
import subprocess
from pathlib import Path

import pytest

from cakep2p.commands.chat import chat_loop
from cakep2p.engine.conversation import Conversation, Reply, stream_completion
from cakep2p.engine.sampling import SamplingParams
from cakep2p.cluster import LocalModel
from cakep2p.engine.checkpoint import Checkpoint
from cakep2p.cluster import ModelOptions
from tests.kit import child_env, reference_greedy, run_cakep2p

QUESTION = "Once upon a time"
GREEDY_24 = SamplingParams(max_new_tokens=24, temperature=0.0)


@pytest.fixture(scope="module")
def model(stories_model) -> LocalModel:
    return stories_model


def greedy_answers(model: LocalModel, questions: list[str]) -> list[str]:
    """The answers one conversation gives to `questions`, asked in turn."""
    pipeline = model.new_pipeline()
    try:
        conversation = Conversation(pipeline, model.tokenizer)
        answers = []
        for question in questions:
            reply = Reply()
            for _ in conversation.ask(question, GREEDY_24, reply):
                pass
            answers.append(reply.text)
        return answers
    finally:
        pipeline.close()


def run_chat(stories_dir: Path, typed: str, home: Path) -> subprocess.CompletedProcess:
    return run_cakep2p("chat", "--model", str(stories_dir), "--local", "--device", "cpu", "--temperature", "0",
                       "--max-new-tokens", "24", env=child_env(home), input=typed)


@pytest.mark.slow
def test_chat_streams_answers_and_reset_starts_a_fresh_chat(stories_dir, model, tmp_path):
    first, second_without_reset = greedy_answers(model, [QUESTION, QUESTION])
    assert first != second_without_reset  # so the repeated answer below shows the history was dropped
    result = run_chat(stories_dir, f"{QUESTION}\n/reset\n{QUESTION}\n/exit\nnever asked\n", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"> {first}\n> > {first}\n> "
    assert "(new chat)" in result.stderr


@pytest.mark.slow
def test_chat_exits_cleanly_at_end_of_input(stories_dir, model, tmp_path):
    (answer,) = greedy_answers(model, [QUESTION])
    result = run_chat(stories_dir, f"{QUESTION}\n", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"> {answer}\n> \n"
    assert "Traceback" not in result.stderr


class InterruptAfterFirstText(io.StringIO):
    """Stdout that presses Ctrl-C (a real SIGINT to this process) when the answer's first text arrives."""

    def write(self, text: str) -> int:
        if text and not self.getvalue():
            signal.raise_signal(signal.SIGINT)
        return super().write(text)


def test_ctrl_c_stops_the_answer_but_not_the_chat(model):
    pipeline = model.new_pipeline()
    conversation = Conversation(pipeline, model.tokenizer)
    lines = iter([QUESTION, "/exit"])
    out, notes = InterruptAfterFirstText(), io.StringIO()
    try:
        params = SamplingParams(max_new_tokens=400, temperature=0.0)
        assert chat_loop(conversation, params, lambda prompt: next(lines), out, notes) == 0
    finally:
        pipeline.close()
    assert "(stopped)" in notes.getvalue()
    answer = conversation.messages[-1]
    assert answer["role"] == "assistant" and out.getvalue() == answer["content"] + "\n"
    assert len(model.tokenizer.encode(answer["content"], add_special_tokens=False)) < 10


def test_full_context_tells_the_user_to_reset(stories_dir):
    small = LocalModel(Checkpoint.open(stories_dir), ModelOptions(dtype="float32", device="cpu", context=32))
    pipeline = small.new_pipeline()
    conversation = Conversation(pipeline, small.tokenizer)
    lines = iter(["cat " * 40, "/reset", QUESTION, "/exit"])
    out, notes = io.StringIO(), io.StringIO()
    try:
        assert chat_loop(conversation, GREEDY_24, lambda prompt: next(lines), out, notes) == 0
    finally:
        pipeline.close()
        small.close()
    assert "no longer fits the context" in notes.getvalue() and "/reset" in notes.getvalue()
    assert [message["role"] for message in conversation.messages] == ["user", "assistant"]


def test_completion_text_continues_the_prompt_with_its_leading_space(model, stories_dir):
    reference = reference_greedy(stories_dir, "Lily and Ben")
    pipeline = model.new_pipeline()
    reply = Reply()
    try:
        params = SamplingParams(max_new_tokens=len(reference["new_token_ids"]), temperature=0.0)
        pieces = [event.text for event in stream_completion(pipeline, model.tokenizer, reference["prompt_token_ids"],
                                                             params, reply)]
    finally:
        pipeline.close()
    assert reference["text"].startswith(" ")
    assert "".join(pieces) == reply.text == reference["text"]


def test_chat_answer_starts_with_its_first_word_and_is_stored_as_streamed(model):
    pipeline = model.new_pipeline()
    conversation = Conversation(pipeline, model.tokenizer)
    reply = Reply()
    try:
        pieces = [event.text for event in conversation.ask(QUESTION, GREEDY_24, reply)]
        untrimmed = Reply()
        for _ in stream_completion(pipeline, model.tokenizer, conversation.prompt_ids(conversation.messages[:1]),
                                   GREEDY_24, untrimmed):
            pass
    finally:
        pipeline.close()
    assert "".join(pieces) == reply.text == conversation.messages[-1]["content"] == untrimmed.text.lstrip()
    assert reply.text and not reply.text[0].isspace()
