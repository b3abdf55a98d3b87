"""infra/k8s/: the custom resources validated against KubeRay's own CRD schemas
(../shared/schemas/kuberay/, openAPIV3Schema, with jsonschema), the rules KubeRay's controller
adds on top, and the plain Kubernetes objects (CronJob, ConfigMap, ServiceAccount) checked for
structure and for agreeing with each other, with the image and with the job spec model."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from infra_support import dockerfile, image_uid, manifests, ray_cluster, shared_dir  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "infra" / "k8s"
IMAGE = "ghcr.io/hymba-batch/hymba-batch:latest"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayCronJob": "ray.io_raycronjobs.yaml"}
CRON_FIELD = r"(\*|\d+(-\d+)?(,\d+(-\d+)?)*)(/\d+)?"
CRON_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]


# ---- KubeRay's CRD schemas -------------------------------------------------------------------

@pytest.fixture(scope="session")
def crd_schemas(shared_dir) -> dict[tuple[str, str], dict]:
    """openAPIV3Schema by (apiVersion, kind), for every served version of the three CRDs."""
    out = {}
    for kind, fname in CRD_FILES.items():
        path = shared_dir / "schemas" / "kuberay" / fname
        assert path.is_file(), f"{path} is missing (KubeRay's CRDs are expected in ../shared/schemas/kuberay/)"
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                api = f"{crd['spec']['group']}/{version['name']}"
                out[(api, kind)] = version["schema"]["openAPIV3Schema"]
    return out


def strict(schema: dict) -> dict:
    """The schema with unknown fields rejected, as `kubectl apply` does by default (strict field
    validation): every object schema that lists properties, and does not preserve unknown fields
    or declare additionalProperties, gets additionalProperties: false."""
    def walk(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    out = copy.deepcopy(schema)
    walk(out)
    return out


class Validators(dict):
    """(published, strict) validators by (apiVersion, kind), built on first use."""

    def __init__(self, schemas: dict):
        super().__init__()
        self.schemas = schemas

    def __missing__(self, key):
        assert key in self.schemas, f"no served KubeRay CRD version for {key}"
        s = self.schemas[key]
        self[key] = (jsonschema.Draft7Validator(s), jsonschema.Draft7Validator(strict(s)))
        return self[key]


@pytest.fixture(scope="session")
def validators(crd_schemas) -> Validators:
    return Validators(crd_schemas)


def crd_errors(validators, doc: dict) -> list[str]:
    errors = []
    for v in validators[(doc["apiVersion"], doc["kind"])]:
        errors += [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in v.iter_errors(doc)]
    return errors


def custom_resources(manifests) -> list[dict]:
    return [d for (kind, _), d in manifests.items() if kind in CRD_FILES]


def test_manifests_are_the_expected_objects(manifests):
    assert sorted(manifests) == sorted([
        ("ConfigMap", "hymba-batch-job"), ("CronJob", "hymba-batch-submit"),
        ("RayCluster", "hymba-batch"), ("RayCronJob", "hymba-batch-hourly"),
        ("RayJob", "hymba-batch-once"), ("ServiceAccount", "hymba-batch")])
    for doc in manifests.values():
        assert isinstance(doc["apiVersion"], str) and doc["metadata"]["name"]


@pytest.mark.parametrize("kind", sorted(CRD_FILES))
def test_custom_resource_matches_kuberay_crd(kind, manifests, validators):
    docs = [d for d in custom_resources(manifests) if d["kind"] == kind]
    assert len(docs) == 1
    assert docs[0]["apiVersion"] == "ray.io/v1"
    assert crd_errors(validators, docs[0]) == []


def _at(doc: dict, path: str):
    node = doc
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else node[part]
    return node


BROKEN = {
    "RayCluster: replicas as text": ("RayCluster", lambda d: d["spec"]["workerGroupSpecs"][0].__setitem__("maxReplicas", "eight")),
    "RayCluster: misspelled workerGroupSpecs": ("RayCluster", lambda d: d["spec"].__setitem__("workerGroupSpec", d["spec"].pop("workerGroupSpecs"))),
    "RayCluster: no headGroupSpec": ("RayCluster", lambda d: d["spec"].pop("headGroupSpec")),
    "RayCluster: unknown auth mode": ("RayCluster", lambda d: d["spec"]["authOptions"].__setitem__("mode", "password")),
    "RayCluster: container without name": ("RayCluster", lambda d: _at(d, "spec.headGroupSpec.template.spec.containers.0").pop("name")),
    "RayCluster: unknown upscaling mode": ("RayCluster", lambda d: d["spec"]["autoscalerOptions"].__setitem__("upscalingMode", "Fast")),
    "RayJob: worker group without groupName": ("RayJob", lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("groupName")),
    "RayJob: entrypoint as a list": ("RayJob", lambda d: d["spec"].__setitem__("entrypoint", ["hymba-batch", "run"])),
    "RayJob: unknown field in spec": ("RayJob", lambda d: d["spec"].__setitem__("entryPoint", "x")),
    "RayCronJob: no schedule": ("RayCronJob", lambda d: d["spec"].pop("schedule")),
    "RayCronJob: empty timeZone": ("RayCronJob", lambda d: d["spec"].__setitem__("timeZone", "")),
    "RayCronJob: unknown deletion policy": ("RayCronJob", lambda d: _at(d, "spec.jobTemplate.deletionStrategy.deletionRules.0").__setitem__("policy", "Delete")),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_copy_is_rejected_by_the_crd(name, manifests, validators):
    kind, mutate = BROKEN[name]
    doc = copy.deepcopy(next(d for d in custom_resources(manifests) if d["kind"] == kind))
    mutate(doc)
    assert crd_errors(validators, doc), name


# ---- rules KubeRay's controller enforces beyond the schema (ray-operator/.../validation.go) ----

def _dns1035(name: str) -> bool:
    return bool(re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name)) and len(name) <= 63


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def cron_problems(schedule: str) -> list[str]:
    fields = schedule.split()
    if len(fields) != 5:
        return [f"{schedule!r}: expected 5 fields"]
    out = []
    for f, (lo, hi) in zip(fields, CRON_RANGES):
        if not re.fullmatch(CRON_FIELD, f) or any(not lo <= int(n) <= hi for n in re.findall(r"\d+", f.split("/")[0])):
            out.append(f"{schedule!r}: bad field {f!r}")
    return out


def cluster_spec_problems(spec: dict, where: str) -> list[str]:
    out = []
    groups = spec.get("workerGroupSpecs", [])
    for g in groups:
        lo, hi = g.get("minReplicas"), g.get("maxReplicas")
        if lo is None or hi is None or lo < 0 or hi < 0 or lo > hi:
            out.append(f"{where}: worker group {g.get('groupName')}: minReplicas {lo} / maxReplicas {hi}")
        for group_name, group in [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in groups]:
            if group.get("resources") and any(k in group.get("rayStartParams", {}) for k in ("num-cpus", "num-gpus", "memory", "resources")):
                out.append(f"{where}: {group_name}: resources set both in rayStartParams and resources")
    if (spec.get("authOptions") or {}).get("mode", "token" if spec.get("authOptions") else None) == "token":
        if not spec.get("rayVersion") or _version(spec["rayVersion"]) < (2, 52, 0):
            out.append(f"{where}: token auth needs rayVersion >= 2.52.0, got {spec.get('rayVersion')!r}")
    return out


def rayjob_spec_problems(spec: dict, where: str) -> list[str]:
    out = []
    selector = spec.get("clusterSelector") or {}
    if not spec.get("rayClusterSpec") and not selector:
        out.append(f"{where}: one of rayClusterSpec or clusterSelector must be set")
    if selector:
        if not selector.get("ray.io/cluster"):
            out.append(f"{where}: clusterSelector needs a non-empty ray.io/cluster")
        if (spec.get("backoffLimit") or 0) > 0:
            out.append(f"{where}: backoffLimit is incompatible with clusterSelector")
    if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
        out.append(f"{where}: ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
    rules = (spec.get("deletionStrategy") or {}).get("deletionRules") or []
    if rules and spec.get("shutdownAfterJobFinishes"):
        out.append(f"{where}: deletionRules and shutdownAfterJobFinishes are mutually exclusive")
    for r in rules:
        cond = r.get("condition", {})
        if ("jobStatus" in cond) == ("jobDeploymentStatus" in cond):
            out.append(f"{where}: a deletion rule needs exactly one of jobStatus / jobDeploymentStatus")
        if selector and r.get("policy") in ("DeleteCluster", "DeleteWorkers"):
            out.append(f"{where}: {r['policy']} is not supported with clusterSelector")
    if spec.get("rayClusterSpec"):
        out += cluster_spec_problems(spec["rayClusterSpec"], f"{where}.rayClusterSpec")
    return out


def kuberay_problems(doc: dict) -> list[str]:
    name, kind = doc["metadata"]["name"], doc["kind"]
    limit = {"RayCluster": 53, "RayJob": 47, "RayCronJob": 36}[kind]
    out = [] if _dns1035(name) and len(name) <= limit else [f"{kind} name {name!r} (DNS-1035, <= {limit})"]
    spec = doc["spec"]
    if kind == "RayCluster":
        out += cluster_spec_problems(spec, name)
    elif kind == "RayJob":
        out += rayjob_spec_problems(spec, name)
    else:
        if "TZ" in spec["schedule"]:
            out.append(f"{name}: use timeZone, not TZ in the schedule")
        out += cron_problems(spec["schedule"])
        out += rayjob_spec_problems(spec["jobTemplate"], f"{name}.jobTemplate")
    return out


def test_custom_resources_pass_kuberay_controller_rules(manifests):
    for doc in custom_resources(manifests):
        assert kuberay_problems(doc) == [], doc["kind"]


CONTROLLER_BROKEN = {
    "min above max": ("RayCluster", lambda d: d["spec"]["workerGroupSpecs"][0].__setitem__("minReplicas", 9)),
    "token auth on old Ray": ("RayCluster", lambda d: d["spec"].__setitem__("rayVersion", "2.50.0")),
    "name too long": ("RayJob", lambda d: d["metadata"].__setitem__("name", "hymba-batch-" + "x" * 40)),
    "ttl without shutdown": ("RayJob", lambda d: d["spec"].__setitem__("shutdownAfterJobFinishes", False)),
    "selector without cluster": ("RayCronJob", lambda d: d["spec"]["jobTemplate"].__setitem__("clusterSelector", {"app": "x"})),
    "retries with selector": ("RayCronJob", lambda d: d["spec"]["jobTemplate"].__setitem__("backoffLimit", 2)),
    "bad cron minute": ("RayCronJob", lambda d: d["spec"].__setitem__("schedule", "61 * * * *")),
    "six cron fields": ("RayCronJob", lambda d: d["spec"].__setitem__("schedule", "0 0 * * * *")),
    "rules with shutdown": ("RayCronJob", lambda d: d["spec"]["jobTemplate"].__setitem__("shutdownAfterJobFinishes", True)),
}


@pytest.mark.parametrize("name", sorted(CONTROLLER_BROKEN))
def test_controller_rule_violations_are_caught(name, manifests):
    kind, mutate = CONTROLLER_BROKEN[name]
    doc = copy.deepcopy(next(d for d in custom_resources(manifests) if d["kind"] == kind))
    mutate(doc)
    assert kuberay_problems(doc), name


# ---- what the manifests must say, and agree on -------------------------------------------------

def cluster_specs(manifests) -> dict[str, dict]:
    return {"RayCluster": manifests[("RayCluster", "hymba-batch")]["spec"],
            "RayJob": manifests[("RayJob", "hymba-batch-once")]["spec"]["rayClusterSpec"]}


def pod_templates(manifests):
    """(where, pod spec) of every pod the manifests create."""
    for where, spec in cluster_specs(manifests).items():
        yield f"{where} head", spec["headGroupSpec"]["template"]["spec"]
        for g in spec["workerGroupSpecs"]:
            yield f"{where} {g['groupName']}", g["template"]["spec"]
    cron = manifests[("CronJob", "hymba-batch-submit")]
    yield "CronJob", cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def test_cpu_head_gpu_workers_autoscaling(manifests):
    for where, spec in cluster_specs(manifests).items():
        assert spec["enableInTreeAutoscaling"] is True, where
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert "nvidia.com/gpu" not in str(head["resources"]), where
        assert spec["workerGroupSpecs"], where
        for g in spec["workerGroupSpecs"]:
            ray = g["template"]["spec"]["containers"][0]
            assert int(ray["resources"]["limits"]["nvidia.com/gpu"]) >= 1, where
            assert ray["resources"]["requests"] == ray["resources"]["limits"], where
            assert g["minReplicas"] == 0 < g["maxReplicas"], where


def test_images_versions_and_users_match_the_image(manifests, dockerfile, image_uid, ray_cluster):
    ray_version = dockerfile.stages[-1].arg_defaults()["RAY_VERSION"]
    assert ray_cluster["docker"]["image"] == IMAGE
    for where, spec in cluster_specs(manifests).items():
        assert spec["rayVersion"] == ray_version, where
    for where, pod in pod_templates(manifests):
        for c in pod.get("initContainers", []) + pod["containers"]:
            assert c["image"] == IMAGE, (where, c["name"])
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["runAsUser"] == image_uid, where
        for c in pod["containers"]:  # only the cache-owner init container may run as root
            assert (c.get("securityContext") or {}).get("runAsUser", image_uid) != 0, (where, c["name"])


def test_weights_cache_mounted_at_hymba_cache(manifests, dockerfile, image_uid):
    cache = dockerfile.stages[-1].env()["HYMBA_CACHE"]
    for where, spec in cluster_specs(manifests).items():
        for g in spec["workerGroupSpecs"]:
            pod = g["template"]["spec"]
            ray = pod["containers"][0]
            vol = next(m["name"] for m in ray["volumeMounts"] if m["mountPath"] == cache)
            volume = next(v for v in pod["volumes"] if v["name"] == vol)
            assert volume["hostPath"]["type"] == "DirectoryOrCreate", where
            init = next(c for c in pod["initContainers"] if any(m["name"] == vol for m in c["volumeMounts"]))
            assert f"chown {image_uid}:{image_uid} {cache}" in " ".join(init["command"]), where


def _head_mounts_spec(spec: dict) -> bool:
    pod = spec["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0].get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    return volumes.get(mounts.get("/config"), {}).get("configMap", {}).get("name") == "hymba-batch-job"


def test_jobs_run_the_mounted_spec(manifests):
    """The driver runs on the head (no entrypoint resources), where /config/job.yaml is mounted."""
    for where, spec in cluster_specs(manifests).items():
        assert _head_mounts_spec(spec), where
    job = manifests[("RayJob", "hymba-batch-once")]["spec"]
    assert job["entrypoint"] == "hymba-batch run /config/job.yaml"
    cron = manifests[("RayCronJob", "hymba-batch-hourly")]["spec"]
    assert cron["schedule"] == "0 * * * *"
    assert cron["jobTemplate"]["entrypoint"] == "hymba-batch run /config/job.yaml --incremental"
    assert cron["jobTemplate"]["clusterSelector"] == {"ray.io/cluster": "hymba-batch"}
    for spec in (job, cron["jobTemplate"]):
        assert not any(k.startswith("entrypointNum") or k == "entrypointResources" for k in spec)
    assert "job.yaml" in manifests[("ConfigMap", "hymba-batch-job")]["data"]


def test_configmap_holds_a_valid_job_spec(manifests):
    from hymba_batch.jobs.spec import SpecError, parse_spec

    raw = yaml.safe_load(manifests[("ConfigMap", "hymba-batch-job")]["data"]["job.yaml"])
    spec = parse_spec(raw, source="job-configmap.yaml")
    assert spec.model.path.startswith("s3://") and spec.input.uri.startswith("s3://")
    with pytest.raises(SpecError, match="unknown field"):
        parse_spec({**raw, "schedul": {"incremental": True}}, source="broken copy")


def test_job_server_requires_the_ray_token(manifests):
    """KubeRay binds the dashboard to 0.0.0.0 in the pod: every cluster uses token auth, and the
    CronJob reads the token from the Secret KubeRay creates for the RayCluster (its name)."""
    for where, spec in cluster_specs(manifests).items():
        assert spec["authOptions"] == {"mode": "token"}, where
    container = manifests[("CronJob", "hymba-batch-submit")]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hymba-batch", "key": "auth_token"}


# ---- plain Kubernetes objects: structure -----------------------------------------------------

def cronjob_problems(doc: dict, configmaps: set[str]) -> list[str]:
    out = []
    if doc.get("apiVersion") != "batch/v1" or doc.get("kind") != "CronJob":
        out.append(f"apiVersion/kind {doc.get('apiVersion')}/{doc.get('kind')}: expected batch/v1 CronJob")
    spec = doc.get("spec") or {}
    out += cron_problems(str(spec.get("schedule", "")))
    if spec.get("concurrencyPolicy", "Allow") not in ("Allow", "Forbid", "Replace"):
        out.append(f"concurrencyPolicy {spec.get('concurrencyPolicy')!r}")
    pod = (((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {}).get("spec") or {}
    if pod.get("restartPolicy") not in ("Never", "OnFailure"):
        out.append(f"a Job's pods need restartPolicy Never or OnFailure, got {pod.get('restartPolicy')!r}")
    containers = pod.get("containers") or []
    if not containers:
        out.append("no containers")
    for c in containers:
        if not c.get("name") or not c.get("image"):
            out.append("a container needs a name and an image")
        mounts = {m.get("name") for m in c.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for m in mounts - set(volumes):
            out.append(f"volumeMount {m} has no volume")
    for v in pod.get("volumes", []):
        if "configMap" in v and v["configMap"].get("name") not in configmaps:
            out.append(f"volume {v['name']}: ConfigMap {v['configMap'].get('name')} is not in infra/k8s")
    return out


def test_cronjob_structure_and_command(manifests):
    doc = manifests[("CronJob", "hymba-batch-submit")]
    configmaps = {name for kind, name in manifests if kind == "ConfigMap"}
    assert cronjob_problems(doc, configmaps) == []
    spec = doc["spec"]
    assert spec["schedule"] == "0 * * * *" and spec["concurrencyPolicy"] == "Forbid"
    c = spec["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    cluster = manifests[("RayCluster", "hymba-batch")]["metadata"]["name"]
    assert c["command"] + c["args"] == ["hymba-batch", "submit", "/config/job.yaml", "--address",
                                       f"http://{cluster}-head-svc:8265", "--incremental"]


CRONJOB_BROKEN = {
    "wrong apiVersion": lambda d: d.__setitem__("apiVersion", "batch/v1beta2"),
    "no schedule": lambda d: d["spec"].pop("schedule"),
    "restartPolicy Always": lambda d: d["spec"]["jobTemplate"]["spec"]["template"]["spec"].__setitem__("restartPolicy", "Always"),
    "no containers": lambda d: d["spec"]["jobTemplate"]["spec"]["template"]["spec"].__setitem__("containers", []),
    "missing ConfigMap": lambda d: d["spec"]["jobTemplate"]["spec"]["template"]["spec"]["volumes"][0]["configMap"].__setitem__("name", "nope"),
    "mount without volume": lambda d: d["spec"]["jobTemplate"]["spec"]["template"]["spec"].__setitem__("volumes", []),
}


@pytest.mark.parametrize("name", sorted(CRONJOB_BROKEN))
def test_broken_cronjob_is_caught(name, manifests):
    doc = copy.deepcopy(manifests[("CronJob", "hymba-batch-submit")])
    CRONJOB_BROKEN[name](doc)
    configmaps = {n for kind, n in manifests if kind == "ConfigMap"}
    assert cronjob_problems(doc, configmaps), name


def test_configmap_and_serviceaccount_structure(manifests):
    cm = manifests[("ConfigMap", "hymba-batch-job")]
    assert cm["apiVersion"] == "v1" and set(cm) <= {"apiVersion", "kind", "metadata", "data"}
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in cm["data"].items())
    sa = manifests[("ServiceAccount", "hymba-batch")]
    assert sa["apiVersion"] == "v1" and set(sa) <= {"apiVersion", "kind", "metadata"}
    for where, pod in pod_templates(manifests):
        if where != "CronJob":
            assert pod["serviceAccountName"] == sa["metadata"]["name"], where


SECRET_PATTERNS = re.compile(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|BEGIN [A-Z ]*PRIVATE KEY|password:\s*\S"
                             r"|auth_token:\s*\S", re.IGNORECASE)


def test_no_credentials_in_deployment_files():
    files = [p for p in (REPO / "infra").rglob("*") if p.is_file()] + [REPO / "ray_cluster.yaml"]
    assert len(files) > 10
    hits = [(p.name, m.group(0)) for p in files for m in SECRET_PATTERNS.finditer(p.read_text())]
    assert hits == []
    assert SECRET_PATTERNS.search("stringData:\n  auth_token: hunter2")  # the check itself is live
