"""Build the cakep2p app for this platform with PyInstaller (one folder under dist/), then smoke-test and size it.

    python packaging/build.py            # dist/cakep2p/ (Linux, Windows) or dist/cakep2p.app (macOS)
    python packaging/build.py --clean    # drop PyInstaller's cache in build/ first

Torch dominates the bundle. The app bundles whatever torch the building Python has; this script refuses a CUDA
build of torch unless --allow-cuda is given, because the CPU build is the default download (see README.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

PACKAGING_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGING_DIR.parent
SPEC_PATH = PACKAGING_DIR / "cakep2p.spec"
APP_NAME = "cakep2p"
CPU_TORCH_HINT = ("pip install --force-reinstall torch --index-url https://download.pytorch.org/whl/cpu  "
                  "(then rerun this script), or pass --allow-cuda to bundle the CUDA build (several GB)")


def bundle_path(dist_dir: Path) -> Path:
    """The folder the user copies: dist/cakep2p.app on macOS, dist/cakep2p elsewhere."""
    return dist_dir / (f"{APP_NAME}.app" if sys.platform == "darwin" else APP_NAME)


def executable_path(dist_dir: Path) -> Path:
    """The binary that runs the command line (`--version`, `--serve`, subcommands)."""
    if sys.platform == "darwin":
        return dist_dir / f"{APP_NAME}.app" / "Contents" / "MacOS" / APP_NAME
    if sys.platform == "win32":
        return dist_dir / APP_NAME / f"{APP_NAME}-cli.exe"
    return dist_dir / APP_NAME / APP_NAME


def folder_size(path: Path) -> int:
    """Bytes of all regular files under path (symbolic links not followed, as `du` counts them)."""
    return sum(entry.lstat().st_size for entry in path.rglob("*") if entry.is_file() and not entry.is_symlink())


def torch_build() -> str:
    """'cpu', or 'cuda X.Y' / 'rocm X.Y' for the torch the build would bundle."""
    import torch

    if torch.version.cuda:
        return f"cuda {torch.version.cuda}"
    if getattr(torch.version, "hip", None):
        return f"rocm {torch.version.hip}"
    return "cpu"


def clean_environment() -> dict[str, str]:
    """An environment with no trace of a Python install, like a double-click on a fresh machine."""
    env = {"PATH": os.defpath if sys.platform != "win32" else os.environ.get("SystemRoot", r"C:\Windows")}
    for name in ("HOME", "USERPROFILE", "SystemRoot", "TEMP", "TMP", "LANG"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def check_version(executable: Path) -> str:
    """Run `<app> --version` in a clean environment; returns its output or raises SystemExit."""
    result = subprocess.run([str(executable), "--version"], env=clean_environment(), capture_output=True,
                            text=True, timeout=300)
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0 or not output.startswith(APP_NAME):
        raise SystemExit(f"build: the built app failed `--version` (exit {result.returncode}):\n{output}")
    return output


def run_pyinstaller(dist_dir: Path, work_dir: Path, clean: bool) -> None:
    command = [sys.executable, "-m", "PyInstaller", "--noconfirm", "--log-level", "WARN",
               "--distpath", str(dist_dir), "--workpath", str(work_dir), str(SPEC_PATH)]
    if clean:
        command.insert(3, "--clean")
    print("build:", " ".join(command), flush=True)
    subprocess.run(command, cwd=REPO_ROOT, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dist", type=Path, default=REPO_ROOT / "dist", help="output folder (default: dist/)")
    parser.add_argument("--work", type=Path, default=REPO_ROOT / "build", help="PyInstaller work folder (build/)")
    parser.add_argument("--clean", action="store_true", help="clear PyInstaller's cache before building")
    parser.add_argument("--allow-cuda", action="store_true", help="bundle a CUDA/ROCm torch build (multi-GB)")
    parser.add_argument("--no-check", action="store_true", help="skip running `--version` on the result")
    args = parser.parse_args(argv)

    if importlib.util.find_spec("PyInstaller") is None:
        print("build: PyInstaller is missing: pip install pyinstaller  (or pip install -e '.[packaging]')",
              file=sys.stderr)
        return 2
    build = torch_build()
    if build != "cpu" and not args.allow_cuda:
        print(f"build: this Python has torch with {build}; the default app bundles the CPU build:\n  {CPU_TORCH_HINT}",
              file=sys.stderr)
        return 2
    print(f"build: bundling torch ({build}) for {sys.platform}", flush=True)

    started = time.monotonic()
    run_pyinstaller(args.dist.resolve(), args.work.resolve(), args.clean)
    bundle = bundle_path(args.dist.resolve())
    size = folder_size(bundle)
    print(f"build: {bundle} built in {time.monotonic() - started:.0f} s, {size / 2**20:.0f} MiB "
          f"({size / 10**6:.0f} MB) with torch {build}")
    if not args.no_check:
        executable = executable_path(args.dist.resolve())
        print(f"build: {executable} --version -> {check_version(executable)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
