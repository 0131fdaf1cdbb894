"""The deployment files in infra/ against Ray, KubeRay, Prefect and each other (no cloud, no network).

What `ray up --dry-run` would check without credentials, plus what only this project knows: the
clusters hold configs/cifar10.yaml's training, every node runs the one image with the same Ray, the
run directory is on storage mounted at the same path everywhere, and the work pool is prefect.yaml's.
"""

from __future__ import annotations

import ast
import copy
import json
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from tasks.config import load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
INFRA = REPO_ROOT / "infra"
CLUSTER_AWS = INFRA / "ray" / "cluster-aws.yaml"
RAYCLUSTER = INFRA / "kuberay" / "raycluster.yaml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
WORK_POOL = INFRA / "prefect" / "work-pool.json"
PREFECT_YAML = REPO_ROOT / "prefect.yaml"
CLUSTER_CONFIG = REPO_ROOT / "configs" / "cifar10.yaml"


# ----------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_AWS.read_text())


@pytest.fixture(scope="module")
def k8s_docs() -> list[dict]:
    return [doc for doc in yaml.safe_load_all(RAYCLUSTER.read_text()) if doc is not None]


@pytest.fixture(scope="module")
def raycluster(k8s_docs) -> dict:
    found = [doc for doc in k8s_docs if doc.get("kind") == "RayCluster"]
    assert len(found) == 1, f"{RAYCLUSTER} must hold exactly one RayCluster, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def dockerfile() -> str:
    # Join continuation lines so a RUN spread over several lines is one instruction.
    return re.sub(r"\\\n", " ", DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def work_pool() -> dict:
    return json.loads(WORK_POOL.read_text())


@pytest.fixture(scope="module")
def scaling():
    return load_config(CLUSTER_CONFIG).scaling


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def pinned(requirements: list[str], name: str) -> str:
    for requirement in requirements:
        match = re.fullmatch(rf"{name}==([\w.+-]+)", requirement.replace(" ", ""))
        if match:
            return match.group(1)
    raise AssertionError(f"{name} is not pinned with == in {requirements}")


def dockerfile_arg(text: str, name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)", text, re.MULTILINE)
    assert match, f"{DOCKERFILE} declares no ARG {name}=<default>"
    return match.group(1)


def pod_specs(raycluster: dict) -> dict[str, dict]:
    spec = raycluster["spec"]
    pods = {"head": spec["headGroupSpec"]["template"]["spec"]}
    for group in spec["workerGroupSpecs"]:
        pods[group["groupName"]] = group["template"]["spec"]
    return pods


def ray_container(pod: dict) -> dict:
    """KubeRay runs Ray in the pod's first container."""
    return pod["containers"][0]


def env_of(container: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container.get("env", [])}


def worker_bundles(resources: dict, scaling) -> int:
    """How many Ray Train workers of this scaling config one node with these resources holds."""
    fits = resources.get("CPU", 0) // scaling.cpus_per_worker
    if scaling.use_gpu:
        fits = min(fits, resources.get("GPU", 0) // (scaling.gpus_per_worker or 1))
    return int(fits)


def cluster_image(cluster: dict) -> str:
    docker = cluster["docker"]
    images = {docker.get("head_image", docker["image"]), docker.get("worker_image", docker["image"])}
    assert len(images) == 1, f"head and worker images differ: {images}"
    return images.pop()


def shared_mount(cluster: dict) -> str:
    """The host directory bind-mounted into the container at the same path (-v X:X)."""
    for option in cluster["docker"]["run_options"]:
        match = re.fullmatch(r"(?:-v|--volume)[ =](/\S+):(/\S+)", option)
        if match and match.group(1) == match.group(2):
            return match.group(1)
    raise AssertionError("no shared directory bind-mounted at the same path in docker.run_options")


def pools_started(text: str) -> set[str]:
    return set(re.findall(r"--pool[\s\"',]+([\w.-]+)", text))


# ------------------------------------------------------------------------------------- every file


def test_every_infra_file_parses():
    files = sorted(p for p in INFRA.rglob("*") if p.suffix in {".yaml", ".yml", ".json"})
    expected = {CLUSTER_AWS, RAYCLUSTER, WORK_POOL}
    assert expected <= set(files), f"missing: {sorted(map(str, expected - set(files)))}"
    for path in files:
        if path.suffix == ".json":
            assert isinstance(json.loads(path.read_text()), dict), path
        else:
            docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
            assert docs and all(isinstance(doc, dict) for doc in docs), f"{path}: not a mapping"


# -------------------------------------------------------------------------- Ray cluster launcher


def test_cluster_yaml_matches_ray_schema(cluster):
    jsonschema.validate(cluster, ray_schema())


def test_cluster_yaml_passes_ray_config_validation(cluster):
    """What `ray up` does before it talks to AWS: fill in the provider defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["docker"]["image"] == cluster["docker"]["image"]


def test_ray_validation_rejects_broken_copies(cluster):
    """The two checks above are live: they fail on an unknown key and on a dangling head type."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    typo = copy.deepcopy(cluster)
    typo["available_node_types"]["head"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(typo, ray_schema())
    dangling = copy.deepcopy(cluster)
    dangling["head_node_type"] = "no-such-type"
    with pytest.raises((ValueError, KeyError, AssertionError)):
        validate_config(prepare_config(dangling))


def test_cluster_node_types(cluster):
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    assert not re.match(r"(g|p)\d", head["node_config"]["InstanceType"]), "the head should not be a GPU instance"
    for name, node_type in types.items():
        assert node_type["node_config"].get("InstanceType"), f"{name}: no InstanceType"
        # Declared, not auto-detected, so the sizes below are what Ray will schedule against.
        assert "CPU" in node_type["resources"], f"{name}: resources must declare CPU"
        if name != cluster["head_node_type"]:
            assert node_type.get("min_workers", 0) <= node_type.get("max_workers", 0), name
    assert sum(t.get("min_workers", 0) for t in types.values()) <= cluster["max_workers"]


# Instance sizes Ray may not advertise beyond what the machine has.
INSTANCE_SIZES = {
    "m5.2xlarge": {"CPU": 8, "GPU": 0},
    "g5.xlarge": {"CPU": 4, "GPU": 1},
    "g5.2xlarge": {"CPU": 8, "GPU": 1},
    "g5.4xlarge": {"CPU": 16, "GPU": 1},
    "g5.12xlarge": {"CPU": 48, "GPU": 4},
    "p4d.24xlarge": {"CPU": 96, "GPU": 8},
}


def test_declared_resources_fit_the_instances(cluster):
    for name, node_type in cluster["available_node_types"].items():
        instance = node_type["node_config"]["InstanceType"]
        assert instance in INSTANCE_SIZES, f"{name}: add {instance}'s vCPUs and GPUs to INSTANCE_SIZES"
        for resource, amount in node_type["resources"].items():
            if resource in INSTANCE_SIZES[instance]:
                assert amount <= INSTANCE_SIZES[instance][resource], f"{name}: {instance} has no {amount} {resource}"


def test_cluster_holds_the_cifar10_training(cluster, scaling):
    """num_workers workers of cpus_per_worker CPUs and gpus_per_worker GPUs fit on one worker type at its
    max_workers (one DDP job on one GPU model), within the global max_workers."""
    assert scaling.use_gpu and scaling.gpus_per_worker >= 1, "configs/cifar10.yaml is the GPU experiment"
    enabled = {
        name: node_type for name, node_type in cluster["available_node_types"].items()
        if name != cluster["head_node_type"] and node_type.get("max_workers", cluster["max_workers"]) > 0
    }
    assert enabled, "no worker node type can be launched"
    capacity = {}
    for name, node_type in enabled.items():
        per_node = worker_bundles(node_type["resources"], scaling)
        assert per_node >= 1, f"{name} ({node_type['resources']}) cannot hold one worker of {scaling}"
        nodes = min(node_type.get("max_workers", cluster["max_workers"]), cluster["max_workers"])
        capacity[name] = per_node * nodes
    assert max(capacity.values()) >= scaling.num_workers, (
        f"at most {max(capacity.values())} workers fit, configs/cifar10.yaml asks for {scaling.num_workers}"
    )
    gpus = max(
        enabled[name]["resources"].get("GPU", 0) * min(enabled[name].get("max_workers", 0), cluster["max_workers"])
        for name in enabled
    )
    assert gpus >= scaling.num_workers * scaling.gpus_per_worker


def test_cluster_aws_names_agree(cluster):
    """One region and one account throughout: registry, IAM profiles, EFS, ECR login, secrets."""
    text = CLUSTER_AWS.read_text()
    region = cluster["provider"]["region"]
    regions = set(re.findall(r"\.([a-z]{2}-[a-z]+-\d)\.amazonaws\.com", text))
    regions |= set(re.findall(r"--region[ =]([a-z]{2}-[a-z]+-\d)", text))
    assert regions == {region}, f"AWS names in {regions}, provider.region is {region}"
    for zone in cluster["provider"].get("availability_zone", "").split(","):
        assert zone.startswith(region), zone
    image_account = re.match(r"(\d{12})\.dkr\.ecr\.", cluster_image(cluster))
    assert image_account, "the image is expected in the account's ECR"
    accounts = set(re.findall(r"arn:aws:iam::(\d{12}):", text)) | set(re.findall(r"(\d{12})\.dkr\.ecr\.", text))
    assert accounts == {image_account.group(1)}, f"several AWS accounts: {accounts}"


def test_cluster_file_mounts_and_env_file(cluster):
    for remote, local in cluster.get("file_mounts", {}).items():
        assert remote.startswith("/"), remote
        assert (REPO_ROOT / local).exists(), f"file_mounts {remote}: {local} is not in the repository"
    init = "\n".join(cluster["initialization_commands"])
    env_files = [option.split()[-1] for option in cluster["docker"]["run_options"] if option.startswith("--env-file")]
    assert env_files, "W&B/Prefect settings must reach the containers (docker --env-file)"
    for env_file in env_files:
        assert f"> {env_file}" in init, f"{env_file} is passed to docker but never written"


def test_cluster_shared_storage_is_mounted(cluster):
    mount = shared_mount(cluster)
    init = "\n".join(cluster["initialization_commands"])
    assert re.search(rf"mount\b.*\s{re.escape(mount)}\b", init, re.DOTALL), f"{mount} is never mounted on the host"
    assert f"mountpoint -q {mount}" in init, "re-running set-up must not mount twice"


def test_gpu_worker_types_check_their_gpus(cluster):
    for name, node_type in cluster["available_node_types"].items():
        if node_type["resources"].get("GPU", 0):
            checks = " ".join(node_type.get("worker_setup_commands", []))
            assert "torch.cuda" in checks, f"{name}: no GPU check in its worker_setup_commands"


# ---------------------------------------------------------------------------------------- KubeRay


def test_raycluster_kind_and_groups(raycluster, k8s_docs):
    assert raycluster["apiVersion"] == "ray.io/v1"
    spec = raycluster["spec"]
    assert spec["headGroupSpec"]["template"]["spec"]["containers"]
    assert spec["workerGroupSpecs"], "no worker group"
    for doc in k8s_docs:
        assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), doc
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        for key, value in group.get("rayStartParams", {}).items():
            assert isinstance(value, str), f"rayStartParams.{key} must be a string for KubeRay, got {value!r}"


def test_raycluster_gpu_workers_hold_the_cifar10_training(raycluster, scaling):
    capacity = {}
    for group in raycluster["spec"]["workerGroupSpecs"]:
        container = ray_container(group["template"]["spec"])
        limits, requests = container["resources"]["limits"], container["resources"].get("requests", {})
        gpus = int(limits.get("nvidia.com/gpu", 0))
        assert gpus >= scaling.gpus_per_worker, f"{group['groupName']}: nvidia.com/gpu limit {gpus}"
        assert int(requests.get("nvidia.com/gpu", gpus)) == gpus, "GPU requests must equal limits"
        cpus = float(str(limits["cpu"]).removesuffix("m")) / (1000 if str(limits["cpu"]).endswith("m") else 1)
        per_pod = worker_bundles({"CPU": cpus, "GPU": gpus}, scaling)
        assert per_pod >= 1, f"{group['groupName']}: {cpus} CPUs / {gpus} GPUs cannot hold one worker"
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        capacity[group["groupName"]] = per_pod * group["maxReplicas"]
    assert max(capacity.values()) >= scaling.num_workers, capacity
    head = ray_container(raycluster["spec"]["headGroupSpec"]["template"]["spec"])
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {}), "the head needs no GPU"


def test_one_image_and_one_ray_everywhere(raycluster, cluster, dockerfile):
    images = {c["image"] for pod in pod_specs(raycluster).values() for c in pod["containers"]}
    assert images == {cluster_image(cluster)}, f"KubeRay images {images} vs cluster launcher {cluster_image(cluster)}"
    assert raycluster["spec"]["rayVersion"] == dockerfile_arg(dockerfile, "RAY_VERSION")


def test_image_tag_is_the_project_version(cluster, pyproject):
    assert cluster_image(cluster).rsplit(":", 1)[1] == pyproject["project"]["version"]


def test_raycluster_shared_volume(raycluster, k8s_docs, cluster):
    claims = {doc["metadata"]["name"]: doc for doc in k8s_docs if doc["kind"] == "PersistentVolumeClaim"}
    path = shared_mount(cluster)
    for name, pod in pod_specs(raycluster).items():
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert path in mounts, f"{name}/{container['name']}: {path} not mounted"
            claim = volumes[mounts[path]]["persistentVolumeClaim"]["claimName"]
            assert claim in claims, f"claim {claim} is not defined in {RAYCLUSTER}"
            assert "ReadWriteMany" in claims[claim]["spec"]["accessModes"], "every pod writes the run directory"


def test_raycluster_env_from_secret(raycluster):
    pods = pod_specs(raycluster)
    for name, pod in pods.items():
        env = env_of(ray_container(pod))
        assert "secretKeyRef" in env["WANDB_API_KEY"]["valueFrom"], f"{name}: WANDB_API_KEY must come from a Secret"
        assert not any(item.get("value") for key, item in env.items() if key.endswith("_KEY")), "no literal keys"
    prefect = [c for c in pods["head"]["containers"] if "prefect" in " ".join(c.get("command", []))]
    assert prefect, "no Prefect worker in the head pod"
    env = env_of(prefect[0])
    assert "secretKeyRef" in env["PREFECT_API_URL"]["valueFrom"]
    assert env["RAY_ADDRESS"]["value"].startswith("ray://")
    client_port = {p["name"]: p["containerPort"] for p in ray_container(pods["head"])["ports"]}["client"]
    assert env["RAY_ADDRESS"]["value"].endswith(f":{client_port}")


# ----------------------------------------------------------------------------------------- Docker


def test_dockerfile_pins_torch_like_pyproject(dockerfile, pyproject):
    dependencies = pyproject["project"]["dependencies"]
    torch, torchvision = pinned(dependencies, "torch"), pinned(dependencies, "torchvision")
    runs = re.findall(r"^RUN (.*)$", dockerfile, re.MULTILINE)
    torch_step = next(i for i, run in enumerate(runs) if "torch==" in run)
    assert re.search(rf"\bpip install torch=={re.escape(torch)} torchvision=={re.escape(torchvision)}\b",
                     runs[torch_step]), runs[torch_step]
    project_step = next(i for i, run in enumerate(runs) if re.search(r"pip install (\S+ )*\.(\s|$)", run))
    assert torch_step < project_step, "torch must be installed before the project"


def test_dockerfile_python_user_and_home(dockerfile, pyproject, work_pool):
    base = re.search(r"^FROM (\S+)", dockerfile, re.MULTILINE).group(1)
    minimum = pyproject["project"]["requires-python"].removeprefix(">=")
    assert re.search(r"python:(\d+\.\d+)", base), base
    assert tuple(map(int, re.search(r"python:(\d+\.\d+)", base).group(1).split("."))) >= tuple(
        map(int, minimum.split(".")))
    users = re.findall(r"^USER (\S+)", dockerfile, re.MULTILINE)
    assert users and users[-1] not in {"root", "0"}, "the image must run as a non-root user"
    home = work_pool["variables"]["properties"]["env"]["default"]["VIT_PIPELINE_HOME"]
    assert re.search(rf"^WORKDIR {re.escape(home)}$", dockerfile, re.MULTILINE), f"project not at {home}"
    copied = {Path(src).name for line in re.findall(r"^COPY (.*)$", dockerfile, re.MULTILINE)
              for src in line.split()[:-1] if not src.startswith("--")}
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages | {"configs", "pyproject.toml", "README.md"} <= copied, f"image lacks {packages - copied}"


def test_dockerignore_keeps_local_state_out():
    ignored = set((REPO_ROOT / ".dockerignore").read_text().split())
    assert {".venv", "runs", "data", ".git"} <= ignored


# ---------------------------------------------------------------------------------------- Prefect


def test_work_pool_is_a_process_base_job_template(work_pool):
    from prefect.server.schemas.actions import validate_base_job_template
    from prefect.workers.process import ProcessWorker

    assert set(work_pool) == {"job_configuration", "variables"}
    validate_base_job_template(work_pool)
    default = ProcessWorker.get_default_base_job_template()
    assert work_pool["job_configuration"] == default["job_configuration"]
    assert set(default["variables"]["properties"]) <= set(work_pool["variables"]["properties"])


def test_work_pool_renders_the_cluster_env(work_pool):
    from prefect.utilities.templating import apply_values
    from prefect.workers.process import ProcessJobConfiguration

    defaults = {key: prop["default"] for key, prop in work_pool["variables"]["properties"].items() if "default" in prop}
    rendered = ProcessJobConfiguration(**apply_values(work_pool["job_configuration"], defaults))
    assert rendered.env["RAY_ADDRESS"].startswith("ray://"), rendered.env.get("RAY_ADDRESS")
    assert rendered.env["VIT_PIPELINE_HOME"].startswith("/")
    assert not any("KEY" in key for key in work_pool["variables"]["properties"]["env"]["default"]), "no secrets"


@pytest.fixture(scope="module")
def deployments() -> list[dict]:
    deployments = yaml.safe_load(PREFECT_YAML.read_text())["deployments"]
    assert deployments
    return deployments


def test_one_work_pool_name(deployments, cluster, raycluster):
    readme = (INFRA / "README.md").read_text()
    created = set(re.findall(r"prefect work-pool create ([\w.-]+)", readme))
    assert len(created) == 1, f"infra/README.md creates {created or 'no'} work pool(s)"
    (pool,) = created
    assert pools_started("\n".join(cluster["head_start_ray_commands"])) == {pool}
    assert pools_started(json.dumps(raycluster)) == {pool}
    for deployment in deployments:
        assert deployment["work_pool"]["name"] == pool, deployment["name"]


def test_deployments_point_at_real_files(deployments):
    for deployment in deployments:
        path, _, function = deployment["entrypoint"].partition(":")
        source = REPO_ROOT / path
        assert source.is_file(), f"{deployment['name']}: {path} does not exist"
        names = {node.name for node in ast.parse(source.read_text()).body if isinstance(node, ast.FunctionDef)}
        assert function in names, f"{deployment['name']}: no function {function} in {path}"
        config_file = deployment.get("parameters", {}).get("config_file")
        if config_file:
            assert (REPO_ROOT / config_file).is_file(), f"{deployment['name']}: {config_file} does not exist"


def test_pull_step_uses_the_pool_home(work_pool):
    steps = yaml.safe_load(PREFECT_YAML.read_text())["pull"]
    directories = [s["prefect.deployments.steps.set_working_directory"]["directory"] for s in steps
                   if "prefect.deployments.steps.set_working_directory" in s]
    variables = {m for d in directories for m in re.findall(r"\{\{\s*\$(\w+)\s*\}\}", d)}
    assert variables, "prefect.yaml's pull step does not take its directory from the environment"
    assert variables <= set(work_pool["variables"]["properties"]["env"]["default"])
