"""The `cakep2p` command as a user runs it: real subprocesses, exact reference tokens, one-line errors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cakep2p.engine.checkpoint import Checkpoint
from tests import kit

CONSOLE_SCRIPT = Path(sys.executable).parent / "cakep2p"
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors")


def local_only(arguments: tuple[str, ...]) -> tuple[str, ...]:
    """These tests exercise one machine; `generate` without --local would browse every interface."""
    if arguments and arguments[0] == "generate" and "--local" not in arguments:
        return ("generate", "--local", *arguments[1:])
    return arguments


def run_cakep2p(*arguments: str, home: Path) -> subprocess.CompletedProcess:
    return kit.run_cakep2p(*local_only(arguments), env=kit.child_env(home))


@pytest.fixture(scope="module")
def references(stories_dir) -> list[dict]:
    return kit.reference_rows(stories_dir)


@pytest.fixture
def home(tmp_path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


def model_copy(stories_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    for name in MODEL_FILES:
        shutil.copy(stories_dir / name, folder / name)
    return folder


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cakep2p: error:")
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.slow
def test_module_prints_version(home):
    from cakep2p import __version__

    result = run_cakep2p("--version", home=home)
    assert result.returncode == 0
    assert result.stdout.strip() == f"cakep2p {__version__}"


@pytest.mark.slow
def test_console_script_prints_version(home):
    from cakep2p import __version__

    if not CONSOLE_SCRIPT.exists():
        pytest.skip(f"console script not installed at {CONSOLE_SCRIPT} (pip install -e .)")
    result = subprocess.run([str(CONSOLE_SCRIPT), "--version"], capture_output=True, text=True, timeout=60,
                            env=kit.child_env(home))
    assert result.returncode == 0
    assert result.stdout.strip() == f"cakep2p {__version__}"


@pytest.mark.parametrize("index", [0, 1, 2])
@pytest.mark.slow
def test_generate_json_matches_reference_tokens(stories_dir, references, home, index):
    reference = references[index]
    result = run_cakep2p("generate", "--model", str(stories_dir), "--prompt", reference["prompt"],
                         "--max-new-tokens", "64", "--temperature", "0", "--json", home=home)
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    assert output["prompt_tokens"] == reference["prompt_token_ids"]
    assert output["tokens"] == reference["new_token_ids"]
    assert output["text"] == reference["text"]
    assert output["ttft_s"] > 0 and output["tokens_per_s"] > 0


def test_generate_streams_reference_text(stories_dir, references, home):
    reference = references[0]
    result = run_cakep2p("generate", "--model", str(stories_dir), "--prompt", reference["prompt"],
                         "--max-new-tokens", "64", "--temperature", "0", "--local", home=home)
    assert result.returncode == 0, result.stderr
    assert result.stdout == reference["text"] + "\n"


COUNT_CONFIG_READS = """
import sys
opened = []
sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" and args and
                 str(args[0]).rsplit("/", 1)[-1] == "config.json" else None)
from cakep2p.cli import main
code = main(sys.argv[1:])
print(len(opened), file=sys.stderr)
sys.exit(code)
"""


@pytest.mark.slow
def test_generate_local_reads_config_json_once(stories_dir, home):
    result = subprocess.run([sys.executable, "-c", COUNT_CONFIG_READS, "generate", "--local", "--model",
                             str(stories_dir), "--prompt", "Once upon a time", "--max-new-tokens", "4"],
                            cwd=kit.REPO, env=kit.child_env(home), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "1"


@pytest.mark.slow
def test_missing_model_dir_is_one_line_error(tmp_path, home):
    missing = tmp_path / "nowhere"
    assert_one_line_error(run_cakep2p("generate", "--model", str(missing), "--prompt", "x", home=home), str(missing))


@pytest.mark.slow
def test_dir_without_config_is_one_line_error(stories_dir, tmp_path, home):
    folder = model_copy(stories_dir, tmp_path)
    (folder / "config.json").unlink()
    assert_one_line_error(run_cakep2p("generate", "--model", str(folder), "--prompt", "x", home=home), "config.json")


@pytest.mark.slow
def test_unsupported_architecture_is_one_line_error(stories_dir, tmp_path, home):
    folder = model_copy(stories_dir, tmp_path)
    edit_config(folder, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    assert_one_line_error(run_cakep2p("generate", "--model", str(folder), "--prompt", "x", home=home),
                          "GPT2LMHeadModel", "LlamaForCausalLM")


@pytest.mark.slow
def test_truncated_safetensors_is_one_line_error(stories_dir, tmp_path, home):
    folder = model_copy(stories_dir, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_one_line_error(run_cakep2p("generate", "--model", str(folder), "--prompt", "x", home=home),
                          "model.safetensors")


@pytest.mark.slow
def test_corrupt_safetensors_header_is_one_line_error(stories_dir, tmp_path, home):
    folder = model_copy(stories_dir, tmp_path)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:24] = b"this is not json"
    weights.write_bytes(bytes(data))
    assert_one_line_error(run_cakep2p("generate", "--model", str(folder), "--prompt", "x", home=home),
                          "model.safetensors")


@pytest.mark.slow
def test_missing_tensor_is_one_line_error(stories_dir, tmp_path, home):
    from safetensors.torch import load_file, save_file

    folder = model_copy(stories_dir, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.3.mlp.down_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    assert_one_line_error(run_cakep2p("generate", "--model", str(folder), "--prompt", "x", home=home),
                          "model.layers.3.mlp.down_proj.weight")


@pytest.mark.slow
def test_shape_mismatch_is_one_line_error(stories_dir, tmp_path, home):
    folder = model_copy(stories_dir, tmp_path)
    edit_config(folder, intermediate_size=160)
    assert_one_line_error(run_cakep2p("generate", "--model", str(folder), "--prompt", "x", home=home), "shape")


@pytest.mark.slow
def test_unknown_device_is_one_line_error(stories_dir, home):
    assert_one_line_error(run_cakep2p("generate", "--model", str(stories_dir), "--prompt", "x",
                                      "--device", "quantum", home=home), "quantum")


@pytest.mark.slow
def test_bad_dtype_is_refused_without_traceback(stories_dir, home):
    result = run_cakep2p("generate", "--model", str(stories_dir), "--prompt", "x", "--dtype", "int3", home=home)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "int3" in result.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_bad_sampling_option_is_one_line_error(stories_dir, home):
    assert_one_line_error(run_cakep2p("generate", "--model", str(stories_dir), "--prompt", "x", "--top-p", "0",
                                      home=home), "--top-p")


def generate_in_process(capsys, *arguments: str) -> dict:
    """The same entry point in this process (no torch start-up per call) for option wiring checks."""
    from cakep2p.cli import main

    assert main(["generate", "--local", *arguments, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_local_json_reports_no_plan_no_stages_and_no_notices(stories_dir, capsys):
    output = generate_in_process(capsys, "--model", str(stories_dir), "--prompt", "The dog", "--max-new-tokens", "2",
                                 "--temperature", "0")
    assert {key: output[key] for key in ("plan", "stages", "stage_seconds", "load_sources", "notices")} == {
        "plan": None, "stages": [], "stage_seconds": [], "load_sources": [], "notices": []}


def test_seed_makes_sampling_reproducible(stories_dir, capsys):
    options = ("--model", str(stories_dir), "--prompt", "The dog", "--max-new-tokens", "24", "--temperature", "1.0")
    first = generate_in_process(capsys, *options, "--seed", "7")
    assert generate_in_process(capsys, *options, "--seed", "7")["tokens"] == first["tokens"]
    assert generate_in_process(capsys, *options, "--seed", "8")["tokens"] != first["tokens"]


def test_chat_wraps_prompt_in_template(stories_dir, capsys):
    from cakep2p.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_checkpoint(Checkpoint.open(stories_dir))
    output = generate_in_process(capsys, "--model", str(stories_dir), "--prompt", "Tell a story.", "--chat",
                                 "--system", "Be kind.", "--max-new-tokens", "4", "--temperature", "0")
    expected_text = "<s>System: Be kind.\nUser: Tell a story.\nAssistant:"
    assert output["prompt_tokens"] == tokenizer.encode(expected_text, add_special_tokens=False)


# ---- option checks, in process (fast): one line naming the option, never "internal error" ------------------------

def run_in_process(capsys, *arguments: str) -> tuple[int, str]:
    """(exit code, stderr) of `cakep2p ARGUMENTS` in this process; argparse's refusals exit through SystemExit."""
    from cakep2p.cli import main

    try:
        code = main(list(arguments))
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err


def assert_refused(capsys, arguments: tuple[str, ...], *fragments: str) -> None:
    code, stderr = run_in_process(capsys, *arguments)
    assert code == 2, stderr
    assert "Traceback" not in stderr and "internal error" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert "error:" in last
    for fragment in fragments:
        assert fragment in last


@pytest.mark.parametrize("value", ["-5", "0", "many"])
def test_context_below_one_is_refused(stories_dir, node_home, capsys, value):
    assert_refused(capsys, ("generate", "--local", "--model", str(stories_dir), "--prompt", "x", "--context", value),
                   "--context", repr(value))


@pytest.mark.parametrize("option", ["--temperature", "--top-p", "--repetition-penalty"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_sampling_value_is_one_line_error(stories_dir, node_home, capsys, option, value):
    code, stderr = run_in_process(capsys, "generate", "--local", "--model", str(stories_dir), "--prompt", "x",
                                  option, value)
    assert code == 2
    assert stderr.strip().splitlines() == [stderr.strip()] and stderr.startswith(f"cakep2p: error: {option}")


@pytest.mark.parametrize("value", ["-1", str(2**63), "seven"])
def test_seed_outside_0_to_2_pow_63_is_refused(stories_dir, node_home, capsys, value):
    assert_refused(capsys, ("generate", "--local", "--model", str(stories_dir), "--prompt", "x", "--seed", value),
                   "--seed")


@pytest.mark.parametrize("arguments", [("doctor", "--port", "99999"), ("doctor", "--port", "0"),
                                       ("api", "--model", "m", "--port", "65536"),
                                       ("--serve", "--port", "-1")])
def test_port_outside_range_is_refused(node_home, capsys, arguments):
    assert_refused(capsys, arguments, "--port", "invalid port")


@pytest.mark.parametrize("arguments", [("peers",), ("doctor",), ("plan", "--model", "m"),
                                       ("generate", "--model", "m", "--prompt", "x")])
@pytest.mark.parametrize("value", ["-1", "nan"])
def test_negative_wait_is_refused(node_home, capsys, arguments, value):
    assert_refused(capsys, (*arguments, "--wait", value), "--wait", "invalid wait")


def test_api_max_sessions_below_one_is_refused(node_home, capsys):
    assert_refused(capsys, ("api", "--model", "m", "--max-sessions", "0"), "--max-sessions")


def test_context_length_refuses_a_non_positive_request(stories_dir):
    from cakep2p.engine.config import ModelArgs
    from cakep2p.errors import ModelError
    from cakep2p.cluster import context_length

    with pytest.raises(ModelError, match="--context"):
        context_length(Checkpoint.open(stories_dir).args, 0)


def test_local_model_too_big_for_this_machine_is_one_line_plan_error(stories_dir, node_home, capsys):
    code, stderr = run_in_process(capsys, "generate", "--local", "--model", str(stories_dir), "--prompt", "x",
                                  "--max-memory", "100KB")
    assert code == 2
    assert stderr.strip().splitlines() == [stderr.strip()]
    assert stderr.startswith("cakep2p: error: --local: model stories260K does not fit")


@pytest.mark.parametrize("command", ["peers", "doctor"])
def test_judging_peers_with_another_code_keeps_the_stored_code(node_home, monkeypatch, capsys, command):
    from cakep2p.security import code_path, load_or_create_code, new_code

    monkeypatch.delenv("CAKEP2P_CLUSTER_CODE", raising=False)
    own = load_or_create_code()
    code, stderr = run_in_process(capsys, command, "--cluster", new_code(), "--wait", "0.2",
                                  "--interface", "127.0.0.1")
    assert code == 0, stderr
    assert load_or_create_code() == own and own in code_path().read_text()


def test_window_log_redacts_the_pairing_code(home):
    from cakep2p.security import new_code

    code = new_code()
    script = ("import logging; from cakep2p.gui import setup_logging; from cakep2p.security import load_or_create_code; "
              "setup_logging(False); logging.getLogger('cakep2p.test').info('code is %s', load_or_create_code())")
    result = subprocess.run([sys.executable, "-c", script], cwd=kit.REPO, env=kit.child_env(home, code),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "code is <redacted>" in result.stderr and code not in result.stderr
