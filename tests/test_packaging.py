"""pyproject.toml's dependencies against constraints/dev-cpu.txt, the lock that `make setup` installs with.

A cheap check (both files parsed with ``packaging``, nothing installed): every requirement of the dev environment
(the core, the ``dev`` extra and the extras it names, recursively) must be satisfied by the version the
constraints file pins, so that a change to pyproject.toml without `make lock` fails here instead of drifting.
"""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints" / "dev-cpu.txt"
PROJECT = "refine-core"


def _pins() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name), f"{line!r} is not a plain name==version pin"
        assert canonicalize_name(name) not in pins, f"{name} is pinned twice"
        pins[canonicalize_name(name)] = Version(version)
    return pins


def _dev_requirements() -> list[Requirement]:
    """The requirements `pip install -e .[dev]` asks for: the core plus the extras, refine-core[...] expanded."""
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs: list[Requirement] = []
    seen: set[str] = set()

    def add(extra: str | None) -> None:
        if extra in seen:
            return
        seen.add(extra)  # type: ignore[arg-type]
        for text in optional["dependencies"] if extra is None else optional["optional-dependencies"][extra]:
            req = Requirement(text)
            if canonicalize_name(req.name) == PROJECT:
                for sub in sorted(req.extras):
                    add(sub)
            else:
                reqs.append(req)

    add(None)
    add("dev")
    return reqs


def test_constraints_satisfy_the_dev_requirements() -> None:
    pins = _pins()
    env = default_environment()
    stale = []
    for req in _dev_requirements():
        if req.marker is not None and not req.marker.evaluate({**env, "extra": ""}):
            continue
        pinned = pins.get(canonicalize_name(req.name))
        if pinned is None or not req.specifier.contains(pinned, prereleases=True):
            stale.append(f"{req} (constraints: {pinned or 'nothing'})")
    assert not stale, f"constraints/dev-cpu.txt is stale, run `make lock`: {stale}"


def test_constraints_keep_the_cpu_torch_and_not_the_project() -> None:
    pins = _pins()
    assert canonicalize_name(PROJECT) not in pins, "the project itself is installed editable, never from the lock"
    makefile = (ROOT / "Makefile").read_text()
    spec = re.search(r"^TORCH_SPEC \?= torch==(\S+)$", makefile, re.M)
    assert spec, "the Makefile installs torch first, from TORCH_SPEC"
    assert pins["torch"] == Version(f"{spec.group(1)}+cpu"), "the lock pins the CPU build of the Makefile's torch"
    assert not [n for n in pins if n.startswith(("nvidia-", "triton", "cuda-"))], "a CUDA package in the CPU lock"
    # setup installs torch before the project and both through the lock
    setup = makefile[makefile.index("$(VENV)/.installed:"):makefile.index("\nsetup:")]
    torch_line = setup.index('"$(TORCH_SPEC)"')
    assert "-c $(CONSTRAINTS)" in setup[setup.rindex("\n", 0, torch_line):torch_line]
    assert torch_line < setup.index('-c $(CONSTRAINTS) -e ".[dev]"')
    assert "$(CONSTRAINTS)" in setup.splitlines()[0], "a new lock re-runs setup"
