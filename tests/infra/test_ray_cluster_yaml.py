"""ray_cluster.yaml: valid for Ray's own cluster-config schema and for the checks `ray up` runs
before it contacts AWS; a CPU head and GPU workers; loopback dashboard; the image and its cache.
Also infra/aws/iam.sh, which creates the instance profiles the config names (run against a fake
`aws` that records its calls)."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
from ray.autoscaler._private.util import prepare_config, validate_config

from infra_support import dockerfile, image_uid, ray_cluster  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[2]
RAY_SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
IMAGE = "ghcr.io/hymba-batch/hymba-batch:latest"
GPU_FAMILIES = ("g5", "g6", "g6e", "gr6", "p4d", "p4de", "p5", "p5e", "p5en", "p6")


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    schema = json.loads(RAY_SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _errors(validator, cfg) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(cfg)]


def test_valid_for_rays_schema(validator, ray_cluster):
    assert _errors(validator, ray_cluster) == []


def test_passes_ray_ups_own_checks(ray_cluster):
    """What `ray up` does before bootstrapping AWS: fill defaults, then validate."""
    prepared = prepare_config(copy.deepcopy(ray_cluster))
    validate_config(prepared)
    assert prepared["available_node_types"]["head"]["max_workers"] == 0
    assert prepared["docker"]["image"] == IMAGE


BROKEN = {
    "misspelled top-level key": lambda c: c.__setitem__("max_worker", c.pop("max_workers")),
    "unknown docker option": lambda c: c["docker"].__setitem__("runoptions", ["--gpus all"]),
    "run_options not a list": lambda c: c["docker"].__setitem__("run_options", "--gpus all"),
    "GPU count as text": lambda c: c["available_node_types"]["gpu_l40s"]["resources"].__setitem__("GPU", "one"),
    "node type without node_config": lambda c: c["available_node_types"]["gpu_l40s"].pop("node_config"),
    "negative resource": lambda c: c["available_node_types"]["gpu_l40s"]["resources"].__setitem__("CPU", -8),
    "start commands not a list": lambda c: c.__setitem__("head_start_ray_commands", "ray start --head"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_copy_is_rejected_by_the_schema(name, validator, ray_cluster):
    broken = copy.deepcopy(ray_cluster)
    BROKEN[name](broken)
    assert _errors(validator, broken), name
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_min_workers_above_max_rejected_by_ray(ray_cluster):
    broken = copy.deepcopy(ray_cluster)
    broken["available_node_types"]["gpu_l40s"]["min_workers"] = broken["max_workers"] + 1
    with pytest.raises(ValueError, match="max_workers"):
        validate_config(prepare_config(broken))


def test_cpu_head_and_autoscaling_gpu_workers(ray_cluster):
    types = ray_cluster["available_node_types"]
    head = types[ray_cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert not head["node_config"]["InstanceType"].startswith(GPU_FAMILIES)
    workers = {k: v for k, v in types.items() if k != ray_cluster["head_node_type"]}
    assert workers, "no worker node type"
    for name, nt in workers.items():
        assert nt["node_config"]["InstanceType"].split(".")[0] in GPU_FAMILIES, name
        assert nt["resources"]["GPU"] >= 1, name
        assert 0 == nt["min_workers"] < nt["max_workers"] <= ray_cluster["max_workers"], name
    for nt in types.values():  # the DLAMI: Docker + NVIDIA container toolkit, resolved per region
        assert nt["node_config"]["ImageId"].startswith("resolve:ssm:/aws/service/deeplearning/ami/x86_64/")


def test_dashboard_on_loopback_only(ray_cluster):
    head_start = " ".join(ray_cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    text = (REPO / "ray_cluster.yaml").read_text()
    assert "0.0.0.0" not in text
    assert "--dashboard-host" not in " ".join(ray_cluster["worker_start_ray_commands"])
    assert "$RAY_HEAD_IP:6379" in " ".join(ray_cluster["worker_start_ray_commands"])


def test_docker_runs_our_image_with_gpus_on_workers_only(ray_cluster, dockerfile):
    docker = ray_cluster["docker"]
    assert docker["image"] == IMAGE
    run = docker["run_options"]
    # The image's ENTRYPOINT is hymba-batch; the launcher runs `docker run ... IMAGE bash`.
    assert dockerfile.stages[-1].all("ENTRYPOINT"), "the image has no ENTRYPOINT to reset"
    assert "--entrypoint=" in run
    assert "--gpus all" in docker["worker_run_options"]
    assert not any("--gpus" in o for o in run + docker.get("head_run_options", []))


def test_weights_cache_on_node_nvme(ray_cluster, dockerfile, image_uid):
    cache = dockerfile.stages[-1].env()["HYMBA_CACHE"]
    mounts = [shlex.split(o)[1] for o in ray_cluster["docker"]["run_options"] if o.startswith("-v ")]
    host_dirs = [m.split(":")[0] for m in mounts if m.split(":")[1] == cache]
    assert len(host_dirs) == 1, f"no bind mount onto the image's HYMBA_CACHE {cache}"
    host = host_dirs[0]
    assert host.startswith("/opt/dlami/nvme/")
    init = " ".join(ray_cluster["initialization_commands"])
    assert f"mkdir -p {host}" in init
    assert f"chown {image_uid}:{image_uid} {host}" in init
    assert 'test -w "$HYMBA_CACHE"' in ray_cluster["setup_commands"]


def test_no_keys_and_instance_profiles_from_iam_script(ray_cluster):
    text = (REPO / "ray_cluster.yaml").read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|ssh_private_key", text)
    script = (REPO / "infra/aws/iam.sh").read_text()
    for name, nt in ray_cluster["available_node_types"].items():
        profile = nt["node_config"]["IamInstanceProfile"]["Name"]
        assert f"ensure_profile {profile}\n" in script, f"{name}: {profile} is not created by iam.sh"


FAKE_AWS = """#!{python} -S
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_AWS_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
if args[:2] == ["sts", "get-caller-identity"]:
    print("123456789012")
elif args[:2] in (["iam", "get-role"], ["iam", "get-instance-profile"]) and "--query" not in args:
    sys.exit(254)  # NoSuchEntity: not created yet
"""


def _run_iam(tmp_path, *buckets):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    aws = bin_dir / "aws"
    aws.write_text(FAKE_AWS.format(python=sys.executable))
    aws.chmod(0o755)
    log = tmp_path / "aws.log"
    log.write_text("")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_AWS_LOG": str(log)}
    proc = subprocess.run(["bash", str(REPO / "infra/aws/iam.sh"), *buckets], env=env,
                          capture_output=True, text=True, timeout=30)
    return proc, [json.loads(ln) for ln in log.read_text().splitlines()]


def _opt(call: list[str], name: str) -> str:
    return call[call.index(name) + 1]


def test_iam_script_creates_both_profiles_with_valid_policies(tmp_path):
    proc, calls = _run_iam(tmp_path, "my-bucket", "weights-bucket")
    assert proc.returncode == 0, proc.stderr
    created = [_opt(c, "--role-name") for c in calls if c[:2] == ["iam", "create-role"]]
    assert created == ["hymba-batch-worker", "hymba-batch-head"]
    for c in calls:
        if c[:2] == ["iam", "create-role"]:
            trust = json.loads(_opt(c, "--assume-role-policy-document"))
            assert trust["Statement"][0]["Principal"] == {"Service": "ec2.amazonaws.com"}
    added = {(_opt(c, "--instance-profile-name"), _opt(c, "--role-name"))
             for c in calls if c[:2] == ["iam", "add-role-to-instance-profile"]}
    assert added == {("hymba-batch-worker", "hymba-batch-worker"), ("hymba-batch-head", "hymba-batch-head")}
    policies = {(_opt(c, "--role-name"), _opt(c, "--policy-name")): json.loads(_opt(c, "--policy-document"))
                for c in calls if c[:2] == ["iam", "put-role-policy"]}
    s3 = policies[("hymba-batch-worker", "hymba-batch-s3")]
    resources = [r for st in s3["Statement"] for r in st["Resource"]]
    assert set(resources) == {"arn:aws:s3:::my-bucket", "arn:aws:s3:::weights-bucket",
                              "arn:aws:s3:::my-bucket/*", "arn:aws:s3:::weights-bucket/*"}
    assert policies[("hymba-batch-head", "hymba-batch-s3")] == s3
    head = policies[("hymba-batch-head", "hymba-batch-autoscaler")]["Statement"]
    assert {"Effect": "Allow", "Action": "iam:PassRole",
            "Resource": "arn:aws:iam::123456789012:role/hymba-batch-worker"} in head
    attached = [_opt(c, "--policy-arn") for c in calls if c[:2] == ["iam", "attach-role-policy"]]
    assert attached == ["arn:aws:iam::aws:policy/AmazonEC2FullAccess"]


def test_iam_script_needs_a_bucket(tmp_path):
    proc, calls = _run_iam(tmp_path)
    assert proc.returncode == 2 and "usage" in proc.stderr
    assert calls == []
