"""infra/Dockerfile: parsed into stages and checked (no Docker daemon needed), plus .dockerignore."""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from infra_support import dockerfile, dockerfile_parser, image_uid  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"

KERNELS = {"causal-conv1d": "CAUSAL_CONV1D_VERSION", "mamba-ssm": "MAMBA_SSM_VERSION",
           "flash-attn": "FLASH_ATTN_VERSION"}


def _cuda_version(base: str) -> str | None:
    m = re.fullmatch(r"nvidia/cuda:(\d+\.\d+(?:\.\d+)?)-(?:cudnn\d*-)?(devel|runtime)-ubuntu\d\d\.\d\d", base)
    return m.group(1) if m else None


def dockerfile_problems(df, pyproject: dict) -> list[str]:
    """What keeps this Dockerfile from being the project's GPU image (empty when fine)."""
    problems: list[str] = []
    if len(df.stages) < 2:
        return [f"{len(df.stages)} stage(s): expected a builder stage and a final stage"]
    final = df.stages[-1]
    runs = " ".join(i.args for i in final.all("RUN"))

    if not re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn\d*-)?runtime-ubuntu[\d.]+", final.base):
        problems.append(f"final stage FROM {final.base}: expected a CUDA runtime image")

    copies = [i.args for i in final.all("COPY") if "--from=" in i.args]
    if not copies:
        problems.append("final stage copies nothing from the builder")
        return problems
    builder_name = re.search(r"--from=(\S+)", copies[0]).group(1)
    builders = [s for s in df.stages[:-1] if s.name == builder_name]
    if not builders:
        problems.append(f"COPY --from={builder_name}: no such stage")
        return problems
    builder = builders[0]
    if not re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn\d*-)?devel-ubuntu[\d.]+", builder.base):
        problems.append(f"builder stage FROM {builder.base}: expected a CUDA devel image (nvcc)")
    if _cuda_version(builder.base) != _cuda_version(final.base):
        problems.append(f"CUDA differs between builder ({builder.base}) and final ({final.base})")

    # The kernels are built as wheels in the builder, at pinned versions the [cuda] extra accepts.
    wheel_cmds = [c.strip() for i in builder.all("RUN") for c in i.args.split("&&") if "pip wheel" in c]
    wheel_dirs = {m.group(1) for c in wheel_cmds for m in [re.search(r"(?:-w|--wheel-dir)\s+(\S+)", c)] if m}
    kernel_run = next((c for c in wheel_cmds
                       if all(re.search(rf"{k}==\$\{{?{a}\b", c) for k, a in KERNELS.items())), None)
    if kernel_run is None:
        problems.append("builder stage does not build causal-conv1d, mamba-ssm and flash-attn wheels")
    if "--no-build-isolation" not in (kernel_run or ""):
        problems.append("kernel wheels must build against the stage's CUDA torch (--no-build-isolation)")
    pinned = builder.arg_defaults()
    extra = {Requirement(r).name: Requirement(r) for r in pyproject["project"]["optional-dependencies"]["cuda"]}
    for pkg, arg in KERNELS.items():
        if arg not in pinned:
            problems.append(f"builder stage has no ARG {arg} pinning {pkg}")
        elif pkg in extra and Version(pinned[arg]) not in extra[pkg].specifier:
            problems.append(f"{pkg}=={pinned[arg]} does not satisfy the [cuda] extra's {extra[pkg]}")
    if not any(any(d.rstrip("/") in c for d in wheel_dirs) for c in copies):
        problems.append(f"final stage does not copy the wheel directory {sorted(wheel_dirs)} from the builder")

    # torch: the same CUDA build in both stages, matching the base image's CUDA major version.
    for stage in (builder, final):
        args = stage.arg_defaults()
        torch_runs = [i.args for i in stage.all("RUN") if re.search(r"torch==\$\{?TORCH_VERSION", i.args)]
        if not torch_runs or "--index-url" not in torch_runs[0]:
            problems.append(f"stage {stage.name}: torch is not installed from a CUDA wheel index")
        index = args.get("TORCH_INDEX_URL", "")
        major = (_cuda_version(stage.base) or "0").split(".")[0]
        if not re.search(rf"/cu{major}\d$", index):
            problems.append(f"stage {stage.name}: TORCH_INDEX_URL {index!r} is not a CUDA {major} index")
    if builder.arg_defaults().get("TORCH_VERSION") != final.arg_defaults().get("TORCH_VERSION"):
        problems.append("builder and final stages install different torch versions")

    # The project, with its [cuda] extra, from the builder's wheel; Ray pinned.
    if not re.search(r"pip install .*hymba_batch-\*\.whl\)?\[cuda\]", runs):
        problems.append("final stage does not install the project's wheel with [cuda]")
    if not re.search(r"ray\[default\]==\$\{?RAY_VERSION", runs):
        problems.append("final stage does not pin ray[default]==${RAY_VERSION}")
    if not re.search(r"python3(\.1[1-9])?\b", runs) or "ubuntu22" in final.base and "python3.1" not in runs:
        problems.append("final stage installs no Python >= 3.11")
    for tool in ("openssh-client", "rsync", "wget"):  # Ray launcher (SSH, rsync), KubeRay probes
        if tool not in runs:
            problems.append(f"final stage does not install {tool}")

    users = final.all("USER")
    if not users or users[-1].args.split(":")[0] in ("root", "0"):
        problems.append("the image must end as a non-root USER")
    env = final.env()
    cache = env.get("HYMBA_CACHE")
    if not cache:
        problems.append("final stage sets no HYMBA_CACHE")
    else:
        volumes = " ".join(i.args for i in final.all("VOLUME"))
        if cache not in volumes:
            problems.append(f"HYMBA_CACHE {cache} is not a VOLUME")
        if users and not re.search(rf"chown\s+{re.escape(users[-1].args)}\S*\s+{re.escape(cache)}", runs):
            problems.append(f"{cache} is not owned by the image's user")
    if "HOME" not in env:
        problems.append("no ENV HOME (the Ray cluster launcher reads it from the image config)")

    entry = final.all("ENTRYPOINT")
    try:
        entrypoint = json.loads(entry[-1].args) if entry else None
    except json.JSONDecodeError:
        entrypoint = entry[-1].args
    if entrypoint != ["hymba-batch"]:
        problems.append(f"ENTRYPOINT {entrypoint!r}: expected the exec form [\"hymba-batch\"]")
    if "hymba-batch" not in pyproject["project"].get("scripts", {}):
        problems.append("pyproject.toml declares no hymba-batch console script")
    return problems


@pytest.fixture(scope="module")
def text() -> str:
    return (INFRA / "Dockerfile").read_text()


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_dockerfile_is_the_gpu_image(dockerfile, pyproject):
    assert dockerfile_problems(dockerfile, pyproject) == []


def test_stages(dockerfile):
    assert [s.name for s in dockerfile.stages] == ["builder", "runtime"]
    assert dockerfile.stages[0].base.startswith("nvidia/cuda:") and "-devel-" in dockerfile.stages[0].base
    assert "-runtime-" in dockerfile.stages[-1].base
    assert dockerfile.stages[-1].env()["HYMBA_CACHE"] == "/var/cache/hymba"


def test_user_is_uid_1000(image_uid, dockerfile):
    assert image_uid == 1000  # the k8s manifests' runAsUser and ray_cluster.yaml's chown
    assert dockerfile.stages[-1].all("USER")[-1].args == "hymba"


BROKEN = {
    "single stage": lambda t: t[t.index("FROM nvidia/cuda:${CUDA_VERSION}-runtime"):].replace(
        "COPY --from=builder /wheels /tmp/wheels", ""),
    "final on devel": lambda t: t.replace("-runtime-${UBUNTU} AS runtime", "-devel-${UBUNTU} AS runtime"),
    "runs as root": lambda t: t.replace("USER hymba", "USER root"),
    "no user": lambda t: t.replace("USER hymba\n", ""),
    "shell entrypoint": lambda t: t.replace('ENTRYPOINT ["hymba-batch"]', "ENTRYPOINT hymba-batch"),
    "other entrypoint": lambda t: t.replace('ENTRYPOINT ["hymba-batch"]', 'ENTRYPOINT ["python"]'),
    "no wheels copied": lambda t: t.replace("COPY --from=builder /wheels /tmp/wheels", "COPY . /tmp/wheels"),
    "no flash-attn": lambda t: t.replace('"flash-attn==${FLASH_ATTN_VERSION}"', ""),
    "project without cuda extra": lambda t: t.replace(".whl)[cuda]", ".whl)"),
    "cpu torch": lambda t: t.replace("whl/cu130", "whl/cpu"),
    "kernel below extra": lambda t: t.replace("ARG MAMBA_SSM_VERSION=2.3.2.post1", "ARG MAMBA_SSM_VERSION=1.2.0"),
    "no cache volume": lambda t: t.replace('VOLUME ["/var/cache/hymba"]', ""),
    "no rsync": lambda t: t.replace("openssh-client rsync wget", "openssh-client wget"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_dockerfile_is_caught(name, text, pyproject, dockerfile_parser):
    broken = BROKEN[name](text)
    assert broken != text, f"mutation {name!r} no longer applies to infra/Dockerfile"
    assert dockerfile_problems(dockerfile_parser(broken), pyproject), name


def test_parser_joins_continuations_and_skips_comments(dockerfile_parser):
    df = dockerfile_parser("ARG V=1\nFROM a:${V} AS x\n# c\nRUN echo a \\\n  # inner comment\n  && echo b\n"
                          "FROM b\nENV A=1 B=\"two words\"\nENV C 3\n")
    assert [s.base for s in df.stages] == ["a:1", "b"]
    assert df.stages[0].all("RUN")[0].args == "echo a && echo b"
    assert df.stages[1].env() == {"A": "1", "B": "two words", "C": "3"}


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, closely enough: a pattern matches the path or one of its parent folders
    from the context root; "**/" matches at any depth."""
    parts = path.split("/")
    for pat in (p.rstrip("/") for p in patterns):
        if pat.startswith("**/"):
            if any(fnmatch.fnmatchcase(part, pat[3:]) for part in parts):
                return True
        elif any(fnmatch.fnmatchcase("/".join(parts[:i]), pat) for i in range(1, len(parts) + 1)):
            return True
    return False


def test_dockerignore():
    patterns = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    for junk in (".venv/bin/python", ".git/HEAD", "model/__pycache__/x.py", ".whl/ray.whl",
                 "jobs/bench/results/a.json", "tests/infra/test_dockerfile.py"):
        assert _ignored(junk, patterns), f"{junk} would be sent to the Docker build"
    for needed in ("pyproject.toml", "model/__init__.py", "pipeline/__init__.py",
                   "workers/__init__.py", "jobs/__init__.py", "model/assets/tokenizer/tokenizer.json"):
        assert not _ignored(needed, patterns), f"{needed} is excluded from the Docker build"
    assert not _ignored("x/.venv", [".venv"]) and _ignored("x/y/__pycache__/z", ["**/__pycache__"])
