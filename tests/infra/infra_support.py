"""Fixtures for the deployment tests: repo paths, the parsed Dockerfile, the k8s manifests.

The Dockerfile parser lives here because several test files cross-check against the image
(its entrypoint, user id, cache path, Ray version). Test modules import the fixtures by name;
this is not a conftest.py, so that `from conftest import ...` elsewhere keeps finding
tests/conftest.py.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
INFRA = REPO / "infra"
IMAGE = "ghcr.io/hymba-batch/hymba-batch:latest"


@dataclass
class Instruction:
    cmd: str   # upper case: FROM, RUN, COPY, ...
    args: str  # the rest of the logical line, continuations joined
    line: int  # 1-based line where the instruction starts


@dataclass
class Stage:
    base: str                # FROM image, global ARGs substituted
    name: str | None         # AS name
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, cmd: str) -> list[Instruction]:
        return [i for i in self.instructions if i.cmd == cmd]

    def arg_defaults(self) -> dict[str, str]:
        out = {}
        for ins in self.all("ARG"):
            key, _, default = ins.args.partition("=")
            out[key.strip()] = default.strip().strip('"')
        return out

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for ins in self.all("ENV"):
            words = shlex.split(ins.args)
            if words and "=" not in words[0]:  # legacy form: ENV key value
                out[words[0]] = " ".join(words[1:])
                continue
            for w in words:
                key, _, value = w.partition("=")
                out[key] = value
        return out


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


def logical_lines(text: str) -> list[tuple[int, str]]:
    """Join backslash continuations; drop blank and comment lines (also inside continuations)."""
    out: list[tuple[int, str]] = []
    buf: list[str] = []
    start = 0
    for n, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        if not buf:
            start = n
        if stripped.endswith("\\"):
            buf.append(stripped[:-1].strip())
            continue
        buf.append(stripped)
        out.append((start, " ".join(p for p in buf if p)))
        buf = []
    if buf:
        out.append((start, " ".join(p for p in buf if p)))
    return out


def _substitute(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), value)


def parse_dockerfile(text: str) -> Dockerfile:
    """Split a Dockerfile into stages at each FROM; ARGs before the first FROM are global."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line, logical in logical_lines(text):
        cmd, _, args = logical.partition(" ")
        cmd, args = cmd.upper(), args.strip()
        if cmd == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=_substitute(words[0], global_args), name=name))
        elif not stages:
            if cmd != "ARG":
                raise ValueError(f"line {line}: {cmd} before the first FROM")
            key, _, default = args.partition("=")
            global_args[key.strip()] = default.strip().strip('"')
        else:
            stages[-1].instructions.append(Instruction(cmd, args, line))
    return Dockerfile(global_args, stages)


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    assert SHARED.is_dir(), (
        f"{SHARED} is missing: the tests need the shared folder beside the repository "
        "(../shared, with schemas/kuberay/ inside)")
    return SHARED


@pytest.fixture(scope="session")
def dockerfile_parser():
    """parse_dockerfile, for tests that parse modified copies."""
    return parse_dockerfile


@pytest.fixture(scope="session")
def dockerfile() -> Dockerfile:
    return parse_dockerfile((INFRA / "Dockerfile").read_text())


@pytest.fixture(scope="session")
def image_uid(dockerfile) -> int:
    """The uid of the image's user, from its useradd --uid (ARG default substituted)."""
    final = dockerfile.stages[-1]
    args = final.arg_defaults()
    for ins in final.all("RUN"):
        m = re.search(r"useradd\b.*?--uid\s+\"?([^\s\"]+)\"?", ins.args)
        if m:
            return int(_substitute(m.group(1), args))
    raise AssertionError("the final stage creates no user with useradd --uid")


@pytest.fixture(scope="session")
def manifests() -> dict[tuple[str, str], dict]:
    """Every object in infra/k8s/*.yaml, by (kind, name)."""
    out = {}
    for path in sorted((INFRA / "k8s").glob("*.yaml")):
        for doc in load_docs(path):
            key = (doc.get("kind"), (doc.get("metadata") or {}).get("name"))
            assert key not in out, f"{path.name}: {key} defined twice"
            out[key] = doc
    return out


@pytest.fixture(scope="session")
def ray_cluster() -> dict:
    return yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
