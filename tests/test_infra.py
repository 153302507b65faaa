"""infra/: the cluster-launcher configs against Ray's own schema and config preparation, the KubeRay RayJob,
the image recipe and its pinned requirements."""

import json
import re
import shlex
from importlib.metadata import version
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
CLUSTER_CONFIGS = sorted(p for p in INFRA.glob("*.yaml") if "provider" in next(yaml.safe_load_all(p.read_text())))


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_there_are_aws_gcp_and_local_configs():
    providers = {load(p)["provider"]["type"] for p in CLUSTER_CONFIGS}
    assert providers == {"aws", "gcp", "local"}


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=lambda p: p.name)
def test_cluster_config_passes_rays_validation(path):
    raw = load(path)
    jsonschema.validate(raw, json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text()))
    # What `ray up` does before anything else: merge the provider's defaults, fill the node types, validate.
    validate_config(prepare_config(raw))


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=lambda p: p.name)
def test_cluster_config_installs_the_project_and_secures_the_cluster(path):
    config = prepare_config(load(path))
    commands = [c for key in ("initialization_commands", "head_setup_commands", "worker_setup_commands",
                              "head_start_ray_commands", "worker_start_ray_commands") for c in config[key]]
    # Nothing of Ray's defaults slips in: a nightly Ray wheel, or a dashboard on every interface.
    assert not any("ray-wheels" in c or "pip install -U" in c for c in commands), commands
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    # Every node gets the cluster token at Ray's default path, and runs with RAY_AUTH_MODE=token.
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    if config.get("docker"):
        assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
        assert re.fullmatch(r"REGISTRY/sau:GIT_SHA", config["docker"]["image"])  # one pinned image everywhere
        assert config["setup_commands"] == [] and config["worker_setup_commands"] == []
    else:
        setup = " ".join(config["setup_commands"])
        assert "RAY_AUTH_MODE=token" in setup and "-c ~/sau/infra/requirements.lock ~/sau" in setup
        assert config["file_mounts"]["~/sau"] == "."
    # The head runs the MLflow server; the data sets are at ~/data on every node.
    assert any("mlflow server" in c for c in config["head_setup_commands"])
    data = config["file_mounts"].get("~/data") or next(
        o for o in config["docker"]["run_options"] if o.endswith(":/home/ray/data:ro"))
    assert data


@pytest.mark.parametrize("path", [p for p in CLUSTER_CONFIGS if load(p)["provider"]["type"] != "local"],
                         ids=lambda p: p.name)
def test_cloud_configs_have_a_cpu_head_and_gpu_spot_workers_from_zero(path):
    config = prepare_config(load(path))
    assert config["provider"]["use_internal_ips"] is True  # no public address for SSH
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0} and head["max_workers"] == 0
    (gpu,) = [t for name, t in types.items() if name != config["head_node_type"]]
    assert gpu["min_workers"] == 0 and gpu["resources"]["GPU"] >= 1
    node = gpu["node_config"]
    spot = node.get("InstanceMarketOptions", {}).get("MarketType") == "spot" or {"preemptible": True} in node.get(
        "scheduling", [])
    assert spot, node


def test_rayjob_runs_one_grid_on_a_gpu_worker_group():
    job, service = yaml.safe_load_all((INFRA / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["sau", "run"]
    grid = Path(argv[2])  # in the image the repository is at /home/ray/sau (infra/Dockerfile's WORKDIR)
    assert grid.is_relative_to("/home/ray/sau") and (REPO / grid.relative_to("/home/ray/sau")).is_file()
    assert argv[argv.index("--storage") + 1].startswith("s3://") and "--resume" in argv
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == version("ray") and cluster["authOptions"] == {"mode": "token"}
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    (gpu,) = cluster["workerGroupSpecs"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1 and "rayStartParams" in gpu
    (worker,) = gpu["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    images = {c["image"] for group in (head, gpu) for c in group["template"]["spec"]["containers"]}
    assert images == {"REGISTRY/sau:GIT_SHA"}
    # The trials reach the head pod's MLflow server through the Service the entrypoint names.
    (mlflow,) = [c for c in head["template"]["spec"]["containers"] if c["name"] == "mlflow"]
    assert service["kind"] == "Service" and "type" not in service["spec"]  # ClusterIP: not outside the cluster
    selector = service["spec"]["selector"]
    assert selector == {**head["template"]["metadata"]["labels"], "ray.io/node-type": "head"}
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == mlflow["ports"][0]["containerPort"]
    assert argv[argv.index("--tracking-uri") + 1] == f"http://{service['metadata']['name']}:{port['port']}"


def test_dockerfile_copies_what_exists_and_installs_with_the_lock():
    lines = (INFRA / "Dockerfile").read_text().splitlines()
    for line in lines:
        if line.startswith("COPY"):
            sources = [a for a in line.split()[1:-1] if not a.startswith("--")]
            assert all((REPO / s).exists() for s in sources), line
    assert any("pip install" in line and "-c infra/requirements.lock ." in line for line in lines)
    base = next(line.split("=", 1)[1] for line in lines if line.startswith("ARG BASE="))
    assert base.startswith(f"rayproject/ray:{version('ray')}-py311")


def test_lock_pins_every_dependency_within_pyproject():
    lock = {}
    for line in (INFRA / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, pinned = line.partition("==")
            lock[canonicalize_name(name)] = pinned
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for text in project["dependencies"]:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in lock and requirement.specifier.contains(lock[name], prereleases=True), text
