"""infra/: KubeRay manifests, the VM cluster config, runtime_env, image, configs and scripts, checked without a cluster.

Manifests are validated against the KubeRay CRDs' own OpenAPI v3 schemas (``tests/infra/kuberay_crds``) with
Kubernetes' semantics (unknown fields rejected as by ``kubectl --validate=strict``, int-or-string and int32
formats, list-map keys, the CRDs' CEL rules translated); the VM config against the schema Ray ships and Ray's
own ``prepare_config``/``validate_config`` (through ``pipelines.ray_compat``); job entrypoints with the ``isa``
stages' own argument parsers.
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from ray.runtime_env import RuntimeEnv

from isa.config import Config, load_config, parse_overrides
from pipelines.cli import STAGES
from pipelines.cli import main as isa_main
from pipelines.ray_compat import check_cluster_config, working_dir_excludes
from pipelines.stage import config_parser
from tune.space import check_metric, param_space, parse_space
from tune.sweep import load_sweep_file, scheduler, searcher, trial_config

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
KUBERAY_DIR = INFRA / "kuberay"
KUBERAY_SCHEMAS = Path(__file__).parent / "kuberay_crds"  # the operator's CRDs, vendored (see its README)
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
STAGE_JOBS = {"embed", "train", "eval", "tune"}  # one RayJob each: infra/kuberay/rayjob-STAGE.yaml
# Stages whose --config takes a sweep file (config sections + tune: + space:), not a plain config.
SWEEP_STAGES = frozenset({"tune"})
# Stages the architecture names whose module is not in pipelines.cli.STAGES yet: their RayJobs are parsed with
# the stage contract (`isa STAGE [--config FILE] [key=value ...]`) until the stage registers itself.
PENDING_STAGES = frozenset({"eval"})
TOKEN_KEY = "auth_token"  # the key KubeRay reads from authOptions.secretName

# The CEL rules of the CRDs as JSON Schema. Transition rules (self == oldSelf) only constrain updates; a new rule
# in a future CRD fails the conversion until it is translated here.
CEL_RULES: dict[str, dict | None] = {
    "self == oldSelf": None,
    "self in ['ray.io/kuberay-operator', 'kueue.x-k8s.io/multikueue']": {
        "enum": ["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]
    },
    "!((has(self.onSuccess) || has(self.onFailure)) && has(self.deletionRules))": {
        "not": {
            "allOf": [
                {"anyOf": [{"required": ["onSuccess"]}, {"required": ["onFailure"]}]},
                {"required": ["deletionRules"]},
            ]
        }
    },
    "((has(self.onSuccess) && has(self.onFailure)) || has(self.deletionRules))": {
        "anyOf": [{"required": ["onSuccess", "onFailure"]}, {"required": ["deletionRules"]}]
    },
    "!(has(self.jobStatus) && has(self.jobDeploymentStatus))": {
        "not": {"required": ["jobStatus", "jobDeploymentStatus"]}
    },
    "has(self.jobStatus) || has(self.jobDeploymentStatus)": {
        "anyOf": [{"required": ["jobStatus"]}, {"required": ["jobDeploymentStatus"]}]
    },
}

# ObjectMeta as the API server checks it for what manifests set (the CRDs leave it as a bare object).
DNS_LABEL = r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$"
OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": DNS_LABEL},
        "namespace": {"type": "string", "pattern": DNS_LABEL},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


# ---------------------------------------------------------------------------------------------- loading


def load_yaml(path: Path):
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def kuberay_documents() -> list[tuple[str, dict]]:
    """(file name, document) for every YAML document under infra/kuberay/."""
    return [
        (path.name, doc)
        for path in sorted(KUBERAY_DIR.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def ray_manifests(kind: str) -> dict[str, dict]:
    return {name: doc for name, doc in kuberay_documents() if doc.get("kind") == kind}


def the_cluster() -> dict:
    clusters = ray_manifests("RayCluster")
    assert len(clusters) == 1, f"expected one RayCluster under infra/kuberay, found {sorted(clusters)}"
    return next(iter(clusters.values()))


def ray_containers(cluster: dict) -> dict[str, dict]:
    """The Ray container (index 0, as KubeRay assumes) of the head and of each worker group."""
    spec = cluster["spec"]
    groups = {"head": spec["headGroupSpec"], **{g["groupName"]: g for g in spec["workerGroupSpecs"]}}
    return {name: group["template"]["spec"]["containers"][0] for name, group in groups.items()}


def worker_group(cluster: dict, name: str) -> dict:
    return next(g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == name)


def quantity(value) -> float:
    """A Kubernetes CPU quantity as a number ("500m" -> 0.5)."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def env_of(container: dict) -> dict[str, dict]:
    return {entry["name"]: entry for entry in container.get("env", [])}


# ------------------------------------------------------------------------------- CRD schema -> validator


def _structural(node, where: str = ""):
    """A CRD schema node as JSON Schema (draft 4) with the API server's semantics."""
    if not isinstance(node, dict):
        return node
    out, extra = {}, []
    for key, value in node.items():
        if key in ("properties", "patternProperties"):
            out[key] = {name: _structural(sub, f"{where}/{name}") for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = _structural(value, f"{where}/{key}")
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [_structural(sub, where) for sub in value]
        elif key == "x-kubernetes-validations":
            for rule in value:
                if rule["rule"] not in CEL_RULES:
                    raise KeyError(f"untranslated CEL rule at {where}: {rule['rule']!r} (add it to CEL_RULES)")
                if CEL_RULES[rule["rule"]] is not None:
                    extra.append(CEL_RULES[rule["rule"]])
        else:
            out[key] = value
    if extra:
        out["allOf"] = [*out.get("allOf", []), *extra]
    if out.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    strict = not out.get("x-kubernetes-preserve-unknown-fields")
    if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out and strict:
        out["additionalProperties"] = False  # unknown fields are errors, as with kubectl --validate=strict
    return out


def _list_type(validator, list_type, instance, schema):
    """x-kubernetes-list-type: items of a `set` are unique; items of a `map` are unique by their map keys."""
    if not validator.is_type(instance, "array") or list_type not in ("set", "map"):
        return
    if list_type == "set":
        keys = [json.dumps(item, sort_keys=True) for item in instance]
    else:
        names = schema.get("x-kubernetes-list-map-keys", [])
        defaults = {n: s.get("default") for n, s in schema.get("items", {}).get("properties", {}).items()}
        keys = [json.dumps([item.get(n, defaults.get(n)) for n in names]) for item in instance]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        yield jsonschema.ValidationError(f"duplicate entries {duplicates} in a list of type {list_type!r}")


FORMATS = jsonschema.FormatChecker(formats=())
FORMATS.checks("int32")(lambda v: not isinstance(v, int) or -(2**31) <= v < 2**31)
FORMATS.checks("int64")(lambda v: not isinstance(v, int) or -(2**63) <= v < 2**63)
K8sValidator = jsonschema.validators.extend(jsonschema.Draft4Validator, {"x-kubernetes-list-type": _list_type})


@functools.cache
def crd_validator(kind: str, api_version: str) -> jsonschema.protocols.Validator:
    crd = load_yaml(KUBERAY_SCHEMAS / CRD_FILES[kind])
    group, _, version = api_version.partition("/")
    assert crd["spec"]["names"]["kind"] == kind and crd["spec"]["group"] == group, (kind, api_version)
    served = {v["name"]: v for v in crd["spec"]["versions"] if v.get("served")}
    assert version in served, f"{kind} {api_version}: the CRD serves {sorted(served)}"
    schema = _structural(served[version]["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = OBJECT_META
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    schema["properties"]["apiVersion"] = {"enum": [api_version]}
    schema["properties"]["kind"] = {"enum": [kind]}
    return K8sValidator(schema, format_checker=FORMATS)


def manifest_errors(doc: dict) -> list[str]:
    validator = crd_validator(doc["kind"], doc["apiVersion"])
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


# ------------------------------------------------------------------------------------- KubeRay manifests


def test_kuberay_folder_holds_the_cluster_and_one_job_per_stage():
    kinds = {(name, doc["kind"]) for name, doc in kuberay_documents()}
    assert ("raycluster.yaml", "RayCluster") in kinds
    jobs = ray_manifests("RayJob")
    assert set(jobs) == {f"rayjob-{stage}.yaml" for stage in STAGE_JOBS}
    assert {job["metadata"]["name"] for job in jobs.values()} == {f"isa-{stage}" for stage in STAGE_JOBS}
    others = {kind for _, kind in kinds} - {"RayCluster", "RayJob", "RayService"}  # rayservice.yaml: isa serve
    assert others <= {"PersistentVolumeClaim", "Deployment", "Service"}, others  # mlflow.yaml


@pytest.mark.parametrize("name", sorted(n for n, d in kuberay_documents() if d["kind"] in CRD_FILES))
def test_ray_manifest_validates_against_the_kuberay_crd(name):
    doc = next(d for n, d in kuberay_documents() if n == name and d["kind"] in CRD_FILES)
    assert manifest_errors(doc) == []


def _set(path: list, value):
    def mutate(doc):
        target = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


def _append_env(doc):
    doc["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "RAY_AUTH_MODE", "value": "token"}
    )


GPU = ["spec", "workerGroupSpecs", 1]
GPU_CONTAINER = [*GPU, "template", "spec", "containers", 0]
BROKEN_MANIFESTS = {
    "replica bound as text": ("raycluster.yaml", _set([*GPU, "maxReplicas"], "4"), [*GPU, "maxReplicas"]),
    "replica bound beyond int32": ("raycluster.yaml", _set([*GPU, "minReplicas"], 2**31), [*GPU, "minReplicas"]),
    "misspelled field": ("raycluster.yaml", _set(["spec", "enableInTreeAutoScaling"], True), ["spec"]),
    "memory that is no quantity": (
        "raycluster.yaml",
        _set([*GPU_CONTAINER, "resources", "limits", "memory"], "64 GB"),
        [*GPU_CONTAINER, "resources", "limits", "memory"],
    ),
    "the same env variable twice": ("raycluster.yaml", _append_env, [*GPU_CONTAINER, "env"]),
    "unknown auth mode": (
        "raycluster.yaml",
        _set(["spec", "authOptions", "mode"], "tokens"),
        ["spec", "authOptions", "mode"],
    ),
    "managedBy outside its CEL rule": ("raycluster.yaml", _set(["spec", "managedBy"], "me"), ["spec", "managedBy"]),
    "cluster name that is no DNS label": (
        "raycluster.yaml",
        _set(["metadata", "name"], "ISA_cluster"),
        ["metadata", "name"],
    ),
    "entrypoint as a list": (
        "rayjob-train.yaml",
        _set(["spec", "entrypoint"], ["isa", "train"]),
        ["spec", "entrypoint"],
    ),
    "selector value as a number": (
        "rayjob-embed.yaml",
        _set(["spec", "clusterSelector", "ray.io/cluster"], 1),
        ["spec", "clusterSelector", "ray.io/cluster"],
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN_MANIFESTS))
def test_a_broken_manifest_copy_fails_validation(case):
    name, mutate, path = BROKEN_MANIFESTS[case]
    doc = copy.deepcopy(next(d for n, d in kuberay_documents() if n == name and d["kind"] in CRD_FILES))
    assert manifest_errors(doc) == []
    mutate(doc)
    errors = manifest_errors(doc)
    assert errors, f"{case}: the broken copy validated"
    assert any(e.startswith("/".join(map(str, path)) + ":") for e in errors), errors


def test_cluster_has_head_cpu_and_gpu_groups_with_autoscaling_bounds():
    cluster = the_cluster()
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"  # nothing but drivers on the head
    assert [g["groupName"] for g in spec["workerGroupSpecs"]] == ["cpu-workers", "gpu-workers"]
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"], group
    assert worker_group(cluster, "cpu-workers")["minReplicas"] >= 1  # decoding needs CPUs off the head
    containers = ray_containers(cluster)
    for name, container in containers.items():
        limits = container["resources"]["limits"]
        assert container["resources"]["requests"] == limits, f"{name}: Ray pods want requests == limits"
        assert ("nvidia.com/gpu" in limits) == (name == "gpu-workers"), name
    assert int(containers["gpu-workers"]["resources"]["limits"]["nvidia.com/gpu"]) >= 1


def test_token_auth_s3_and_mlflow_come_from_secrets_in_every_ray_container():
    cluster = the_cluster()
    auth = cluster["spec"]["authOptions"]
    assert auth["mode"] == "token" and auth["secretName"]
    for name, container in ray_containers(cluster).items():
        env = env_of(container)
        assert env["RAY_AUTH_MODE"].get("value") == "token", name
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": auth["secretName"], "key": TOKEN_KEY}
        sources = container.get("envFrom", [])
        assert {"secretRef": {"name": "isa-s3"}} in sources, f"{name}: no S3 secret"
        # MLFLOW_TRACKING_URI and the account: from a Secret a cluster that tracks elsewhere need not have
        assert {"secretRef": {"name": "isa-mlflow", "optional": True}} in sources, name
        assert not [v for v in env if v.startswith("MLFLOW_")], f"{name}: MLflow settings belong in envFrom"
        assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env), f"{name}: S3 keys belong in envFrom"


# Secrets the manifests read whole (envFrom) -> the keys the README's commands must put in them
WHOLE_SECRETS = {
    "isa-s3": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"},
    "isa-mlflow": {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"},
    "isa-mlflow-server": {"MLFLOW_FLASK_SERVER_SECRET_KEY"},
}


def _readme_secrets() -> dict[str, set[str]]:
    """Secret name -> keys, from the `kubectl create secret generic` commands in infra/README.md."""
    text = (INFRA / "README.md").read_text().replace("\\\n", " ")
    created = {}
    for line in text.splitlines():
        match = re.search(r"kubectl create secret generic (\S+)(.*)", line)
        if match:
            created[match.group(1)] = set(re.findall(r"--from-literal=([A-Za-z_][A-Za-z0-9_]*)=", match.group(2)))
    return created


def test_readme_creates_every_secret_the_manifests_read():
    cluster = the_cluster()
    referenced: dict[str, set[str]] = {cluster["spec"]["authOptions"]["secretName"]: {TOKEN_KEY}}
    whole: set[str] = set()

    def walk(node):
        if isinstance(node, dict):
            if "secretKeyRef" in node:
                referenced.setdefault(node["secretKeyRef"]["name"], set()).add(node["secretKeyRef"]["key"])
            if "secretRef" in node:
                whole.add(node["secretRef"]["name"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for _, doc in kuberay_documents():
        walk(doc)
    created = _readme_secrets()
    for name, keys in referenced.items():
        assert name in created and keys <= created[name], (name, keys, created)
    assert whole == set(WHOLE_SECRETS)
    for name, keys in WHOLE_SECRETS.items():
        assert name in created and keys <= created[name], (name, created)


def _pyproject_version() -> str:
    return re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)


def test_images_and_ray_versions_agree():
    image = re.compile(rf"REGISTRY/isa:{re.escape(_pyproject_version())}-COMMIT")  # the placeholder infra/image.sh pins
    for name, doc in kuberay_documents():
        pod_specs = []
        if doc["kind"] == "RayCluster":
            pod_specs = [doc["spec"]["headGroupSpec"]["template"]["spec"]]
            pod_specs += [g["template"]["spec"] for g in doc["spec"]["workerGroupSpecs"]]
        elif doc["kind"] == "Deployment":
            pod_specs = [doc["spec"]["template"]["spec"]]
        for pod in pod_specs:
            assert all(image.fullmatch(c["image"]) for c in pod["containers"]), name
    assert the_cluster()["spec"]["rayVersion"] == ray.__version__
    base = re.search(r"^ARG RAY_IMAGE=(\S+)$", (REPO / "Dockerfile").read_text(), re.M).group(1)
    assert base == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert load_yaml(INFRA / "vm" / "cluster.yaml")["docker"]["image"] == base


def test_rayjobs_select_the_running_cluster_and_start_in_the_image_repository():
    cluster_name = the_cluster()["metadata"]["name"]
    workdir = re.findall(r"^WORKDIR (\S+)$", (REPO / "Dockerfile").read_text(), re.M)[-1]
    for name, job in ray_manifests("RayJob").items():
        spec = job["spec"]
        assert spec["clusterSelector"] == {"ray.io/cluster": cluster_name}, name
        assert "rayClusterSpec" not in spec and not spec.get("shutdownAfterJobFinishes"), name
        runtime_env = RuntimeEnv(**yaml.safe_load(spec["runtimeEnvYAML"]))  # Ray's own validation
        assert runtime_env.working_dir() == f"local://{workdir}", name


# ---------------------------------------------------------------------------------- entrypoints and configs


def _entrypoint(file_name: str) -> list[str]:
    return shlex.split(ray_manifests("RayJob")[file_name]["spec"]["entrypoint"])


def _config_files(args: list[str]) -> list[str]:
    return [args[i + 1] for i, arg in enumerate(args) if arg == "--config"] + [
        a.split("=", 1)[1] for a in args if a.startswith("--config=")
    ]


class _Parsed(Exception):
    """Raised in place of ``init_ray``: the stage parsed and loaded its config, and would start Ray next."""


def parse_sweep_stage(stage: str, args: list[str]) -> tuple:
    """(space, Config) as ``isa tune``'s own ``main`` parses and loads them, stopped before it starts Ray.

    The stage builds its parser inside ``main``; ``check_start`` (called right after the sweep file loaded, the first
    step that reads storage) is replaced by an exception, so nothing runs. A config error raises the stage's IsaError
    instead.
    """
    import tune.sweep

    module = importlib.import_module(STAGES[stage][0])
    loaded = []

    def load(*a, **k):
        loaded.append(load_sweep_file(*a, **k))
        return loaded[-1]

    def stop():
        raise _Parsed

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tune.sweep, "load_sweep_file", load)
        patch.setattr(module, "check_start", lambda *a, **k: stop())
        with pytest.raises(_Parsed):
            module.main(args)
    config, space = loaded[-1]
    return space, config


def parse_stage(stage: str, args: list[str]):
    """What the stage's own parser makes of ``args``, without running anything; the Config comes last."""
    if stage in SWEEP_STAGES:
        parsed = parse_sweep_stage(stage, args)
    elif stage in STAGES:
        parsed = importlib.import_module(STAGES[stage][0]).parse_args(args)
    else:  # the stage contract until the module registers itself in pipelines.cli.STAGES
        namespace = config_parser(f"isa {stage}", stage).parse_intermixed_args(args)
        parsed = load_config(namespace.config, namespace.overrides)
    parsed = parsed if isinstance(parsed, tuple) else (parsed,)
    assert isinstance(parsed[-1], Config), f"isa {stage}: parse_args gave {parsed!r}"
    return parsed


@pytest.mark.usefixtures("s3_endpoint")  # a stage reads the saved work its s3:// URIs name, as on the cluster
@pytest.mark.parametrize("file_name", sorted(f"rayjob-{stage}.yaml" for stage in STAGE_JOBS))
def test_rayjob_entrypoint_parses_with_its_stage(file_name, capsys):
    argv = _entrypoint(file_name)
    assert argv[0] == "isa", argv
    stage, args = argv[1], argv[2:]
    assert file_name == f"rayjob-{stage}.yaml"
    assert stage in STAGES or stage in PENDING_STAGES, f"unknown stage {stage!r}; valid: {sorted(STAGES)}"
    if stage in STAGES:
        with pytest.raises(SystemExit) as exited:
            isa_main([stage, "--help"])
        assert exited.value.code == 0 and f"usage: isa {stage}" in capsys.readouterr().out
    configs = _config_files(args)
    assert configs, f"{file_name}: the entrypoint names no --config file"
    for path in configs:  # relative to the repository root, which is the image's WORKDIR
        assert (REPO / path).is_file(), path
        if stage in SWEEP_STAGES:
            load_sweep_file(str(REPO / path))
        else:
            load_config(REPO / path, [])
    if stage == "eval":  # everything through the config: only --config FILE and key=value overrides
        rest = [a for i, a in enumerate(args) if a != "--config" and (i == 0 or args[i - 1] != "--config")]
        parse_overrides(rest)
    parse_stage(stage, _absolute_configs(args))


def _absolute_configs(args: list[str]) -> list[str]:
    """``args`` with each ``--config FILE`` taken from the repository root (the image's WORKDIR)."""
    return [str(REPO / a) if i and args[i - 1] == "--config" else a for i, a in enumerate(args)]


def _stage_config(stage: str):
    return parse_stage(stage, _absolute_configs(_entrypoint(f"rayjob-{stage}.yaml")[2:]))


@pytest.mark.usefixtures("s3_endpoint")  # a stage reads the saved work its s3:// URIs name, as on the cluster
def test_stages_chain_through_shared_s3_storage():
    embed_input, embed_output, _ = _stage_config("embed")
    (train,) = _stage_config("train")
    (evaluation,) = _stage_config("eval")
    _, sweep = _stage_config("tune")
    assert embed_input.startswith("s3://") and embed_output.startswith("s3://")
    for config in (train, sweep):  # train and every tune trial read what embed wrote
        assert config.train.cache.rstrip("/") == embed_output.rstrip("/")
    assert sweep.tune.storage.startswith("s3://") and sweep.tune.name  # Ray Tune storage_path: shared storage
    assert train.train.output.startswith("s3://")  # Ray Train storage_path is its parent: shared storage
    assert evaluation.eval.checkpoints and all(c.startswith(train.train.output) for c in evaluation.eval.checkpoints)
    for uri in (evaluation.eval.dataset_root, evaluation.eval.gallery_cache, evaluation.eval.output):
        assert uri and uri.startswith("s3://"), uri
    assert train.train.tracking_uri is None and evaluation.eval.tracking_uri is None  # MLFLOW_TRACKING_URI
    assert sweep.train.tracking_uri is None


@pytest.mark.usefixtures("s3_endpoint")  # a stage reads the saved work its s3:// URIs name, as on the cluster
def test_configs_are_the_real_gpu_setting_and_fit_the_gpu_group():
    _, _, embed = _stage_config("embed")
    (train,) = _stage_config("train")
    (evaluation,) = _stage_config("eval")
    _, sweep = _stage_config("tune")
    for config in (embed, train, evaluation, sweep):
        assert (config.teacher.name, config.teacher.pretrained) == ("ViT-L-14", "openai")
    for config in (train, sweep):
        assert (config.student.backbone, config.student.pretrained) == ("efficientnet_b0", True)
    assert train.train.use_gpu and embed.cache.local_grid > 0 and embed.cache.store_images
    cluster = the_cluster()
    gpu = worker_group(cluster, "gpu-workers")
    limits = ray_containers(cluster)["gpu-workers"]["resources"]["limits"]
    gpus, cpus = gpu["maxReplicas"] * int(limits["nvidia.com/gpu"]), quantity(limits["cpu"])
    vm_gpu = load_yaml(INFRA / "vm" / "cluster.yaml")["available_node_types"]["gpu_worker"]
    for config in (embed, evaluation):  # autoscaling from zero GPU pods: "auto" would pick the CPU
        assert config.cache.device == "cuda" and config.cache.num_actors <= gpus
        assert config.cache.actor_cpus <= cpus and config.cache.actor_cpus <= vm_gpu["resources"]["CPU"]
    assert train.train.num_workers <= gpus and train.train.worker_cpus <= cpus
    assert train.train.num_workers <= vm_gpu["max_workers"] * vm_gpu["resources"]["GPU"]
    trial = trial_config(sweep, "mlflow")  # what each trial trains with: tune.gpus_per_trial workers, one GPU each
    assert sweep.tune.gpus_per_trial == 1 and trial.train.use_gpu and trial.train.num_workers == 1
    assert trial.train.worker_cpus <= cpus and trial.train.worker_cpus <= vm_gpu["resources"]["CPU"]
    assert 1 <= sweep.tune.max_concurrent_trials * sweep.tune.gpus_per_trial <= gpus


def test_tune_sweep_passes_the_tune_stages_checks_before_any_trial():
    """What ``tune.sweep.check`` checks without Ray or the cache: every swept key and value (and each grid
    combination) through the config, the metric every trial reports, the searcher, ASHA and Tune's space.
    (The cache fingerprint, the cluster's resources and an existing sweep folder are checked on the cluster.)"""
    space, sweep = _stage_config("tune")
    params = parse_space(space, sweep)
    check_metric(sweep, params)
    searcher(sweep)
    scheduler(sweep)
    assert {p.key: (p.kind, list(p.values)) for p in params} == {
        "token_learner.num_tokens": ("grid", [1, 2, 4, 8, 16]),
        "loss.lar_weight": ("grid", [0, 0.1, 0.3, 1]),
    }
    assert param_space(params, sweep.tune.search)["token_learner"]["num_tokens"] == {"grid_search": [1, 2, 4, 8, 16]}
    t = sweep.tune
    assert (t.metric, t.mode, t.search, t.scheduler) == ("val_image_R1", "max", "grid", "asha")
    reports = sweep.train.max_steps // sweep.train.checkpoint_every  # one report to Tune per checkpoint
    assert t.grace_period < t.max_t <= reports, (t.grace_period, t.max_t, reports)


# ---------------------------------------------------------------------------------------------- VM cluster


def ray_cluster_schema() -> dict:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def vm_config_errors(config: dict) -> list[str]:
    """Ray's schema, then what `ray up` checks before it talks to the cloud."""
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in
              jsonschema.Draft7Validator(ray_cluster_schema()).iter_errors(config)]  # fmt: skip
    if not errors:
        try:
            check_cluster_config(copy.deepcopy(config))
        except (ValueError, KeyError, jsonschema.ValidationError) as error:
            errors.append(f"prepare/validate_config: {error}")
    return errors


def test_vm_cluster_config_validates_against_rays_schema():
    assert vm_config_errors(load_yaml(INFRA / "vm" / "cluster.yaml")) == []


BROKEN_VM_CONFIGS = {
    "max_workers as text": lambda c: c.update(max_workers="many"),
    "misspelled top-level key": lambda c: c.update(setup_command=["true"]),
    "GPU count as text": lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU="1"),
    "node type without node_config": lambda c: c["available_node_types"]["cpu_worker"].pop("node_config"),
    "head type that does not exist": lambda c: c.update(head_node_type="ray.head.default"),
    "min_workers above max_workers": lambda c: c["available_node_types"]["cpu_worker"].update(min_workers=20),
}


@pytest.mark.parametrize("case", sorted(BROKEN_VM_CONFIGS))
def test_a_broken_vm_config_fails_validation(case):
    config = load_yaml(INFRA / "vm" / "cluster.yaml")
    BROKEN_VM_CONFIGS[case](config)
    assert vm_config_errors(config), f"{case}: the broken copy validated"


def test_vm_cluster_has_the_same_split_token_auth_and_installs_the_project():
    config = load_yaml(INFRA / "vm" / "cluster.yaml")
    types = config["available_node_types"]
    assert set(types) == {"head", "cpu_worker", "gpu_worker"} and config["head_node_type"] == "head"
    assert types["head"]["resources"].get("CPU") == 0
    assert types["gpu_worker"]["resources"]["GPU"] >= 1 and "GPU" not in types["cpu_worker"]["resources"]
    assert types["gpu_worker"]["min_workers"] <= types["gpu_worker"]["max_workers"]
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # the token ray get-auth-token made
    assert config["file_mounts"]["~/isa"] == "."
    assert any("pip install" in c and "~/isa" in c for c in config["setup_commands"])
    assert {".venv", "isa-output", ".git"} <= set(config["rsync_exclude"])
    start = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=disabled" not in start and "MLFLOW_TRACKING_URI" in start
    # the head's MLflow server runs no job runner (tests/infra/test_mlflow_auth.py: what it costs)
    (mlflow,) = [c for c in config["head_start_ray_commands"] if "mlflow server" in c]
    assert re.search(r"\(MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false [^;&|]*mlflow server ", mlflow)


# ----------------------------------------------------------------------------- runtime_env, image, scripts


def test_runtime_env_is_valid_for_ray_and_leaves_local_state_out():
    data = load_yaml(INFRA / "runtime_env.yaml")
    RuntimeEnv(**data)
    assert "working_dir" not in data  # given by --working-dir on the command line
    excluded = working_dir_excludes(REPO, data["excludes"])  # what `--working-dir` packaging applies
    for path in (
        ".venv",
        "isa-output",
        ".git",
        "pipelines/__pycache__",
        "isa.egg-info",
    ):  # the folder itself: not walked
        assert excluded(REPO / path), path
    for path in ("pipelines/cli.py", "isa/build.py", "infra/configs/train.yaml", "pyproject.toml"):
        assert not excluded(REPO / path), path


def image_user() -> str:
    """The user the project image runs as: the Dockerfile's last ``USER`` (``NAME``, ``UID`` or ``UID:GID``)."""
    users = re.findall(r"^USER (\S+)", (REPO / "Dockerfile").read_text(), re.M)
    assert users, "the Dockerfile sets no USER: the image would run as root"
    return users[-1]


def kubelet_refusal(pod: dict, container: dict, user: str) -> str | None:
    """Why the kubelet refuses to start ``container`` of ``pod`` (a pod template's spec) from an image whose user is
    ``user``, by the rule of runAsNonRoot (kubelet's verifyRunAsNonRoot), or None when it starts: the container's
    securityContext over the pod's; with runAsNonRoot, runAsUser must be set and not 0, or else the image's user
    must be a number and not 0 (a name cannot be verified: CreateContainerConfigError)."""
    pod_context, own = pod.get("securityContext") or {}, container.get("securityContext") or {}
    non_root = own.get("runAsNonRoot", pod_context.get("runAsNonRoot"))
    run_as = own.get("runAsUser", pod_context.get("runAsUser"))
    if not non_root:
        return None
    if run_as is not None:
        return "container's runAsUser breaks non-root policy" if int(run_as) == 0 else None
    uid = user.split(":")[0]
    if not uid.isdigit():
        return f"container has runAsNonRoot and image has non-numeric user ({uid}), cannot verify user is non-root"
    return "container has runAsNonRoot and image will run as root" if int(uid) == 0 else None


def pod_specs(doc: dict) -> list[dict]:
    """The pod templates' specs of a manifest: a RayCluster's groups (also inside a RayService), a Deployment's."""
    spec = doc.get("spec") or {}
    if doc.get("kind") == "RayService":
        spec = spec["rayClusterConfig"]
    if doc.get("kind") in ("RayCluster", "RayService"):
        return [spec["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in spec["workerGroupSpecs"])]
    return [spec["template"]["spec"]] if doc.get("kind") == "Deployment" else []


def test_the_kubelet_starts_every_container_of_the_shipped_pods():
    user = image_user()
    pods = [(name, pod) for name, doc in kuberay_documents() for pod in pod_specs(doc)]
    assert len(pods) >= 7, [name for name, _ in pods]  # the cluster's 3 groups, the service's 3, MLflow
    for name, pod in pods:
        for container in pod["containers"]:
            assert kubelet_refusal(pod, container, user) is None, (name, container["name"])
            context = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
            assert context.get("runAsNonRoot") and context.get("runAsUser") == int(user.split(":")[0]), name
    # the rule refuses what a kubelet refuses: an image user given by name, root
    pod = {"securityContext": {"runAsNonRoot": True}, "containers": [{"name": "ray"}]}
    assert "non-numeric user (ray)" in kubelet_refusal(pod, pod["containers"][0], "ray")
    assert "will run as root" in kubelet_refusal(pod, pod["containers"][0], "0")
    assert kubelet_refusal(pod, {"securityContext": {"runAsUser": 1000}}, "ray") is None
    assert "breaks non-root" in kubelet_refusal(pod, {"securityContext": {"runAsUser": 0}}, "1000")


def test_dockerfile_builds_the_project_as_a_non_root_user():
    dockerfile = (REPO / "Dockerfile").read_text()
    uid, _, gid = image_user().partition(":")
    assert uid.isdigit() and int(uid) != 0 and (not gid or gid.isdigit()), "a numeric, non-root USER"
    for owner in re.findall(r"^COPY --chown=(\S+) ", dockerfile, re.M):  # the files belong to that user
        assert owner == image_user(), owner
    installs = re.findall(r"^RUN pip install (.*)$", dockerfile, re.M)
    assert any(re.search(r"'\.\[mlflow-server\]'", i) for i in installs)  # the project, and the MLflow server
    assert all(i.startswith("-c infra/constraints.txt ") for i in installs), installs  # the tested versions
    for source in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", dockerfile, re.M):
        for path in source.split():
            assert (REPO / path).exists(), path
    assert re.search(r"^COPY .*\binfra\b", dockerfile, re.M)  # the stage configs the entrypoints name
    ignored = {line.strip().rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert {".venv", "isa-output", ".git", "**/__pycache__"} <= ignored


def _image_fields(folder: Path) -> list[str]:
    images = []
    for path in sorted((folder / "infra" / "kuberay").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            images += re.findall(r"'image': '([^']+)'", str(doc))
    return images


def _image_sh(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(folder / "infra" / "image.sh"), *args], capture_output=True, text=True)


def test_image_script_pins_every_manifest_to_one_build_and_refuses_a_reused_tag(tmp_path):
    for name in ("infra", "Dockerfile", "pyproject.toml", "README.md"):
        source = REPO / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, tmp_path / name)
    placeholder = f"REGISTRY/isa:{_pyproject_version()}-COMMIT"
    assert set(_image_fields(tmp_path)) == {placeholder} and len(_image_fields(tmp_path)) == 7
    for reference, why in [
        (f"isa:{_pyproject_version()}-0123456789ab", "names no registry"),
        (f"registry.example.com/isa:{_pyproject_version()}", "reuses the tag"),
        (f"registry.example.com/isa:{_pyproject_version()}-0123456789ab@sha256:abc", "64 hex digits"),
    ]:
        refused = _image_sh(tmp_path, "pin", reference)
        assert refused.returncode == 2 and why in refused.stderr, refused.stderr
    assert set(_image_fields(tmp_path)) == {placeholder}  # a refused pin changes nothing
    before = {p.name: p.read_text() for p in (tmp_path / "infra" / "kuberay").glob("*.yaml")}
    pinned = f"registry.example.com/team/isa:{_pyproject_version()}-0123456789ab@sha256:{'0f' * 32}"
    done = _image_sh(tmp_path, "pin", pinned)
    assert done.returncode == 0, done.stderr
    assert _image_fields(tmp_path) == [pinned] * 7
    for path in (tmp_path / "infra" / "kuberay").glob("*.yaml"):  # only the image values changed
        for line, old in zip(path.read_text().splitlines(), before[path.name].splitlines(), strict=True):
            assert line == old or (line == old.replace(placeholder, pinned) and "image:" in line), (line, old)
        for doc in yaml.safe_load_all(path.read_text()):
            if doc["kind"] in CRD_FILES:
                assert manifest_errors(doc) == [], path.name

    # the tag names one commit: a checkout with uncommitted changes in what the image holds has none
    assert _image_sh(tmp_path, "tag").returncode == 2  # not a git checkout
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "image"], check=True)
    commit = subprocess.run([*git, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert _image_sh(tmp_path, "tag").stdout.strip() == f"{_pyproject_version()}-{commit}"
    (tmp_path / "infra" / "configs" / "train.yaml").write_text("train: {lr: 1.0}\n")
    dirty = _image_sh(tmp_path, "tag")
    assert (
        dirty.returncode == 2 and "uncommitted changes" in dirty.stderr and "infra/configs/train.yaml" in dirty.stderr
    )


def test_constraints_pin_every_package_isa_installs_within_its_ranges():
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (INFRA / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and " " not in line, f"not NAME==VERSION: {line}"
            pins[canonicalize_name(name)] = version
    spec = importlib.util.spec_from_file_location("constraints", INFRA / "constraints.py")
    constraints = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(constraints)
    assert set(constraints.closure()) <= set(pins)  # every package installing isa (and its extras) pulls in
    for line in metadata.distribution("isa").requires:  # each direct dependency, within pyproject's range
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate({"extra": "mlflow-server"}):
            assert requirement.specifier.contains(pins[canonicalize_name(requirement.name)]), requirement
    assert pins["ray"] == the_cluster()["spec"]["rayVersion"]
    readme = (REPO / "README.md").read_text()
    assert f"torch=={pins['torch']}" in readme and f"torchvision=={pins['torchvision']}" in readme
    # the main job and CI's test command install the tested versions too
    assert "pip install -e" not in readme and readme.count("pip install -c infra/constraints.txt -e ") == 2
    vm = load_yaml(INFRA / "vm" / "cluster.yaml")["setup_commands"]
    assert all("-c ~/isa/infra/constraints.txt" in c for c in vm if "pip install" in c)


def test_local_cluster_script_is_valid_bash_and_keeps_token_auth_on():
    script = INFRA / "local_cluster.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 2 and "start" in usage.stderr and "stop" in usage.stderr
    text = script.read_text().replace("\\\n", " ")
    assert "RAY_AUTH_MODE=token" in text and "RAY_AUTH_MODE=disabled" not in text
    assert re.search(r"ray start --head --node-ip-address=127\.0\.0\.1", text)
    assert "ray get-auth-token" in text and re.search(r"mlflow server .*--backend-store-uri \"sqlite:", text)


# --------------------------------------------------------------------------------------------- secrets

SECRET_WORDS = {"SECRET", "TOKEN", "PASSWORD", "PASSWD", "CREDENTIAL", "CREDENTIALS", "APIKEY"}
SECRET_SUFFIXES = ("ACCESS_KEY", "ACCESS_KEY_ID", "API_KEY", "PRIVATE_KEY", "SESSION_KEY")
SECRET_PATTERNS = {
    "AWS access key id": r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    "private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    "GitHub token": r"\bgh[pousr]_[A-Za-z0-9]{30,}\b",
    "Slack token": r"\bxox[abprs]-[A-Za-z0-9-]{10,}",
    # 32+ base64/hex characters with letters and digits, standing alone (not part of a path, URI or name)
    "key-like string": r"(?<![\w/+=.~-])(?=[A-Za-z0-9+/]*[0-9])(?=[A-Za-z0-9+/]*[A-Za-z])"
    r"[A-Za-z0-9][A-Za-z0-9+/]{31,}={0,2}(?![\w/+=.-])",
}


def secretish(name: str) -> bool:
    upper = name.upper()
    return bool(SECRET_WORDS & set(re.split(r"[^A-Z0-9]+", upper))) or upper.endswith(SECRET_SUFFIXES)


def harmless(value) -> bool:
    """No literal: empty, a <placeholder>, a shell reference ($VAR, ${VAR}, $(command)) or a ~/ file path."""
    text = str(value).strip().strip("\"'")
    return text == "" or text.startswith(("<", "$", "~/"))


def text_findings(text: str) -> list[str]:
    found = [f"{what}: {m.group(0)[:12]}..." for what, p in SECRET_PATTERNS.items() for m in re.finditer(p, text)]
    for name in re.finditer(r"[A-Za-z_][A-Za-z0-9_]*", text):
        if not secretish(name.group(0)) or not (name.group(0).isupper() or "_" in name.group(0)):
            continue  # variables (TOKEN, auth_token), not prose ("the token: ..."); YAML keys: structure_findings
        assignment = re.match(r"[ \t]*[:=][ \t]*(\"[^\"\n]*\"|'[^'\n]*'|[^\s,;)}\]\\]*)", text[name.end() :])
        if assignment and not harmless(assignment.group(1)):
            found.append(f"{name.group(0)} given a literal value")
    return found


def structure_findings(node) -> list[str]:
    """YAML: a secret-ish env entry must come from secretKeyRef; no secret-ish key holds a literal."""
    found = []
    if isinstance(node, dict):
        name = node.get("name")
        if isinstance(name, str) and secretish(name) and ("value" in node or "valueFrom" in node):
            if not harmless(node.get("value", "")) or (
                "valueFrom" in node and "secretKeyRef" not in (node["valueFrom"] or {})
            ):
                found.append(f"env {name} not from a secretKeyRef")
        for key, value in node.items():
            if isinstance(key, str) and secretish(key) and not isinstance(value, dict | list) and not harmless(value):
                found.append(f"{key} given a literal value")
            found += structure_findings(value)
    elif isinstance(node, list):
        for value in node:
            found += structure_findings(value)
    return found


def secret_findings(path: Path) -> list[str]:
    text = path.read_text()
    found = text_findings(text)
    if path.suffix in (".yaml", ".yml"):
        for doc in yaml.safe_load_all(text):
            found += structure_findings(doc)
    return found


def test_no_secret_values_in_infra_or_the_image():
    files = [p for p in sorted(INFRA.rglob("*")) if p.is_file()] + [REPO / "Dockerfile", REPO / ".dockerignore"]
    assert len(files) >= 10
    findings = {str(p.relative_to(REPO)): f for p in files if (f := secret_findings(p))}
    assert findings == {}


def _fake(alphabet: str, n: int) -> str:
    return "".join(alphabet[(7 * i + 3) % len(alphabet)] for i in range(n))


FAKE_KEY = _fake("AbCdEfGhIjKlMnOpQrStUvWxYz0123456789+/", 40)
LEAKS = {
    "yaml literal": f"AWS_SECRET_ACCESS_KEY: {_fake('abcdef123', 12)}\n",
    "env literal": "env:\n  - name: AWS_SECRET_ACCESS_KEY\n    value: hunter2\n",
    "env from a ConfigMap": "env:\n  - name: RAY_AUTH_TOKEN\n    valueFrom:\n      configMapKeyRef: {name: c}\n",
    "kubectl literal": "kubectl create secret generic isa-s3 --from-literal=AWS_SECRET_ACCESS_KEY=hunter2\n",
    "shell export": "export RAY_AUTH_TOKEN=hunter2\n",
    "runtime_env password": "env_vars:\n  MLFLOW_TRACKING_PASSWORD: hunter2\n",
    "AWS key id": "aws_key = " + "AKIA" + _fake("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", 16) + "\n",
    "key-like string": f"# left over: {FAKE_KEY}\n",
    "PEM": "-----BEGIN " + "OPENSSH PRIVATE KEY-----\n",
}
NOT_LEAKS = {
    "kubectl placeholder": "kubectl create secret generic isa-s3 --from-literal=AWS_SECRET_ACCESS_KEY=<your-key>\n",
    "kubectl generated token": 'kubectl create secret generic a --from-literal=auth_token="$(openssl rand -hex 32)"\n',
    "env from a Secret": "env:\n  - name: RAY_AUTH_MODE\n    value: token\n  - name: RAY_AUTH_TOKEN\n"
    "    valueFrom:\n      secretKeyRef: {name: isa-ray-auth, key: auth_token}\n",
    "secret name": "authOptions:\n  mode: token\n  secretName: isa-ray-auth\n",
    "token file path": "file_mounts:\n  ~/.ray/auth_token: ~/.ray/auth_token\n",
    "shell reference": "export RAY_AUTH_TOKEN=$(ray get-auth-token)\n",
}


@pytest.mark.parametrize("case", sorted(LEAKS))
def test_secret_scan_flags_a_literal(case, tmp_path):
    path = tmp_path / "leak.yaml"
    path.write_text(LEAKS[case])
    assert secret_findings(path), case


@pytest.mark.parametrize("case", sorted(NOT_LEAKS))
def test_secret_scan_accepts_references_and_placeholders(case, tmp_path):
    path = tmp_path / "fine.yaml"
    path.write_text(NOT_LEAKS[case])
    assert secret_findings(path) == []
