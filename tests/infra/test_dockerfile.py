"""infra/Dockerfile: parsed into stages and checked (no Docker daemon needed), plus .dockerignore."""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from infra_support import dockerfile, dockerfile_parser, image_uid  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"

# Third-party CUDA kernel packages the engine never calls (its own Triton kernels do that work):
# neither the image nor the [cuda] extra may bring them back (compiling them takes half an hour
# or more).
THIRD_PARTY_KERNELS = ("causal-conv1d", "mamba-ssm", "flash-attn")
_THIRD_PARTY_RE = re.compile(r"\b(causal[-_]conv1d|mamba[-_]ssm|flash[-_]attn)\b", re.IGNORECASE)


def _cuda_version(base: str) -> str | None:
    m = re.fullmatch(r"nvidia/cuda:(\d+\.\d+(?:\.\d+)?)-(?:cudnn\d*-)?(devel|runtime)-ubuntu\d\d\.\d\d", base)
    return m.group(1) if m else None


def dockerfile_problems(df, pyproject: dict) -> list[str]:
    """What keeps this Dockerfile from being the project's GPU image (empty when fine)."""
    problems: list[str] = []
    if len(df.stages) < 2:
        return [f"{len(df.stages)} stage(s): expected a builder stage (the project's wheel) and a final stage"]
    final = df.stages[-1]
    runs = " ".join(i.args for i in final.all("RUN"))

    if not re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn\d*-)?runtime-ubuntu[\d.]+", final.base):
        problems.append(f"final stage FROM {final.base}: expected a CUDA runtime image")
    # Nothing is compiled with nvcc any more: a devel image (several GB) in any stage is a sign
    # that a CUDA extension build came back.
    for stage in df.stages:
        if "-devel-" in stage.base:
            problems.append(f"stage {stage.name} FROM {stage.base}: no stage needs a CUDA devel image")
        for ins in stage.all("RUN"):
            if m := _THIRD_PARTY_RE.search(ins.args):
                problems.append(f"stage {stage.name} (line {ins.line}) builds or installs {m.group(1)}: "
                                "the engine uses its own Triton kernels")
    extra = [Requirement(r).name for r in pyproject["project"]["optional-dependencies"].get("cuda", [])]
    if "triton" not in extra:
        problems.append("the [cuda] extra does not list triton")
    for pkg in sorted(set(extra) & set(THIRD_PARTY_KERNELS)):
        problems.append(f"the [cuda] extra lists {pkg}: the image would install (and compile) it")

    # The builder turns the source tree into the project's wheel; the final stage copies it.
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
    wheel_cmds = [c.strip() for i in builder.all("RUN") for c in i.args.split("&&") if "pip wheel" in c]
    wheel_dirs = {m.group(1) for c in wheel_cmds for m in [re.search(r"(?:-w|--wheel-dir)\s+(\S+)", c)] if m}
    src_dirs = {i.args.split()[-1].rstrip("/") for i in builder.all("COPY") if i.args.split()[0] == "."}
    if not any(c.rstrip("/").endswith(tuple(src_dirs)) for c in wheel_cmds if src_dirs):
        problems.append("builder stage does not build the project's wheel from the copied sources")
    if not any(any(d.rstrip("/") in c for d in wheel_dirs) for c in copies):
        problems.append(f"final stage does not copy the wheel directory {sorted(wheel_dirs)} from the builder")
    if any(i.args.split()[0] == "." for i in final.all("COPY")):
        problems.append("final stage copies the source tree (install the builder's wheel instead)")

    # torch: a CUDA build matching the base image's CUDA major version.
    args = final.arg_defaults()
    torch_runs = [i.args for i in final.all("RUN") if re.search(r"torch==\$\{?TORCH_VERSION", i.args)]
    if not torch_runs or "--index-url" not in torch_runs[0]:
        problems.append("final stage: torch is not installed from a CUDA wheel index")
    index = args.get("TORCH_INDEX_URL", "")
    major = (_cuda_version(final.base) or "0").split(".")[0]
    if not re.search(rf"/cu{major}\d$", index):
        problems.append(f"final stage: TORCH_INDEX_URL {index!r} is not a CUDA {major} index")

    # The project, with its [cuda] extra, from the builder's wheel; Ray pinned.
    if not re.search(r"pip install .*hymba_batch-\*\.whl\)?\[cuda\]", runs):
        problems.append("final stage does not install the project's wheel with [cuda]")
    if not re.search(r"ray\[default\]==\$\{?RAY_VERSION", runs):
        problems.append("final stage does not pin ray[default]==${RAY_VERSION}")
    if not re.search(r"python3(\.1[1-9])?\b", runs) or "ubuntu22" in final.base and "python3.1" not in runs:
        problems.append("final stage installs no Python >= 3.11")
    apt = " ".join(c for c in runs.split("&&") if "apt-get install" in c).split()
    # Triton builds a C launcher per kernel signature at first use: a C compiler, libc headers
    # and Python.h. Ray launcher (SSH, rsync), KubeRay probes (wget).
    for pkg in ("gcc", "libc6-dev", "python3-dev", "openssh-client", "rsync", "wget"):
        if pkg not in apt:
            problems.append(f"final stage does not install {pkg}")

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
        # Compiled Triton kernels in the node's cache (the NVMe mount the manifests and
        # ray_cluster.yaml put at HYMBA_CACHE): compiled once per node, not once per actor.
        triton_cache = env.get("TRITON_CACHE_DIR")
        if not triton_cache:
            problems.append("final stage sets no TRITON_CACHE_DIR (each actor would compile the kernels again)")
        elif not triton_cache.startswith(cache.rstrip("/") + "/"):
            problems.append(f"TRITON_CACHE_DIR {triton_cache} is not inside HYMBA_CACHE {cache} (the node's mount)")
        # The kernels compiled at build time (no GPU there) for the actors to seed the node's cache.
        seed = env.get("HYMBA_TRITON_SEED")
        pre = [i.args for i in final.all("RUN") if "hymba_batch.model.precompile" in i.args]
        if not seed or not pre:
            problems.append("final stage precompiles no kernels (hymba_batch.model.precompile into HYMBA_TRITON_SEED)")
        elif f"TRITON_CACHE_DIR={seed}" not in pre[0]:
            problems.append(f"the precompile does not write HYMBA_TRITON_SEED {seed}")
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
    assert all(s.base.startswith("nvidia/cuda:") and "-runtime-" in s.base for s in dockerfile.stages)
    env = dockerfile.stages[-1].env()
    assert env["HYMBA_CACHE"] == "/var/cache/hymba"
    assert env["TRITON_CACHE_DIR"] == "/var/cache/hymba/triton"


def test_user_is_uid_1000(image_uid, dockerfile):
    assert image_uid == 1000  # the k8s manifests' runAsUser and ray_cluster.yaml's chown
    assert dockerfile.stages[-1].all("USER")[-1].args == "hymba"


RE_ADDED_FLASH_ATTN = ('RUN pip wheel --no-deps --no-build-isolation --wheel-dir /wheels "flash-attn==2.8.3.post2"\n'
                      "RUN pip wheel --no-deps --wheel-dir /wheels /src")

BROKEN = {
    "single stage": lambda t: t[t.index("FROM nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU} AS runtime"):].replace(
        "COPY --from=builder /wheels /tmp/wheels", ""),
    "final on devel": lambda t: t.replace("-runtime-${UBUNTU} AS runtime", "-devel-${UBUNTU} AS runtime"),
    "builder on devel": lambda t: t.replace("-runtime-${UBUNTU} AS builder", "-devel-${UBUNTU} AS builder"),
    "flash-attn build re-added": lambda t: t.replace("RUN pip wheel --no-deps --wheel-dir /wheels /src",
                                                     RE_ADDED_FLASH_ATTN),
    "mamba-ssm installed": lambda t: t.replace('"ray[default]==${RAY_VERSION}" \\',
                                               '"ray[default]==${RAY_VERSION}" mamba_ssm causal-conv1d \\'),
    "sources copied into the final image": lambda t: t.replace(
        "COPY --from=builder /wheels /tmp/wheels", "COPY --from=builder /wheels /tmp/wheels\nCOPY . /src"),
    "no project wheel built": lambda t: t.replace("RUN pip wheel --no-deps --wheel-dir /wheels /src",
                                                  "RUN mkdir /wheels"),
    "no triton cache": lambda t: t.replace("    TRITON_CACHE_DIR=/var/cache/hymba/triton \\\n", ""),
    "triton cache per container": lambda t: t.replace("TRITON_CACHE_DIR=/var/cache/hymba/triton",
                                                      "TRITON_CACHE_DIR=/tmp/triton"),
    "no C compiler": lambda t: t.replace(" gcc libc6-dev", ""),
    "no python headers": lambda t: t.replace(" python3-dev", ""),
    "runs as root": lambda t: t.replace("USER hymba", "USER root"),
    "no user": lambda t: t.replace("USER hymba\n", ""),
    "shell entrypoint": lambda t: t.replace('ENTRYPOINT ["hymba-batch"]', "ENTRYPOINT hymba-batch"),
    "other entrypoint": lambda t: t.replace('ENTRYPOINT ["hymba-batch"]', 'ENTRYPOINT ["python"]'),
    "no wheels copied": lambda t: t.replace("COPY --from=builder /wheels /tmp/wheels", "COPY . /tmp/wheels"),
    "project without cuda extra": lambda t: t.replace(".whl)[cuda]", ".whl)"),
    "cpu torch": lambda t: t.replace("whl/cu130", "whl/cpu"),
    "no cache volume": lambda t: t.replace('VOLUME ["/var/cache/hymba"]', ""),
    "no rsync": lambda t: t.replace("openssh-client rsync wget", "openssh-client wget"),
    "no precompiled kernels": lambda t: t.replace("ENV HYMBA_TRITON_SEED=/opt/hymba/triton-seed\n", ""),
    "precompiled elsewhere": lambda t: t.replace("TRITON_CACHE_DIR=/opt/hymba/triton-seed python",
                                                 "TRITON_CACHE_DIR=/tmp/x python"),
}
# What the problem found must name, for the cases where a wrong reason would hide a regression.
EXPECTED = {
    "builder on devel": "CUDA devel image",
    "flash-attn build re-added": "builds or installs flash-attn",
    "mamba-ssm installed": "builds or installs mamba_ssm",
    "sources copied into the final image": "copies the source tree",
    "no project wheel built": "does not build the project's wheel",
    "no triton cache": "sets no TRITON_CACHE_DIR",
    "triton cache per container": "TRITON_CACHE_DIR /tmp/triton is not inside HYMBA_CACHE",
    "no C compiler": "does not install gcc",
    "no python headers": "does not install python3-dev",
    "no rsync": "does not install rsync",
    "no precompiled kernels": "precompiles no kernels",
    "precompiled elsewhere": "does not write HYMBA_TRITON_SEED",
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_dockerfile_is_caught(name, text, pyproject, dockerfile_parser):
    broken = BROKEN[name](text)
    assert broken != text, f"mutation {name!r} no longer applies to infra/Dockerfile"
    problems = dockerfile_problems(dockerfile_parser(broken), pyproject)
    assert problems, name
    if name in EXPECTED:
        assert any(EXPECTED[name] in p for p in problems), problems


@pytest.mark.parametrize("pkg", THIRD_PARTY_KERNELS)
def test_third_party_kernel_in_cuda_extra_is_caught(pkg, dockerfile, pyproject):
    broken = copy.deepcopy(pyproject)
    broken["project"]["optional-dependencies"]["cuda"].append(f"{pkg}>=1.0")
    problems = dockerfile_problems(dockerfile, broken)
    assert any(pkg in p and "[cuda] extra" in p for p in problems), problems


def test_cuda_extra_is_triton_only(pyproject):
    assert pyproject["project"]["optional-dependencies"]["cuda"] == ["triton>=3.0"]


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
