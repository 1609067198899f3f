"""Write the pinned, hash-checked requirement files that the images install.

The images never resolve dependencies at build time: they install exactly these files with
``pip install --no-deps --require-hashes``, so a rebuild months later gets the same packages, and a file that
changed on an index fails the build instead of slipping in. This script resolves the runtime dependencies of
``refine-core[kfp]`` (and ``[gpu]`` for the GPU image) for each image's Python and glibc with ``uv pip compile``
(a cross-platform resolver: it reads PyPI's metadata for Python 3.12 / Ubuntu 24.04 from a Debian 3.11 host), and
writes two files per image:

- ``images/<target>/requirements-torch.txt``: torch and everything it pulls in (the heavy, rarely changing layer);
- ``images/<target>/requirements.txt``: the rest.

Run it after changing the dependencies in ``pyproject.toml`` (``tests/images/test_dockerfiles.py`` fails until
then); it needs ``uv`` (``pip install uv``) and, for the CPU image, the torch 2.13.0+cpu cp311 wheel::

    .venv/bin/python images/lock.py                 # both images
    .venv/bin/python images/lock.py --target gpu

The host's uv/pip configuration is ignored (``--no-config``), so the result is what PyPI serves. Versions already
in the image's lock files are kept where they still fit (uv's preferences; only what the change needs moves);
``--upgrade`` resolves everything afresh at the newest versions.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCH_VERSION = "2.13.0"
DEFAULT_WHEEL_DIR = "/opt/wheels"  # where these machines keep torch-2.13.0+cpu-cp311-...whl


@dataclass(frozen=True)
class Target:
    """One image's interpreter, platform and the project extras it installs."""

    name: str
    python: str
    platform: str  # uv's --python-platform: the image's glibc
    extras: tuple[str, ...]
    torch: str  # the torch requirement (the CPU build carries a local version label)
    note: str


TARGETS = {
    "cpu": Target("cpu", "3.11", "x86_64-manylinux_2_36", ("kfp", "datasets"), f"torch=={TORCH_VERSION}+cpu",
                  "Debian bookworm (python:3.11-slim-bookworm or the local base), CPython 3.11, x86_64"),
    "gpu": Target("gpu", "3.12", "x86_64-manylinux_2_39", ("kfp", "gpu", "datasets"), f"torch=={TORCH_VERSION}",
                  "Ubuntu 24.04 (nvidia/cuda base), CPython 3.12, x86_64, torch's CUDA 13 build from PyPI"),
}


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _blocks(text: str) -> dict[str, str]:
    """Split uv's output into ``{canonical name: 'name==version \\ --hash ... # via ...'}``."""
    blocks: dict[str, str] = {}
    current: list[str] = []
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if not line[0].isspace():
            current = [line]
            blocks[_canon(line.split("==")[0])] = current  # type: ignore[assignment]
        else:
            current.append(line)
    return {name: "\n".join(lines) for name, lines in blocks.items()}  # type: ignore[arg-type]


def compile_lock(uv: str, target: Target, inputs: list[str], wheel_dir: str | None, upgrade: bool = False
                 ) -> dict[str, str]:
    """Run ``uv pip compile`` for ``target`` and return its blocks by package name.

    Unless ``upgrade``, the output file starts as the image's current locks, which uv takes as preferences: pins
    that still satisfy the inputs stay as they are.
    """
    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text(target.torch + "\n")
        out = Path(tmp) / "out.txt"
        current = [ROOT / "images" / target.name / f for f in ("requirements-torch.txt", "requirements.txt")]
        if not upgrade:
            out.write_text("".join(f.read_text() for f in current if f.is_file()))
        cmd = [uv, "pip", "compile", *inputs, "-c", str(constraints), "--python-version", target.python,
               "--python-platform", target.platform, "--generate-hashes", "--no-header", "--annotation-style",
               "line", "--no-config", "--quiet", "-o", str(out)]
        for extra in target.extras if "pyproject.toml" in inputs else ():
            cmd += ["--extra", extra]
        if wheel_dir:
            cmd += ["--find-links", wheel_dir]
        subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "UV_NO_CONFIG": "1"})
        text = out.read_text().replace(f"-c {constraints}", "images/lock.py")
    return _blocks(text)


def lock(uv: str, target: Target, wheel_dir: str | None, upgrade: bool = False) -> None:
    """Resolve and write ``images/<target>/requirements-torch.txt`` and ``requirements.txt``."""
    if target.name == "cpu":
        if not wheel_dir or not list(Path(wheel_dir).glob(f"torch-{TORCH_VERSION}+cpu-cp311-*.whl")):
            raise SystemExit(f"the CPU lock needs torch-{TORCH_VERSION}+cpu-cp311-*.whl: pass --wheel-dir DIR")
    else:
        wheel_dir = None  # the GPU image takes torch's CUDA build from PyPI
    everything = compile_lock(uv, target, ["pyproject.toml"], wheel_dir, upgrade)
    with tempfile.NamedTemporaryFile("w", suffix=".in", delete=False) as f:
        f.write(target.torch + "\n")
    try:
        torch_names = set(compile_lock(uv, target, [f.name], wheel_dir, upgrade))
    finally:
        os.unlink(f.name)
    if not torch_names <= everything.keys():
        raise SystemExit(f"{sorted(torch_names - everything.keys())} missing from the full resolution")
    header = [
        f"# Generated by images/lock.py --target {target.name} on {date.today().isoformat()}: do not edit by hand.",
        f"# For {target.note}.",
        "# Installed with pip install --no-deps --require-hashes; regenerate after changing pyproject.toml.",
    ]
    out = ROOT / "images" / target.name
    for path, names, what in [
        (out / "requirements-torch.txt", sorted(torch_names), "torch and its dependencies (the heavy layer)"),
        (out / "requirements.txt", sorted(everything.keys() - torch_names),
         f"refine-core[{','.join(target.extras)}] without torch and its dependencies"),
    ]:
        path.write_text("\n".join([*header, f"# {what}.", *(everything[n] for n in names)]) + "\n")
        sys.stdout.write(f"wrote {path.relative_to(ROOT)} ({len(names)} packages)\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=[*TARGETS, "all"], default="all")
    parser.add_argument("--wheel-dir", default=DEFAULT_WHEEL_DIR,
                        help="folder holding torch-2.13.0+cpu-cp311-*.whl (default: %(default)s)")
    parser.add_argument("--uv", default=shutil.which("uv"), help="the uv binary (default: uv on PATH)")
    parser.add_argument("--upgrade", action="store_true",
                        help="resolve every package afresh (default: keep the current locks' versions where they fit)")
    args = parser.parse_args()
    if not args.uv:
        raise SystemExit("uv not found: pip install uv (or pass --uv PATH)")
    for name in TARGETS if args.target == "all" else [args.target]:
        lock(args.uv, TARGETS[name], args.wheel_dir, args.upgrade)


if __name__ == "__main__":
    main()
