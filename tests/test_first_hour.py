"""A new user's first hour on the command line: the demo model that ships with cakep2p runs generate, chat, plan and
api with no --model and no network; generate ends with a summary line; limits and codes are never silent."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path

import pytest

from cakep2p import paths
from tests.kit import REPO, ApiProcess, child_env, reference_greedy, run_cakep2p, seed_benchmark

PROMPT = "Once upon a time"
DEMO_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "LICENSE")
SUMMARY = re.compile(r"^cakep2p: (\d+) tokens · first token \d+ ms · [\d.]+ tok/s · (\d+) nodes?( · .*)?$", re.MULTILINE)


@pytest.fixture
def home(tmp_path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    seed_benchmark(path)
    return path


def in_process(capsys, *arguments: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `cakep2p ARGUMENTS` in this process; argparse refusals exit via SystemExit."""
    from cakep2p.cli import main

    try:
        code = main(list(arguments))
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- the demo model inside the package -------------------------------------------------------------------------

def test_the_demo_model_ships_inside_the_package_with_its_license():
    folder = paths.embedded_model_dir()
    assert folder.is_relative_to(Path(paths.__file__).resolve().parent)
    assert sorted(path.name for path in folder.iterdir()) == sorted(DEMO_FILES)
    assert "MIT License" in (folder / "LICENSE").read_text()
    assert sum(path.stat().st_size for path in folder.iterdir()) < 1_200_000


def test_the_demo_model_is_the_trained_stories260k(stories_dir):
    for name in DEMO_FILES:
        assert hashlib.sha256((paths.embedded_model_dir() / name).read_bytes()).hexdigest() == \
            hashlib.sha256((stories_dir / name).read_bytes()).hexdigest(), name


def test_the_demo_model_is_package_data_of_the_wheel_and_the_app():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "models/stories260K/*" in setuptools["package-data"]["cakep2p"]
    assert "cakep2p/models/stories260K" in (REPO / "packaging" / "cakep2p.spec").read_text()


def test_is_embedded_model_knows_the_demo_model_by_any_spelling(tmp_path):
    assert paths.is_embedded_model(paths.embedded_model_dir() / ".." / paths.EMBEDDED_MODEL_NAME)
    assert not paths.is_embedded_model(tmp_path)


@pytest.mark.slow
def test_generate_without_a_model_runs_the_demo_model_and_says_so_once(home, stories_dir):
    result = run_cakep2p("generate", "--prompt", PROMPT, "--max-new-tokens", "16", "--temperature", "0",
                         env=child_env(home, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr
    text = result.stdout.removesuffix("\n")
    assert text.strip() and reference_greedy(stories_dir, PROMPT)["text"].startswith(text)   # its 64-token answer
    assert result.stderr.count("tiny demo model") == 1 and "--model PATH" in result.stderr
    summary = SUMMARY.search(result.stderr)
    assert summary and summary.group(1) == "16" and summary.group(2) == "1", result.stderr
    assert result.stderr.rstrip().splitlines()[-1] == summary.group(0)   # the summary ends the run


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="a network namespace with no network needs root and unshare")
def test_generate_without_a_model_works_on_a_machine_with_no_network(home):
    """In a fresh network namespace only loopback exists: no route anywhere, no interface to announce on."""
    command = ("ip link set lo up 2>/dev/null || true; exec \"$@\"")
    result = subprocess.run(["unshare", "-n", "sh", "-c", command, "sh", sys.executable, "-m", "cakep2p", "generate",
                             "--prompt", PROMPT, "--max-new-tokens", "16"],
                            env=child_env(home, HF_HUB_OFFLINE="1"), cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert SUMMARY.search(result.stderr), result.stderr


@pytest.mark.slow
def test_chat_without_a_model_runs_the_demo_model_in_the_fallback_template(home):
    result = run_cakep2p("chat", "--local", "--temperature", "0", env=child_env(home), input=f"{PROMPT}\n")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("tiny demo model") == 1
    assert "plain User/Assistant template" in result.stderr and "answers up to 128 tokens" in result.stderr
    assert result.stdout.startswith("> ") and len(result.stdout) > len("> \n> \n")


@pytest.mark.slow
def test_api_without_a_model_serves_the_demo_model_under_the_id_it_reports(home):
    with ApiProcess(["--local", "--port", "0"], env=child_env(home)) as api:
        url = api.url()
        with urllib.request.urlopen(f"{url}/models", timeout=30) as response:
            model_id = json.load(response)["data"][0]["id"]
        assert model_id == paths.EMBEDDED_MODEL_NAME
        body = json.dumps({"model": model_id, "messages": [{"role": "user", "content": PROMPT}]}).encode()
        request = urllib.request.Request(f"{url}/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.load(response)
        assert f'model id "{model_id}"' in api.output()
    assert answer["choices"][0]["message"]["content"]
    assert answer["usage"]["completion_tokens"] <= 512 // 4     # no max_tokens: a quarter of the context
    assert api.output().count("tiny demo model") == 1


def test_plan_without_a_model_plans_the_demo_model(home, monkeypatch, capsys):
    monkeypatch.setenv("CAKEP2P_HOME", str(home))
    code, out, err = in_process(capsys, "plan", "--wait", "0")
    assert code == 0, err
    assert out.startswith("model stories260K: 5 layers") and "tiny demo model" in err


# -- generate: the summary line, --quiet, an answer cut at the end of the context -------------------------------

def test_generate_ends_with_a_summary_line_on_stderr(stories_dir, capsys):
    code, out, err = in_process(capsys, "generate", "--local", "--model", str(stories_dir), "--prompt", PROMPT,
                                "--max-new-tokens", "8", "--temperature", "0")
    assert code == 0, err
    summary = SUMMARY.search(err)
    assert summary and summary.group(1) == "8" and summary.group(2) == "1" and "hit the token limit" in err
    assert "tokens ·" not in out


def test_generate_json_still_prints_the_summary_on_stderr_only(stories_dir, capsys):
    code, out, err = in_process(capsys, "generate", "--local", "--model", str(stories_dir), "--prompt", PROMPT,
                                "--max-new-tokens", "4", "--json")
    assert code == 0, err
    assert json.loads(out)["tokens"] and SUMMARY.search(err)


def test_quiet_generate_prints_only_the_text(capsys):
    code, out, err = in_process(capsys, "generate", "--local", "--prompt", PROMPT, "--max-new-tokens", "4", "--quiet")
    assert code == 0
    assert out.strip() and err == ""


def test_an_answer_cut_at_the_end_of_the_context_says_so_and_how_to_get_more(stories_dir, capsys):
    code, out, err = in_process(capsys, "generate", "--local", "--model", str(stories_dir), "--prompt", PROMPT,
                                "--context", "12", "--max-new-tokens", "64", "--temperature", "0")
    assert code == 0, err
    assert "stopped at the end of the context" in err
    assert "the answer stopped at the end of the context (12 tokens): pass a larger --context (this model allows " \
           "up to 512)" in err


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_max_new_tokens_is_at_least_one_in_generate_and_chat(capsys, command):
    code, _, err = in_process(capsys, command, "--local", "--prompt" if command == "generate" else "--system", "x",
                              "--max-new-tokens", "0")
    assert code == 2
    assert "--max-new-tokens" in err and ">= 1" in err and err.count("\n") == 1


# -- limits and codes: capped with a note, not silently ----------------------------------------------------------

def test_a_context_beyond_the_model_is_capped_with_a_note(stories_dir, capsys):
    code, out, err = in_process(capsys, "generate", "--local", "--model", str(stories_dir), "--prompt", PROMPT,
                                "--context", "100000", "--max-new-tokens", "2", "--json")
    assert code == 0, err
    assert "a context of 100000 tokens is more than this model allows: using its maximum, 512 tokens" in err
    assert json.loads(out)["notices"][0].startswith("a context of 100000 tokens")


def test_plan_caps_the_context_with_the_same_note(stories_dir, home, monkeypatch, capsys):
    monkeypatch.setenv("CAKEP2P_HOME", str(home))
    code, out, err = in_process(capsys, "plan", "--model", str(stories_dir), "--wait", "0", "--context", "100000")
    assert code == 0, err
    assert "context 512 tokens" in out and "more than this model allows" in err


def test_plan_with_a_cluster_code_judges_with_it_without_storing_it(stories_dir, home, monkeypatch, capsys):
    from cakep2p import security

    monkeypatch.setenv("CAKEP2P_HOME", str(home))
    monkeypatch.delenv(security.CODE_ENV_VAR, raising=False)
    stored = security.load_or_create_code()
    other = security.new_code()
    code, _, err = in_process(capsys, "plan", "--model", str(stories_dir), "--wait", "0", "--cluster", other)
    assert code == 0, err
    assert security.load_or_create_code() == stored


def test_the_help_says_which_commands_store_a_cluster_code(capsys):
    helps = {command: " ".join(in_process(capsys, command, "--help")[1].split()) for command in ("generate", "plan")}
    assert "pairing code of the cluster to join (stored for next time)" in helps["generate"]
    assert "for this run only (not stored" in helps["plan"]


def run_code_set_on_a_terminal(home: Path, typed: str) -> tuple[int, str]:
    """`cakep2p code --set -` with a pseudo-terminal as stdin (a person at the keyboard): (exit code, stderr)."""
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen([sys.executable, "-m", "cakep2p", "code", "--set", "-"], cwd=REPO,
                                   env=child_env(home), stdin=terminal, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        os.close(terminal)
        terminal = -1
        os.write(controller, typed.encode())
        out, err = process.communicate(timeout=60)
    finally:
        if terminal >= 0:
            os.close(terminal)
        os.close(controller)
    return process.returncode, err


@pytest.mark.slow
def test_code_set_from_a_terminal_asks_for_the_code(home):
    from cakep2p import security

    code = security.new_code()
    returncode, err = run_code_set_on_a_terminal(home, code + "\n")
    assert returncode == 0, err
    assert err.startswith("paste the cluster code (what `cakep2p code` prints on a machine of the cluster)")
    assert code not in err


@pytest.mark.slow
def test_code_set_from_a_pipe_asks_nothing(home):
    from cakep2p import security

    result = run_cakep2p("code", "--set", "-", env=child_env(home), input=security.new_code() + "\n")
    assert result.returncode == 0, result.stderr
    assert "paste the cluster code" not in result.stderr


# -- one way to write sizes and layer ranges ---------------------------------------------------------------------

@pytest.mark.parametrize("size, text", [(12, "12 B"), (1023, "1023 B"), (1024, "1 KiB"), (1536, "1.5 KiB"),
                                        (1047552, "1023 KiB"), (1048064, "1 MiB"), (1023 * 1024 ** 2, "1023 MiB"),
                                        (5 * 1024 ** 5, "5120 TiB")])
def test_sizes_are_never_in_scientific_notation(size, text):
    from cakep2p.planner import format_bytes
    from cakep2p.units import format_size

    assert format_size(size) == format_bytes(size) == text


def test_no_size_up_to_a_pebibyte_prints_an_exponent():
    from cakep2p.units import format_size

    sizes = [base * 1024 ** power + delta for power in range(6) for base in (1, 99, 100, 999, 1000, 1023)
             for delta in (-1, 0, 1, 511, 512)]
    assert [size for size in sizes if size >= 0 and "e" in format_size(size)] == []


def test_plan_table_writes_each_stage_as_every_message_does():
    from cakep2p.planner import LayerRange, ModelSpec, NodeBudget, plan

    spec = ModelSpec("m", (1024,) * 5, 100, 100, 1, 1)
    table = plan(spec, [NodeBudget("n0", "laptop", 3200), NodeBudget("n1", "desk", 4000)], "n0", 1).table()
    rows = table.splitlines()
    assert "layers 0–1 + embedding + head" in rows[1] and LayerRange(0, 2, True, True).describe() in rows[1]
    assert "layers 2–4" in rows[2] and "2-4" not in table and "(3)" not in table
    assert rows[3].split()[:4] == ["total", "2", "nodes,", "proportional"] and "5 layers" in rows[3]


# -- the README a new user follows ---------------------------------------------------------------------------------

def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def shell_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, re.DOTALL)


def test_readme_quick_start_runs_cakep2p_from_the_virtualenv_its_install_made():
    (block,) = shell_blocks(readme_section("Quick start"))
    commands = [line.strip() for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert commands[0] == ". .venv/bin/activate"
    assert all(line.startswith(("cakep2p ", "pip install ")) for line in commands[1:]), commands


def test_readme_quick_start_begins_with_the_demo_model_and_its_summary_line():
    (block,) = shell_blocks(readme_section("Quick start"))
    first = next(line for line in block.splitlines() if line.startswith("cakep2p "))
    assert first == 'cakep2p generate --prompt "Once upon a time" --max-new-tokens 16'
    shown = next(line.strip().removeprefix("#").strip() for line in block.splitlines() if "tok/s" in line)
    assert SUMMARY.fullmatch(shown), shown


def test_readme_api_example_sends_the_model_id_the_server_reports():
    section = readme_section("OpenAI-compatible API")
    (shell, *_) = shell_blocks(section)
    assert "/v1/models" in shell and '"model": "\'"$MODEL"\'"' in shell
    assert "client.models.list().data[0].id" in section and "model=model," in section


def test_ci_runs_exactly_the_readme_test_command():
    (command,) = shell_blocks(readme_section("Fresh machine: two commands"))[2:3]
    assert command.strip() in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()


@pytest.mark.slow
def test_readme_api_example_runs_as_written(home):
    """The README's API block in bash, after its own activation line; only the port moves off 8000 (a shared test
    machine may have it taken)."""
    from tests.kit import free_port

    (shell, *_) = shell_blocks(readme_section("OpenAI-compatible API"))
    port = free_port()
    script = shell.replace("cakep2p api &", f"cakep2p api --port {port} &").replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    activate = f". {Path(sys.executable).parent / 'activate'}" if (Path(sys.executable).parent / "activate").is_file() \
        else f'cakep2p() {{ "{sys.executable}" -m cakep2p "$@"; }}'
    result = subprocess.run(["bash", "-c", f"set -m\n{activate}\n{script}\nwait"], cwd=REPO, env=child_env(home),
                            capture_output=True, text=True, timeout=180)
    assert result.returncode in (0, 143), result.stderr   # 143: `wait` reports the server ended by `kill %1`
    answer = json.loads(result.stdout.splitlines()[-1])
    assert answer["model"] == paths.EMBEDDED_MODEL_NAME and answer["choices"][0]["message"]["content"]
