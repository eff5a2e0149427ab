"""Packaging: the PyInstaller spec, icons, Linux desktop entries and install script (fast), and the real build (slow).

The slow test builds the app and runs it with a clean environment; it is opt-in: CAKEP2P_BUILD_TEST=1
(CAKEP2P_BUILD_TEST=reuse checks an existing dist/ without rebuilding).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import types
import uuid
from pathlib import Path

import pytest

import cakep2p
from tests.kit import ChildProcess, child_env, loopback_multicast_on, run_cakep2p, wait_until

REPO = Path(__file__).resolve().parents[1]
PACKAGING = REPO / "packaging"
SPEC = PACKAGING / "cakep2p.spec"
ICONS = PACKAGING / "icons"
LINUX = PACKAGING / "linux"
PNG_SIZES = (16, 32, 48, 64, 128, 256, 512)
DESKTOP_FILES = ("cakep2p.desktop", "cakep2p-serve.desktop")


# -- the spec, run with stand-ins for PyInstaller's build objects -------------------------------------------

# What Analysis collects from torch, in PyInstaller's (destination, source, kind) form.
SAMPLE_BINARIES = [("torch/lib/libtorch_cpu.so", "/site/torch/lib/libtorch_cpu.so", "BINARY"),
                   ("torch/lib/libtorchbind_test.so", "/site/torch/lib/libtorchbind_test.so", "BINARY"),
                   ("torch/bin/torch_shm_manager", "/site/torch/bin/torch_shm_manager", "BINARY"),
                   ("torch/bin/test_api", "/site/torch/bin/test_api", "BINARY")]
SAMPLE_DATAS = [("torch/include/ATen/core/Tensor.h", "/site/torch/include/ATen/core/Tensor.h", "DATA"),
                ("torch/bin/protoc", "/site/torch/bin/protoc", "DATA"),
                ("torch/_C/_VariableFunctions.pyi", "/site/torch/_C/_VariableFunctions.pyi", "DATA")]


class Recorded:
    """What one PyInstaller build object (Analysis, EXE, COLLECT, BUNDLE...) was called with."""

    def __init__(self, kind: str, *args, **kwargs) -> None:
        self.kind, self.args, self.kwargs = kind, args, kwargs
        self.datas, self.binaries = list(SAMPLE_DATAS), list(SAMPLE_BINARIES)
        self.pure, self.scripts = [], []


def run_spec(monkeypatch, platform: str) -> dict[str, list[Recorded]]:
    """Execute packaging/cakep2p.spec as PyInstaller would on `platform`; returns the build objects it made."""
    calls: dict[str, list[Recorded]] = {}

    def recorder(kind: str):
        def make(*args, **kwargs) -> Recorded:
            made = Recorded(kind, *args, **kwargs)
            calls.setdefault(kind, []).append(made)
            return made
        return make

    hooks = types.ModuleType("PyInstaller.utils.hooks")
    hooks.collect_submodules = lambda package, **_: [package]
    for name, module in (("PyInstaller", types.ModuleType("PyInstaller")),
                         ("PyInstaller.utils", types.ModuleType("PyInstaller.utils")),
                         ("PyInstaller.utils.hooks", hooks)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "platform", platform)
    namespace = {"SPECPATH": str(PACKAGING), "__file__": str(SPEC)}
    namespace.update({kind: recorder(kind) for kind in ("Analysis", "PYZ", "EXE", "COLLECT", "BUNDLE")})
    exec(compile(SPEC.read_text(encoding="utf-8"), str(SPEC), "exec"), namespace)
    return calls


def test_spec_builds_a_folder_app_named_cakep2p_from_the_launcher(monkeypatch):
    calls = run_spec(monkeypatch, "linux")
    (analysis,) = calls["Analysis"]
    assert [Path(script) for script in analysis.args[0]] == [PACKAGING / "launcher.py"]
    assert [exe.kwargs["name"] for exe in calls["EXE"]] == ["cakep2p"]
    assert all(exe.kwargs["exclude_binaries"] for exe in calls["EXE"]), "one-folder build: binaries go to COLLECT"
    assert calls["COLLECT"][0].kwargs["name"] == "cakep2p"
    assert "BUNDLE" not in calls


def test_launcher_runs_the_cli_main():
    source = (PACKAGING / "launcher.py").read_text(encoding="utf-8")
    assert "from cakep2p.cli import main" in source and "main()" in source


def test_spec_collects_the_subcommands_imported_by_name(monkeypatch):
    (analysis,) = run_spec(monkeypatch, "linux")["Analysis"]
    assert "cakep2p" in analysis.kwargs["hiddenimports"]  # collect_submodules("cakep2p") stand-in


def test_spec_never_bundles_transformers_or_tkinter(monkeypatch):
    (analysis,) = run_spec(monkeypatch, "linux")["Analysis"]
    assert {"transformers", "tkinter"} <= set(analysis.kwargs["excludes"])


def collected(calls: dict[str, list[Recorded]]) -> tuple[list, list]:
    """The (binaries, datas) lists the spec hands to COLLECT."""
    *_executables, binaries, datas = calls["COLLECT"][0].args
    return [entry[0] for entry in binaries], [entry[0] for entry in datas]


def test_spec_runtime_hook_exists(monkeypatch):
    (analysis,) = run_spec(monkeypatch, "linux")["Analysis"]
    assert analysis.kwargs["runtime_hooks"] and all(Path(hook).is_file() for hook in analysis.kwargs["runtime_hooks"])


def test_spec_drops_torch_headers_and_test_binaries_but_keeps_the_shm_manager(monkeypatch):
    binaries, datas = collected(run_spec(monkeypatch, "linux"))
    assert binaries == ["torch/lib/libtorch_cpu.so", "torch/bin/torch_shm_manager"]
    assert "torch/include/ATen/core/Tensor.h" not in datas and "torch/bin/protoc" not in datas


@pytest.mark.parametrize("size", PNG_SIZES)
def test_spec_bundles_the_theme_icon_under_its_theme_name(monkeypatch, size):
    calls = run_spec(monkeypatch, "linux")
    datas = {entry[0]: Path(entry[1]) for entry in calls["COLLECT"][0].args[-1]}
    assert datas[f"share/icons/hicolor/{size}x{size}/apps/cakep2p.png"] == ICONS / f"cakep2p-{size}.png"
    assert (ICONS / f"cakep2p-{size}.png").is_file()


def test_macos_bundle_takes_its_version_from_the_package(monkeypatch):
    (bundle,) = run_spec(monkeypatch, "darwin")["BUNDLE"]
    plist = bundle.kwargs["info_plist"]
    assert plist["CFBundleShortVersionString"] == cakep2p.__version__
    assert bundle.kwargs["version"] == cakep2p.__version__
    assert plist["CFBundleName"] == "cakep2p"
    assert plist["CFBundleIdentifier"] == bundle.kwargs["bundle_identifier"]
    assert bundle.kwargs["name"] == "cakep2p.app"


def test_spec_does_not_hard_code_the_version():
    assert not re.search(rf"[\"']{re.escape(cakep2p.__version__)}[\"']", SPEC.read_text(encoding="utf-8"))


def test_macos_bundle_declares_local_network_use_and_bonjour_service(monkeypatch):
    (bundle,) = run_spec(monkeypatch, "darwin")["BUNDLE"]
    plist = bundle.kwargs["info_plist"]
    assert "network" in plist["NSLocalNetworkUsageDescription"].lower()
    assert "_cakep2p._tcp" in plist["NSBonjourServices"]
    assert plist["NSHighResolutionCapable"] is True


def test_bonjour_service_matches_the_discovery_service_type(monkeypatch):
    from cakep2p.discovery import SERVICE_TYPE

    (bundle,) = run_spec(monkeypatch, "darwin")["BUNDLE"]
    assert SERVICE_TYPE.removesuffix(".local.") in bundle.kwargs["info_plist"]["NSBonjourServices"]


def test_macos_app_is_one_windowed_executable(monkeypatch):
    executables = run_spec(monkeypatch, "darwin")["EXE"]
    assert [(exe.kwargs["name"], exe.kwargs["console"]) for exe in executables] == [("cakep2p", False)]


def test_macos_bundle_uses_the_icns_icon(monkeypatch):
    (bundle,) = run_spec(monkeypatch, "darwin")["BUNDLE"]
    assert Path(bundle.kwargs["icon"]) == ICONS / "cakep2p.icns" and Path(bundle.kwargs["icon"]).is_file()


def test_windows_build_has_a_windowed_app_and_a_console_cli_with_the_ico_icon(monkeypatch):
    executables = run_spec(monkeypatch, "win32")["EXE"]
    assert {exe.kwargs["name"]: exe.kwargs["console"] for exe in executables} == {"cakep2p": False,
                                                                                 "cakep2p-cli": True}
    for exe in executables:
        assert Path(exe.kwargs["icon"]) == ICONS / "cakep2p.ico" and Path(exe.kwargs["icon"]).is_file()


# -- icons ------------------------------------------------------------------------------------------------


def png_dimensions(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("size", PNG_SIZES)
def test_png_icon_has_its_named_size(size):
    assert png_dimensions((ICONS / f"cakep2p-{size}.png").read_bytes()) == (size, size)


def test_svg_icon_is_square_svg():
    text = (ICONS / "cakep2p.svg").read_text(encoding="utf-8")
    assert "<svg" in text and 'viewBox="0 0 512 512"' in text


def test_ico_holds_png_images_up_to_256():
    data = (ICONS / "cakep2p.ico").read_bytes()
    reserved, kind, count = struct.unpack("<HHH", data[:6])
    assert (reserved, kind) == (0, 1)
    sizes = set()
    for index in range(count):
        width, height, _, _, _, _, length, offset = struct.unpack("<BBBBHHII", data[6 + 16 * index:22 + 16 * index])
        image = png_dimensions(data[offset:offset + length])
        assert image == (width or 256, height or 256)
        sizes.add(image[0])
    assert {16, 32, 48, 256} <= sizes


def test_icns_holds_the_retina_sizes():
    data = (ICONS / "cakep2p.icns").read_bytes()
    assert data[:4] == b"icns" and struct.unpack(">I", data[4:8])[0] == len(data)
    chunks, position = {}, 8
    while position < len(data):
        code = data[position:position + 4].decode("ascii")
        (length,) = struct.unpack(">I", data[position + 4:position + 8])
        chunks[code] = png_dimensions(data[position + 8:position + length])[0]
        position += length
    assert {"ic07": 128, "ic08": 256, "ic09": 512, "ic10": 1024}.items() <= chunks.items()


# -- Linux desktop integration ----------------------------------------------------------------------------


def desktop_keys(name: str) -> dict[str, str]:
    lines = (LINUX / name).read_text(encoding="utf-8").splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


@pytest.mark.parametrize("name", DESKTOP_FILES)
def test_desktop_entry_passes_desktop_file_validate(name):
    validator = shutil.which("desktop-file-validate")
    if validator is None:
        pytest.skip("desktop-file-validate not installed (apt-get install desktop-file-utils)")
    result = subprocess.run([validator, str(LINUX / name)], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


@pytest.mark.parametrize("name", DESKTOP_FILES)
def test_desktop_entry_uses_the_cakep2p_theme_icon(name):
    assert desktop_keys(name)["Icon"] == "cakep2p"


def test_window_desktop_entry_opens_the_window_without_a_terminal():
    keys = desktop_keys("cakep2p.desktop")
    assert (keys["Exec"], keys["Terminal"]) == ("cakep2p", "false")


def test_headless_desktop_entry_runs_serve_in_a_terminal():
    keys = desktop_keys("cakep2p-serve.desktop")
    assert (keys["Exec"], keys["Terminal"]) == ("cakep2p --serve", "true")
    assert "headless" in keys["Name"]


def test_systemd_user_unit_runs_serve():
    text = (LINUX / "cakep2p-serve.service").read_text(encoding="utf-8")
    assert re.search(r"^ExecStart=\S*cakep2p --serve$", text, re.MULTILINE)
    assert re.search(r"^WantedBy=default.target$", text, re.MULTILINE)


def test_gui_sets_the_desktop_file_name_of_the_desktop_entry():
    gui = REPO / "cakep2p" / "gui"
    if not gui.is_dir():
        pytest.skip("cakep2p/gui is not there yet")
    sources = "\n".join(path.read_text(encoding="utf-8") for path in gui.rglob("*.py"))
    names = re.findall(r"setDesktopFileName\(\s*[\"']([^\"']+)[\"']\s*\)", sources)
    assert names and set(names) == {"cakep2p"} and (LINUX / f"{names[0]}.desktop").is_file()


@pytest.fixture
def fake_bundle(tmp_path) -> Path:
    bundle = tmp_path / "app" / "cakep2p"
    bundle.mkdir(parents=True)
    binary = bundle / "cakep2p"
    binary.write_text("#!/bin/sh\necho cakep2p fake\n", encoding="utf-8")
    binary.chmod(0o755)
    return bundle


def run_install(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PREFIX=str(tmp_path / "prefix"), XDG_CONFIG_HOME=str(tmp_path / "config"),
               HOME=str(tmp_path))
    return subprocess.run(["sh", str(LINUX / "install.sh"), *args], env=env, capture_output=True, text=True,
                          timeout=60)


def test_install_script_puts_entries_icons_and_link_under_the_prefix(tmp_path, fake_bundle):
    result = run_install(tmp_path, "--bundle", str(fake_bundle))
    assert result.returncode == 0, result.stderr
    prefix = tmp_path / "prefix"
    assert (prefix / "bin" / "cakep2p").resolve() == (fake_bundle / "cakep2p").resolve()
    for size in PNG_SIZES:
        assert (prefix / f"share/icons/hicolor/{size}x{size}/apps/cakep2p.png").is_file()
    assert (prefix / "share/icons/hicolor/scalable/apps/cakep2p.svg").is_file()
    for name in DESKTOP_FILES:
        exec_line = re.search(r"^Exec=(.*)$", (prefix / "share/applications" / name).read_text(), re.MULTILINE)
        assert exec_line.group(1).startswith(str(prefix / "bin" / "cakep2p"))


def test_installed_desktop_entries_still_validate(tmp_path, fake_bundle):
    validator = shutil.which("desktop-file-validate")
    if validator is None:
        pytest.skip("desktop-file-validate not installed (apt-get install desktop-file-utils)")
    assert run_install(tmp_path, "--bundle", str(fake_bundle)).returncode == 0
    for name in DESKTOP_FILES:
        result = subprocess.run([validator, str(tmp_path / "prefix/share/applications" / name)],
                                capture_output=True, text=True)
        assert result.returncode == 0 and not result.stdout.strip(), result.stdout


def test_install_script_writes_the_user_unit_with_the_installed_binary(tmp_path, fake_bundle):
    assert run_install(tmp_path, "--bundle", str(fake_bundle), "--service").returncode == 0
    unit = (tmp_path / "config/systemd/user/cakep2p-serve.service").read_text()
    assert f"ExecStart={tmp_path / 'prefix/bin/cakep2p'} --serve" in unit


def test_install_script_uninstall_removes_what_it_installed(tmp_path, fake_bundle):
    assert run_install(tmp_path, "--bundle", str(fake_bundle), "--service").returncode == 0
    assert run_install(tmp_path, "--uninstall").returncode == 0
    leftovers = [path for path in tmp_path.joinpath("prefix").rglob("*") if path.is_file() or path.is_symlink()]
    leftovers += list(tmp_path.joinpath("config").rglob("*.service"))
    assert [path for path in leftovers if "cakep2p" in path.name] == []
    assert (fake_bundle / "cakep2p").is_file()


def test_install_script_refuses_a_missing_bundle_with_the_build_command(tmp_path):
    result = run_install(tmp_path, "--bundle", str(tmp_path / "nowhere"))
    assert result.returncode == 2 and "packaging/build.py" in result.stderr


# -- the real build (slow, opt-in) ------------------------------------------------------------------------


def load_build_module():
    spec = importlib.util.spec_from_file_location("cakep2p_packaging_build", PACKAGING / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def built_app() -> Path:
    """The built app's command-line binary; builds it unless CAKEP2P_BUILD_TEST=reuse finds one in dist/."""
    mode = os.environ.get("CAKEP2P_BUILD_TEST", "")
    if mode not in ("1", "reuse"):
        pytest.skip("the full PyInstaller build is slow: run with CAKEP2P_BUILD_TEST=1 (or =reuse for dist/)")
    build = load_build_module()
    executable = build.executable_path(REPO / "dist")
    if mode == "1" or not executable.is_file():
        pytest.importorskip("PyInstaller", reason="pip install pyinstaller")
        subprocess.run([sys.executable, str(PACKAGING / "build.py"), "--no-check"], cwd=REPO, check=True,
                       timeout=3600)
    return executable


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """No Python on PATH, no PYTHONPATH, no venv: only what a double-click would have."""
    return {"PATH": "/usr/bin:/bin", "HOME": str(home), "CAKEP2P_HOME": str(home / "cakep2p"),
            "OMP_NUM_THREADS": "1", **extra}


@pytest.mark.slow
def test_built_app_prints_its_version_without_python(built_app, tmp_path):
    result = subprocess.run([str(built_app), "--version"], env=clean_env(tmp_path), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"cakep2p {cakep2p.__version__}"


@pytest.mark.slow
def test_built_app_keeps_user_data_in_the_platformdirs_locations(built_app, tmp_path):
    if not sys.platform.startswith("linux"):
        pytest.skip("checks the Linux (XDG) data location")
    env = clean_env(tmp_path)
    del env["CAKEP2P_HOME"]
    result = subprocess.run([str(built_app), "peers", "--wait", "0.5", "--interface", "127.0.0.1"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / ".config" / "cakep2p" / "cluster-code").is_file()
    assert not list(built_app.parent.rglob("cluster-code")), "user data must never land inside the app folder"


@pytest.mark.slow
def test_built_app_serves_a_forward_found_over_mdns(built_app, tmp_path, stories_dir):
    if not sys.platform.startswith("linux"):
        pytest.skip("uses `ip link` to enable multicast on loopback (Linux)")
    import torch

    from cakep2p import security
    from cakep2p.engine.checkpoint import Checkpoint
    from cakep2p.engine.loading import load_part
    from cakep2p.engine.tokenizer import Tokenizer
    from cakep2p.mesh import StageClient, part_ref
    from cakep2p.mesh.transfer import PartOffer
    from cakep2p.mesh.transfer import load_part as load_part_over
    from cakep2p.planner import LayerRange

    loopback_multicast_on()
    code = security.new_code()
    name = f"bundle-{uuid.uuid4().hex[:6]}"
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        server = ChildProcess([str(built_app), "--serve", "--interface", "127.0.0.1", "--name", name],
                              env=clean_env(tmp_path / "server", CAKEP2P_CLUSTER_CODE=code), role="the built app",
                              stdout=log, stderr=subprocess.STDOUT)
    client = None
    try:
        def seen() -> dict | None:
            if not server.alive():
                pytest.fail(f"the built app exited: {log_path.read_text(errors='replace')[-2000:]}")
            listing = run_cakep2p("peers", "--json", "--interface", "127.0.0.1", "--wait", "3", "--cluster", code,
                                  env=child_env(tmp_path / "browser"))
            return next((entry for entry in json.loads(listing.stdout or "[]") if entry["name"] == name), None)

        peer = wait_until(seen, 120, message="the bundled node over mDNS on 127.0.0.1")
        assert peer["status"] == "ok" and peer["serving"]

        torch.set_num_threads(1)
        client = StageClient(peer["address"], peer["port"], security.derive_keys(code), timeout_s=120)
        client.ping()
        args = Checkpoint.open(stories_dir).args
        whole = LayerRange(0, args.num_layers, True, True)
        offered = PartOffer.of(Checkpoint.open(stories_dir), whole, "f32")
        assert load_part_over(client, offered, max_seq_len=32).status == "ready"
        prompt = torch.tensor(Tokenizer.from_checkpoint(Checkpoint.open(stories_dir)).encode("Once upon a time"), dtype=torch.int64)
        remote = client.forward("packaging-test", offered.ref, 0, 0, prompt)
        local_part = load_part(Checkpoint.open(stories_dir), whole, device="cpu")
        local = local_part.forward(prompt, 0, local_part.new_cache(32))
        # a head stage returns the logits of the last position only
        assert torch.allclose(remote.float().reshape(-1), local[-1].float(), atol=1e-4)
    finally:
        if client is not None:
            client.close()
        server.stop(signal.SIGINT)
        try:
            server.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        server.kill()

