"""The `cakep2p` command as a user runs it: real subprocesses, exact reference tokens, one-line errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONSOLE_SCRIPT = Path(sys.executable).parent / "cakep2p"
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors")


def local_only(arguments: tuple[str, ...]) -> tuple[str, ...]:
    """These tests exercise one machine; `generate` without --local would browse every interface."""
    if arguments and arguments[0] == "generate" and "--local" not in arguments:
        return ("generate", "--local", *arguments[1:])
    return arguments


def run_cakep2p(*arguments: str, home: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    arguments = local_only(arguments)
    env = {**os.environ, "CAKEP2P_HOME": str(home), "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, "-m", "cakep2p", *arguments], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def references(stories_dir) -> list[dict]:
    return json.loads((stories_dir / "REFERENCE.json").read_text())["greedy"]


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


def test_module_prints_version(home):
    from cakep2p import __version__

    result = run_cakep2p("--version", home=home)
    assert result.returncode == 0
    assert result.stdout.strip() == f"cakep2p {__version__}"


def test_console_script_prints_version(home):
    from cakep2p import __version__

    if not CONSOLE_SCRIPT.exists():
        pytest.skip(f"console script not installed at {CONSOLE_SCRIPT} (pip install -e .)")
    result = subprocess.run([str(CONSOLE_SCRIPT), "--version"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "CAKEP2P_HOME": str(home)})
    assert result.returncode == 0
    assert result.stdout.strip() == f"cakep2p {__version__}"


@pytest.mark.parametrize("index", [0, 1, 2])
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


def test_missing_model_dir_is_one_line_error(tmp_path, home):
    missing = tmp_path / "nowhere"
    assert_one_line_error(run_cakep2p("generate", "--model", str(missing), "--prompt", "x", home=home), str(missing))


def test_dir_without_config_is_one_line_error(stories_dir, tmp_path, home):
    folder = model_copy(stories_dir, tmp_path)
    (folder / "config.json").unlink()
    assert_one_line_error(run_cakep2p("generate", "--model", str(folder), "--prompt", "x", home=home), "config.json")


def test_unsupported_architecture_is_one_line_error(stories_dir, tmp_path, home):
    folder = model_copy(stories_dir, tmp_path)
    edit_config(folder, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    assert_one_line_error(run_cakep2p("generate", "--model", str(folder), "--prompt", "x", home=home),
                          "GPT2LMHeadModel", "LlamaForCausalLM")


def test_truncated_safetensors_is_one_line_error(stories_dir, tmp_path, home):
    folder = model_copy(stories_dir, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_one_line_error(run_cakep2p("generate", "--model", str(folder), "--prompt", "x", home=home),
                          "model.safetensors")


def test_corrupt_safetensors_header_is_one_line_error(stories_dir, tmp_path, home):
    folder = model_copy(stories_dir, tmp_path)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:24] = b"this is not json"
    weights.write_bytes(bytes(data))
    assert_one_line_error(run_cakep2p("generate", "--model", str(folder), "--prompt", "x", home=home),
                          "model.safetensors")


def test_missing_tensor_is_one_line_error(stories_dir, tmp_path, home):
    from safetensors.torch import load_file, save_file

    folder = model_copy(stories_dir, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.3.mlp.down_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    assert_one_line_error(run_cakep2p("generate", "--model", str(folder), "--prompt", "x", home=home),
                          "model.layers.3.mlp.down_proj.weight")


def test_shape_mismatch_is_one_line_error(stories_dir, tmp_path, home):
    folder = model_copy(stories_dir, tmp_path)
    edit_config(folder, intermediate_size=160)
    assert_one_line_error(run_cakep2p("generate", "--model", str(folder), "--prompt", "x", home=home), "shape")


def test_unknown_device_is_one_line_error(stories_dir, home):
    assert_one_line_error(run_cakep2p("generate", "--model", str(stories_dir), "--prompt", "x",
                                      "--device", "quantum", home=home), "quantum")


def test_bad_dtype_is_refused_without_traceback(stories_dir, home):
    result = run_cakep2p("generate", "--model", str(stories_dir), "--prompt", "x", "--dtype", "int3", home=home)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "int3" in result.stderr.strip().splitlines()[-1]


def test_bad_sampling_option_is_one_line_error(stories_dir, home):
    assert_one_line_error(run_cakep2p("generate", "--model", str(stories_dir), "--prompt", "x", "--top-p", "0",
                                      home=home), "--top-p")


def generate_in_process(capsys, *arguments: str) -> dict:
    """The same entry point in this process (no torch start-up per call) for option wiring checks."""
    from cakep2p.cli import main

    assert main(["generate", "--local", *arguments, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_seed_makes_sampling_reproducible(stories_dir, capsys):
    options = ("--model", str(stories_dir), "--prompt", "The dog", "--max-new-tokens", "24", "--temperature", "1.0")
    first = generate_in_process(capsys, *options, "--seed", "7")
    assert generate_in_process(capsys, *options, "--seed", "7")["tokens"] == first["tokens"]
    assert generate_in_process(capsys, *options, "--seed", "8")["tokens"] != first["tokens"]


def test_chat_wraps_prompt_in_template(stories_dir, capsys):
    from cakep2p.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(stories_dir)
    output = generate_in_process(capsys, "--model", str(stories_dir), "--prompt", "Tell a story.", "--chat",
                                 "--system", "Be kind.", "--max-new-tokens", "4", "--temperature", "0")
    expected_text = "<s>System: Be kind.\nUser: Tell a story.\nAssistant:"
    assert output["prompt_tokens"] == tokenizer.encode(expected_text, add_special_tokens=False)
