"""The deployment files in infra/ against Ray, KubeRay, Prefect and each other (no cloud, no network).

What `ray up --dry-run` would check without credentials, plus what only this project knows: the
clusters hold configs/cifar10.yaml's training, every node runs the one image with the same Ray, the
run directory is on storage mounted at the same path everywhere, and the work pool is prefect.yaml's.
The `docker run` lines are built by Ray's own DockerCommandRunner against a simulated host; the host
set-up commands that read secrets run here against a stand-in `aws`.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import re
import shutil
import signal
import subprocess
import time
import tomllib
from importlib.metadata import version as installed_version
from pathlib import Path

import jsonschema
import pytest
import yaml

from tasks.config import load_config

REPO_ROOT = Path(__file__).resolve().parents[2]
INFRA = REPO_ROOT / "infra"
CLUSTER_AWS = INFRA / "ray" / "cluster-aws.yaml"
RAYCLUSTER = INFRA / "kuberay" / "raycluster.yaml"
SHARED_VOLUME = INFRA / "kuberay" / "shared-volume.yaml"
GPU_NODEPOOL = INFRA / "kuberay" / "gpu-nodepool.yaml"
EFS_STORAGECLASS = INFRA / "kuberay" / "efs-storageclass.yaml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
LOCK = INFRA / "docker" / "requirements.lock"
WORKER_UNIT = INFRA / "ray" / "prefect-worker.service"
WORKER_SCRIPT = INFRA / "ray" / "prefect-worker.sh"
WORK_POOL = INFRA / "prefect" / "work-pool.json"
PREFECT_YAML = REPO_ROOT / "prefect.yaml"
CLUSTER_CONFIG = REPO_ROOT / "configs" / "cifar10.yaml"


# ----------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_AWS.read_text())


def manifest(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@pytest.fixture(scope="module")
def k8s_docs() -> list[dict]:
    return manifest(RAYCLUSTER) + manifest(SHARED_VOLUME)


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


def all_containers(pod: dict) -> list[dict]:
    """The pod's containers and its init containers (native sidecars among them)."""
    return [*pod["containers"], *pod.get("initContainers", [])]


def sidecar(pods: dict[str, dict], name: str) -> dict:
    (found,) = [c for c in pods["head"].get("initContainers", []) if c["name"] == name]
    return found


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


class SimulatedHost:
    """What Ray's DockerCommandRunner asks a node over SSH, answered like an AWS node with Docker, the
    NVIDIA container toolkit and (`gpu`) a working nvidia-smi. Records every command."""

    ssh_user = "ubuntu"

    def __init__(self, cluster_name: str, *, gpu: bool):
        self.cluster_name, self.gpu, self.commands = cluster_name, gpu, []

    def run(self, cmd, with_output=False, **kwargs):
        self.commands.append(cmd)
        if cmd.strip() == "nvidia-smi" and not self.gpu:
            raise RuntimeError("NVIDIA-SMI has failed: no devices were found")
        answers = {
            "command -v": b"/usr/bin/docker",
            "{{.Runtimes}}": b"map[io.containerd.runc.v2:{} nvidia:{nvidia-container-runtime [] <nil>} runc:{}]",
            ".Config.Env": b'["PATH=/usr/local/bin:/usr/bin", "HOME=/home/ray"]',
            "/proc/meminfo": b"MemTotal: 32000000 kB\nMemAvailable: 30000000 kB",
        }
        return next((answer for key, answer in answers.items() if key in cmd), b"")


def docker_run_line(cluster: dict, node_type: str, *, gpu: bool, runtime_detected: bool = True) -> str:
    """The `docker run` Ray issues when it sets up a node of this type: `ray up` gives the head the top-level
    docker section; the autoscaler gives a worker the top-level section updated with its node type's."""
    from ray.autoscaler._private.command_runner import DockerCommandRunner
    from ray.autoscaler._private.util import prepare_config
    from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig

    as_head = node_type == cluster["head_node_type"]
    docker = copy.deepcopy(cluster["docker"]) if as_head else AutoscalingConfig(
        prepare_config(copy.deepcopy(cluster))).get_docker_config(node_type)
    docker["disable_automatic_runtime_detection"] = not runtime_detected
    runner = DockerCommandRunner(docker, log_prefix="", node_id="i-0", provider=None, auth_config=cluster["auth"],
                                 cluster_name=cluster["cluster_name"], process_runner=None, use_internal_ip=True)
    runner.ssh_command_runner = host = SimulatedHost(cluster["cluster_name"], gpu=gpu)
    runner.run_init(as_head=as_head, file_mounts=cluster["file_mounts"], sync_run_yet=True)
    (line,) = [command for command in host.commands if command.startswith("docker run ")]
    return line


def image_env(dockerfile_text: str) -> dict[str, str]:
    env = {}
    for instruction in re.findall(r"^ENV (.*)$", dockerfile_text, re.MULTILINE):
        env.update(re.findall(r"(\w+)=(\S+)", instruction))
    return env


def host_commands(cluster: dict, node_type: str) -> list[str]:
    """What runs on the node's host before its container starts (the head: the top-level list)."""
    if node_type == cluster["head_node_type"]:
        return cluster["initialization_commands"]
    return cluster["available_node_types"][node_type].get("initialization_commands", cluster["initialization_commands"])


def gpu_types(cluster: dict) -> list[str]:
    return [name for name, node in cluster["available_node_types"].items() if node["resources"].get("GPU", 0)]


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
    env_files = [option.split()[-1] for option in cluster["docker"]["run_options"] if option.startswith("--env-file")]
    assert env_files, "the cluster's secrets must reach the containers (docker --env-file)"
    for node_type in cluster["available_node_types"]:
        init = "\n".join(host_commands(cluster, node_type))
        for env_file in env_files:
            assert f"> {env_file}" in init, f"{node_type}: {env_file} is passed to docker but never written"


def test_cluster_shared_storage_is_mounted(cluster):
    mount = shared_mount(cluster)
    for node_type in cluster["available_node_types"]:
        init = "\n".join(host_commands(cluster, node_type))
        assert re.search(rf"mount\b.*\s{re.escape(mount)}\b", init, re.DOTALL), f"{node_type}: {mount} never mounted"
        assert f"mountpoint -q {mount}" in init, "re-running set-up must not mount twice"


def test_gpu_worker_types_check_their_gpus(cluster):
    for name in gpu_types(cluster):
        checks = " ".join(cluster["available_node_types"][name].get("worker_setup_commands", []))
        assert "torch.cuda" in checks, f"{name}: no GPU check in its worker_setup_commands"


@pytest.mark.parametrize("runtime_detected", [True, False])
def test_gpu_nodes_get_their_gpus(cluster, dockerfile, runtime_detected):
    """Ray adds only --runtime=nvidia (and only when nvidia-smi answered at that moment); that runtime exposes
    the GPUs NVIDIA_VISIBLE_DEVICES names. Either way the container must see the host's GPUs."""
    env = image_env(dockerfile)
    for name in gpu_types(cluster):
        line = docker_run_line(cluster, name, gpu=True, runtime_detected=runtime_detected)
        by_flag = "--gpus all" in line
        by_runtime = "--runtime=nvidia" in line and env.get("NVIDIA_VISIBLE_DEVICES") == "all" and "compute" in env.get(
            "NVIDIA_DRIVER_CAPABILITIES", "")
        assert by_flag or by_runtime, f"{name}: the container sees no GPU: {line}"
        assert by_flag and (by_runtime or not runtime_detected), f"{name}: both ways, for either Ray behaviour: {line}"


def test_the_head_container_asks_for_no_gpu(cluster):
    """--gpus on a CPU instance makes `docker run` fail; the head is an m5."""
    line = docker_run_line(cluster, cluster["head_node_type"], gpu=False)
    assert "--gpus" not in line and "--runtime=nvidia" not in line
    assert cluster_image(cluster) in line


def test_every_ray_container_uses_token_auth(cluster):
    for name in cluster["available_node_types"]:
        line = docker_run_line(cluster, name, gpu=name in gpu_types(cluster))
        assert "-e RAY_AUTH_MODE=token" in line, f"{name}: {line}"
        (env_file,) = re.findall(r"--env-file (\S+)", line)
        init = "\n".join(host_commands(cluster, name))
        assert re.search(rf"grep -q '\^RAY_AUTH_TOKEN=\.' {re.escape(env_file)}", init), (
            f"{name}: {env_file} is not checked for RAY_AUTH_TOKEN")


def test_dashboard_only_on_loopback(cluster, raycluster):
    text = CLUSTER_AWS.read_text() + RAYCLUSTER.read_text()
    assert not re.search(r"dashboard-host\W+0\.0\.0\.0", text)
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert raycluster["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"


def test_nodes_have_private_addresses_and_a_closed_security_group(cluster):
    """Ray's own security group admits SSH from anywhere; it creates none when every node type names one."""
    from ray.autoscaler._private.aws.config import _configure_security_group

    assert cluster["provider"]["use_internal_ips"] is True
    for name, node_type in cluster["available_node_types"].items():
        node_config = node_type["node_config"]
        assert node_config.get("SubnetIds") and node_config.get("SecurityGroupIds"), name
        assert "NetworkInterfaces" not in node_config, name
    configured = _configure_security_group(copy.deepcopy(cluster))  # returns before any AWS call
    assert configured["available_node_types"] == cluster["available_node_types"]
    assert "security_group" not in cluster["provider"]


def test_the_ami_is_pinned(cluster):
    for name, node_type in cluster["available_node_types"].items():
        assert re.fullmatch(r"ami-[0-9a-f]{8,17}", node_type["node_config"]["ImageId"]), (
            f"{name}: ImageId must be a fixed AMI id, not {node_type['node_config']['ImageId']}")


def _run_host_command(command: str, tmp_path: Path, secret: str | None) -> subprocess.CompletedProcess:
    """Run a host set-up command with a stand-in `aws` (the secret's value, or "not found") and `sudo`,
    its paths moved under tmp_path."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (tmp_path / "secret").write_text(secret or "")
    fake_aws = ("#!/bin/sh\n"
                f"[ -s {tmp_path}/secret ] || {{ echo 'ResourceNotFoundException' >&2; exit 254; }}\n"
                f"cat {tmp_path}/secret\n")
    (bin_dir / "aws").write_text(fake_aws)
    (bin_dir / "sudo").write_text('#!/bin/sh\nexec "$@"\n')
    for tool in ("aws", "sudo"):
        (bin_dir / tool).chmod(0o755)
    for path in ("/home/ubuntu", "/etc/vit-pipeline"):
        command = command.replace(path, str(tmp_path / path.strip("/")))
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=30)


def _secret_commands(cluster: dict, node_type: str) -> dict[str, str]:
    return {re.search(r"--secret-id (\S+)", command).group(1): command
            for command in host_commands(cluster, node_type) if "secretsmanager" in command}


def test_secrets_only_where_needed(cluster):
    """Every node: the Ray token and W&B key. The head alone: the Prefect API key, for the worker alone."""
    assert set(_secret_commands(cluster, cluster["head_node_type"])) == {"vit-pipeline/cluster-env",
                                                                       "vit-pipeline/prefect-env"}
    for name in gpu_types(cluster):
        assert set(_secret_commands(cluster, name)) == {"vit-pipeline/cluster-env"}, name
    unit = WORKER_UNIT.read_text()
    (prefect_env,) = re.findall(r"tee (/etc/vit-pipeline/\S+)", _secret_commands(
        cluster, cluster["head_node_type"])["vit-pipeline/prefect-env"])
    assert f"--env-file {prefect_env}" in unit
    assert prefect_env not in json.dumps(cluster["docker"]), "the Prefect key must not be in the Ray container's env"


@pytest.mark.parametrize("secret_id", ["vit-pipeline/cluster-env", "vit-pipeline/prefect-env"])
def test_a_missing_secret_fails_the_node_start(cluster, tmp_path, secret_id):
    command = _secret_commands(cluster, cluster["head_node_type"])[secret_id]
    missing = _run_host_command(command, tmp_path, None)
    assert missing.returncode != 0 and secret_id in missing.stderr, missing
    key = "RAY_AUTH_TOKEN" if secret_id.endswith("cluster-env") else "PREFECT_API_URL"
    incomplete = _run_host_command(command, tmp_path, "WANDB_API_KEY=abc\n")
    assert incomplete.returncode != 0 and key in incomplete.stderr, incomplete
    complete = _run_host_command(command, tmp_path, f"{key}=s3cr3t\nWANDB_API_KEY=abc\n")
    assert complete.returncode == 0, complete
    (written,) = [path for path in tmp_path.rglob("*.env")]
    assert written.read_text().startswith(f"{key}=s3cr3t") and written.stat().st_mode & 0o077 == 0


# ------------------------------------------------------------------- the Prefect worker on the head


def _unit(text: str) -> dict[str, list[str]]:
    entries: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            entries.setdefault(key, []).append(value)
    return entries


def test_the_prefect_worker_is_a_supervised_systemd_unit_inside_the_head_container(cluster):
    unit = _unit(WORKER_UNIT.read_text())
    assert unit["Restart"] == ["always"] and unit["WantedBy"] == ["multi-user.target"]
    (start,) = unit["ExecStart"]
    container = cluster["docker"]["container_name"]
    assert re.search(rf"docker exec .*-e RAY_ADDRESS=auto {container} bash /app/infra/ray/prefect-worker.sh$", start)
    assert unit["ExecStop"] == [f"/usr/bin/docker exec {container} bash /app/infra/ray/prefect-worker.sh stop"]
    assert "prefect worker" not in " ".join(cluster["head_start_ray_commands"]), "one supervisor only: systemd"
    head_init = "\n".join(host_commands(cluster, cluster["head_node_type"]))
    assert "systemctl enable vit-pipeline-prefect-worker" in head_init
    assert "systemctl restart --no-block vit-pipeline-prefect-worker" in head_init
    for name in gpu_types(cluster):
        assert "prefect" not in "\n".join(host_commands(cluster, name)), name


def test_the_unit_and_script_reach_the_head_where_ray_syncs_them(cluster):
    """The head installs the unit from the host side of the /app/infra file mount, as `docker run` mounts it."""
    line = docker_run_line(cluster, cluster["head_node_type"], gpu=False)
    (host_infra,) = re.findall(r"-v (\S+):/app/infra ", line)
    installed = re.search(r"sudo install -m 0644 (\S+) ", "\n".join(cluster["initialization_commands"])).group(1)
    assert os.path.normpath(installed) == os.path.normpath(f"{host_infra}/ray/{WORKER_UNIT.name}")
    assert cluster["file_mounts"]["/app/infra"] == "./infra" and WORKER_SCRIPT.is_file()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_unit_file_parses(tmp_path):
    target = tmp_path / "vit-pipeline-prefect-worker.service"
    shutil.copy(WORKER_UNIT, target)
    result = subprocess.run(["systemd-analyze", "verify", str(target)], capture_output=True, text=True)
    # This machine has no docker.service; what matters is that systemd understood every line.
    problems = [line for line in result.stderr.splitlines()
                if re.search(r"(?i)unknown|invalid|failed to parse|missing '='|bad ", line)]
    assert problems == []


def test_a_second_worker_start_stops_the_first(tmp_path):
    """What a second `ray up`, or systemd restarting the unit, does: exactly one worker keeps running."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "prefect").write_text("#!/bin/sh\nexec sleep 300\n")
    (bin_dir / "prefect").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PREFECT_API_URL": "http://api",
           "RAY_AUTH_TOKEN": "t", "VIT_PIPELINE_WORKER_PIDFILE": str(tmp_path / "worker.pid")}
    first = subprocess.Popen(["bash", str(WORKER_SCRIPT)], env=env)
    second = None
    try:
        deadline = time.monotonic() + 10
        while not (tmp_path / "worker.pid").is_file():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        second = subprocess.Popen(["bash", str(WORKER_SCRIPT)], env=env)
        assert first.wait(timeout=30) == -signal.SIGTERM
        deadline = time.monotonic() + 10
        while (tmp_path / "worker.pid").read_text().strip() != str(second.pid):
            assert second.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        stopper = subprocess.Popen(["bash", str(WORKER_SCRIPT), "stop"], env=env)
        assert second.wait(timeout=30) == -signal.SIGTERM and stopper.wait(timeout=30) == 0
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


def test_the_worker_refuses_to_start_without_its_settings(tmp_path):
    env = {key: value for key, value in os.environ.items() if key not in ("PREFECT_API_URL", "RAY_AUTH_TOKEN")}
    env["VIT_PIPELINE_WORKER_PIDFILE"] = str(tmp_path / "worker.pid")
    result = subprocess.run(["bash", str(WORKER_SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "vit-pipeline/prefect-env" in result.stderr


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
    images = {c["image"] for pod in pod_specs(raycluster).values() for c in all_containers(pod)}
    assert images == {cluster_image(cluster)}, f"KubeRay images {images} vs cluster launcher {cluster_image(cluster)}"
    assert raycluster["spec"]["rayVersion"] == dockerfile_arg(dockerfile, "RAY_VERSION") == locked()["ray"]


def test_the_image_tag_names_version_and_commit(cluster, pyproject):
    """A new build never overwrites the tag nodes are running: the tag is <version>-<12 hex of the commit>."""
    tag = cluster_image(cluster).rsplit(":", 1)[1]
    assert re.fullmatch(rf"{re.escape(pyproject['project']['version'])}-[0-9a-f]{{12}}", tag), tag
    build = (INFRA / "docker" / "build.sh").read_text()
    assert "$version-${commit:0:12}" in build and "git status --porcelain" in build


def test_kuberay_volume_in_its_own_manifest(raycluster, cluster):
    """`kubectl delete -f raycluster.yaml` must not take the data with it."""
    assert {doc["kind"] for doc in manifest(RAYCLUSTER)} == {"RayCluster"}
    assert [doc["kind"] for doc in manifest(SHARED_VOLUME)] == ["PersistentVolumeClaim"]
    claims = {doc["metadata"]["name"]: doc for doc in manifest(SHARED_VOLUME)}
    path = shared_mount(cluster)
    for name, pod in pod_specs(raycluster).items():
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in all_containers(pod):
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert path in mounts, f"{name}/{container['name']}: {path} not mounted"
            claim = volumes[mounts[path]]["persistentVolumeClaim"]["claimName"]
            assert claim in claims, f"claim {claim} is not defined in {SHARED_VOLUME}"
            assert "ReadWriteMany" in claims[claim]["spec"]["accessModes"], "every pod writes the run directory"


# What KubeRay's pod builder (ray-operator/controllers/ray/common/pod.go, v1.6.0 to v1.7.0) does to the pod
# templates with token authentication: DefaultHeadPodTemplate injects the autoscaler container when in-tree
# autoscaling is on and, with authOptions.mode token, gives it RAY_AUTH_MODE and RAY_AUTH_TOKEN before it
# appends autoscalerOptions.env; DefaultWorkerPodTemplate adds the wait-gcs-ready init container with a copy of
# the Ray container's env; configureTokenAuth then sets both variables on the Ray container (index 0) and on
# wait-gcs-ready. SetContainerTokenAuthEnvVars adds a variable only when the container does not set it, and
# takes the token from authOptions.secretName, else from the Secret named after the cluster, key auth_token.
KUBERAY_AUTH_OPTIONS = {"mode": {"disabled", "token"}, "secretName": str, "enableK8sTokenAuth": bool}
KUBERAY_TOKEN_KEY = "auth_token"
KUBERAY_MIN_RAY_FOR_TOKEN = (2, 52, 0)  # ray-operator/controllers/ray/utils/validation.go


def _kuberay_token_auth(cluster_name: str, container: dict, auth: dict) -> None:
    env = container.setdefault("env", [])
    names = {item["name"] for item in env}
    if "RAY_AUTH_MODE" not in names:
        env.append({"name": "RAY_AUTH_MODE", "value": "token"})
    if "RAY_AUTH_TOKEN" not in names:
        secret = auth.get("secretName") or cluster_name
        env.append({"name": "RAY_AUTH_TOKEN",
                    "valueFrom": {"secretKeyRef": {"name": secret, "key": KUBERAY_TOKEN_KEY}}})


def kuberay_pods(raycluster: dict) -> dict[str, dict]:
    """The pod specs KubeRay creates from the RayCluster, as far as containers and their env go."""
    spec = raycluster["spec"]
    auth = spec.get("authOptions") or {}
    token = auth.get("mode") == "token"
    name = raycluster["metadata"]["name"]
    pods = copy.deepcopy(pod_specs(raycluster))
    for group, pod in pods.items():
        ray = ray_container(pod)
        if group == "head" and spec.get("enableInTreeAutoscaling"):
            autoscaler = {"name": "autoscaler", "image": ray["image"],
                          "env": [{"name": "KUBERAY_CRD_VER", "value": "v1"}]}
            if token:
                _kuberay_token_auth(name, autoscaler, auth)
            autoscaler["env"] += copy.deepcopy((spec.get("autoscalerOptions") or {}).get("env", []))
            pod["containers"].append(autoscaler)
        if group != "head":
            pod.setdefault("initContainers", []).append(
                {"name": "wait-gcs-ready", "image": ray["image"], "env": copy.deepcopy(ray.get("env", []))})
        if token:
            _kuberay_token_auth(name, ray, auth)
            for init in pod.get("initContainers", []):
                if init["name"] == "wait-gcs-ready":
                    _kuberay_token_auth(name, init, auth)
    return pods


def test_the_volume_claim_gets_its_storage_class_from_the_efs_csi_driver(cluster, raycluster):
    """The class the claim names exists, is the EFS CSI driver's, keeps the data, and writes as the image's
    user; it is the launcher's file system."""
    (claim,) = manifest(SHARED_VOLUME)
    (storage_class,) = manifest(EFS_STORAGECLASS)
    assert storage_class["kind"] == "StorageClass"
    assert claim["spec"]["storageClassName"] == storage_class["metadata"]["name"]
    assert storage_class["provisioner"] == "efs.csi.aws.com" and storage_class["reclaimPolicy"] == "Retain"
    parameters = storage_class["parameters"]
    assert parameters["provisioningMode"] == "efs-ap"
    assert all(isinstance(value, str) for value in parameters.values()), "StorageClass parameters are strings"
    assert f"{parameters['fileSystemId']}.efs." in json.dumps(cluster["available_node_types"])
    security = raycluster["spec"]["headGroupSpec"]["template"]["spec"]["securityContext"]
    assert (parameters["uid"], parameters["gid"]) == (str(security["runAsUser"]), str(security["runAsGroup"]))


def _secret_ref(container: dict, name: str) -> dict | None:
    item = env_of(container).get(name)  # Kubernetes takes the last of repeated names, as env_of does
    return item["valueFrom"]["secretKeyRef"] if item and "valueFrom" in item else None


def test_kuberay_accepts_the_auth_options(raycluster):
    """What the RayCluster CRD (authOptions: mode enum, secretName, enableK8sTokenAuth) and KubeRay's
    validation take: token mode needs rayVersion >= 2.52.0."""
    auth = raycluster["spec"].get("authOptions")
    assert auth, "no spec.authOptions: KubeRay gives the Ray token to none of the containers it adds"
    assert set(auth) <= set(KUBERAY_AUTH_OPTIONS), f"unknown authOptions keys {set(auth) - set(KUBERAY_AUTH_OPTIONS)}"
    assert auth["mode"] in KUBERAY_AUTH_OPTIONS["mode"]
    assert isinstance(auth.get("secretName", ""), str) and not auth.get("enableK8sTokenAuth")
    ray_version = tuple(int(part) for part in raycluster["spec"]["rayVersion"].split("."))
    assert ray_version >= KUBERAY_MIN_RAY_FOR_TOKEN


def test_kuberay_gives_the_token_to_the_autoscaler_and_every_ray_container(raycluster):
    """Without the token the injected autoscaler cannot read the GCS, and the gpu group never scales up."""
    auth = raycluster["spec"]["authOptions"]
    assert auth["mode"] == "token"
    secret = auth.get("secretName") or raycluster["metadata"]["name"]
    readme = (INFRA / "README.md").read_text()
    assert f"kubectl create secret generic {secret} " in readme, f"infra/README.md creates no Secret {secret}"
    pods = kuberay_pods(raycluster)
    (autoscaler,) = [c for c in pods["head"]["containers"] if c["name"] == "autoscaler"]
    for group, pod in pods.items():
        for container in all_containers(pod):
            where = f"{group}/{container['name']}"
            assert env_of(container)["RAY_AUTH_MODE"]["value"] == "token", where
            assert _secret_ref(container, "RAY_AUTH_TOKEN") == {"name": secret, "key": KUBERAY_TOKEN_KEY}, where
    assert autoscaler in pods["head"]["containers"]
    match = re.search(r"KubeRay operator \((\d[\d.]*) or later", readme)
    assert match and tuple(map(int, match.group(1).split("."))) >= (1, 6, 0), \
        "authOptions.secretName needs KubeRay >= 1.6.0 (1.5.x prunes it and makes a token of its own)"


def test_kuberay_model_of_the_pod_builder_is_live(raycluster):
    """The old manifest (token set by hand on the Ray containers, no authOptions) leaves the autoscaler
    without it: the check above would fail on it."""
    by_hand = copy.deepcopy(raycluster)
    by_hand["spec"].pop("authOptions", None)
    for pod in pod_specs(by_hand).values():
        ray_container(pod).setdefault("env", []).extend([
            {"name": "RAY_AUTH_MODE", "value": "token"},
            {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": "x", "key": KUBERAY_TOKEN_KEY}}}])
    (autoscaler,) = [c for c in kuberay_pods(by_hand)["head"]["containers"] if c["name"] == "autoscaler"]
    assert "RAY_AUTH_TOKEN" not in env_of(autoscaler)


def test_raycluster_secrets_only_where_needed(raycluster):
    pods = kuberay_pods(raycluster)
    worker = sidecar(pods, "prefect-worker")
    for name, pod in pods.items():
        for container in all_containers(pod):
            where = f"{name}/{container['name']}"
            env = env_of(container)
            assert not any(item.get("value") for key, item in env.items() if key.endswith(("_KEY", "_TOKEN"))), where
            # A missing secret keeps the pod from starting instead of running it without the value.
            refs = [item["valueFrom"]["secretKeyRef"] for item in env.values() if "valueFrom" in item]
            assert not any(ref.get("optional") for ref in refs), f"{where}: optional secret"
            prefect = {key for key in env if key.startswith("PREFECT_")}
            assert container is worker or not prefect, f"{where}: Prefect settings {prefect}"
    assert _secret_ref(ray_container(pods["head"]), "WANDB_API_KEY") is None, "the head trains nothing"
    for name, pod in pods.items():
        if name != "head":
            assert _secret_ref(ray_container(pod), "WANDB_API_KEY"), f"{name}: rank 0 logs to W&B"
    assert _secret_ref(worker, "PREFECT_API_KEY") and _secret_ref(worker, "PREFECT_API_URL")


def _tolerates(toleration: dict, taint: dict) -> bool:
    """Kubernetes' ToleratesTaint (k8s.io/api/core/v1/toleration.go)."""
    if toleration.get("effect") and toleration["effect"] != taint["effect"]:
        return False
    if toleration.get("key") and toleration["key"] != taint["key"]:
        return False
    if toleration.get("operator", "Equal") == "Exists":
        return True
    return toleration.get("key") == taint["key"] and toleration.get("value", "") == taint.get("value", "")


def gpu_taints() -> list[dict]:
    (pool,) = [doc for doc in manifest(GPU_NODEPOOL) if doc["kind"] == "NodePool"]
    taints = pool["spec"]["template"]["spec"]["taints"]
    assert taints, f"{GPU_NODEPOOL}: GPU nodes without a taint take any pod and stay up for it"
    return taints


def test_the_gpu_group_scales_from_zero_onto_tainted_gpu_nodes(raycluster):
    spec = raycluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    (gpu,) = [group for group in spec["workerGroupSpecs"] if group["groupName"] == "gpu"]
    assert gpu["minReplicas"] == 0 and gpu.get("replicas", 0) == 0 and gpu["maxReplicas"] > 0
    pod = gpu["template"]["spec"]
    resources = ray_container(pod)["resources"]
    assert int(resources["requests"]["nvidia.com/gpu"]) == int(resources["limits"]["nvidia.com/gpu"]) >= 1
    for taint in gpu_taints():
        assert any(_tolerates(t, taint) for t in pod.get("tolerations", [])), f"gpu pods do not tolerate {taint}"
        head = spec["headGroupSpec"]["template"]["spec"]
        assert not any(_tolerates(t, taint) for t in head.get("tolerations", [])), "the head would hold a GPU node"
    (pool,) = [doc for doc in manifest(GPU_NODEPOOL) if doc["kind"] == "NodePool"]
    gpus_per_pod = int(resources["limits"]["nvidia.com/gpu"])
    assert int(pool["spec"]["limits"]["nvidia.com/gpu"]) >= gpu["maxReplicas"] * gpus_per_pod
    classes = {doc["metadata"]["name"] for doc in manifest(GPU_NODEPOOL) if doc["kind"] == "EC2NodeClass"}
    assert pool["spec"]["template"]["spec"]["nodeClassRef"]["name"] in classes


ZONE_KEY = "topology.kubernetes.io/zone"


def kuberay_pod_labels(raycluster: dict, group: dict) -> dict[str, str]:
    """The labels KubeRay's labelPod puts on a worker pod of the group, over the template's own."""
    labels = dict(group["template"].get("metadata", {}).get("labels", {}))
    labels.update({"ray.io/cluster": raycluster["metadata"]["name"], "ray.io/group": group["groupName"],
                   "ray.io/node-type": "worker"})
    return labels


def test_a_trainings_kuberay_workers_share_one_zone(raycluster):
    """Required pod affinity on the zone to the group's own pods: the first gpu pod may go anywhere (its
    labels match its own term), every later one joins its zone."""
    for group in raycluster["spec"]["workerGroupSpecs"]:
        affinity = group["template"]["spec"].get("affinity", {}).get("podAffinity", {})
        terms = affinity.get("requiredDuringSchedulingIgnoredDuringExecution", [])
        labels = kuberay_pod_labels(raycluster, group)
        same_zone = [term for term in terms if term["topologyKey"] == ZONE_KEY
                     and term["labelSelector"]["matchLabels"].items() <= labels.items()
                     and "matchExpressions" not in term["labelSelector"]]
        assert same_zone, f"{group['groupName']}: no required pod affinity to its own pods on {ZONE_KEY}"
        other = {**labels, "ray.io/group": "other"}
        assert not all(term["labelSelector"]["matchLabels"].items() <= other.items() for term in same_zone), \
            "the affinity must name the group, not every pod of the cluster"


def test_a_trainings_launcher_workers_share_one_zone(cluster):
    """Ray's AWS provider launches in the first of a node type's subnets and falls back to the next when it
    gets no capacity: more than one subnet, or zone, lets a DDP pair span two zones."""
    zones = [zone.strip() for zone in cluster["provider"]["availability_zone"].split(",")]
    assert len(zones) == 1, f"provider.availability_zone: {zones}"
    subnets = {name: node["node_config"]["SubnetIds"] for name, node in cluster["available_node_types"].items()}
    assert all(len(ids) == 1 for ids in subnets.values()), subnets
    assert len({ids[0] for ids in subnets.values()}) == 1, f"node types in different subnets: {subnets}"


def test_raycluster_flow_runs_submit_ray_jobs_from_a_restarting_sidecar(raycluster):
    """The flow in the head pod reaches Ray through the Jobs API on the pod's loopback, never Ray Client."""
    pods = pod_specs(raycluster)
    worker = sidecar(pods, "prefect-worker")
    assert worker["restartPolicy"] == "Always", "a native sidecar: restarted whenever it exits"
    assert pools_started(json.dumps(worker["command"]))
    dashboard = {p["name"]: p["containerPort"] for p in ray_container(pods["head"])["ports"]}["dashboard"]
    assert env_of(worker)["RAY_ADDRESS"]["value"] == f"http://127.0.0.1:{dashboard}"
    assert "ray://" not in RAYCLUSTER.read_text() + CLUSTER_AWS.read_text() + WORK_POOL.read_text()


# ----------------------------------------------------------------------------------------- Docker


def locked() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"{LOCK}: {line!r} is not pinned with =="
            pins[name] = version
    return pins


def test_the_lock_holds_the_tested_torch_build_and_every_dependency(pyproject):
    """The image installs the lock; its torch, torchvision and CUDA libraries are those tests ran with here."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = locked()
    build = [name for name in pins if name in {"torch", "torchvision", "triton"} or name.startswith("nvidia-")]
    assert {"torch", "torchvision"} <= set(build) and any(name.startswith("nvidia-cu") for name in build)
    for name in build:
        assert pins[name] == installed_version(name), f"{name}: locked {pins[name]}, tested {installed_version(name)}"
    for text in pyproject["project"]["dependencies"]:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pins and requirement.specifier.contains(pins[name], prereleases=True), text
        for extra in requirement.extras:
            needed = [Requirement(r) for r in requires(requirement.name) or []]
            wanted = [r for r in needed if r.marker is not None and r.marker.evaluate({"extra": extra})]
            assert all(canonicalize_name(r.name) in pins for r in wanted), f"{text}: extra {extra}"


def test_the_image_installs_the_lock_before_the_source(dockerfile):
    steps = [f"{kind} {rest}" for kind, rest in re.findall(r"^(FROM|COPY|RUN) (.*)$", dockerfile, re.MULTILINE)]
    install = next(i for i, step in enumerate(steps) if "pip install --no-deps -r /tmp/requirements.lock" in step)
    lock_copy = next(i for i, step in enumerate(steps) if step.startswith("COPY infra/docker/requirements.lock"))
    source = re.compile(r"COPY .*\b(flows|tasks|vitmodels|pyproject\.toml)\b")
    sources = [i for i, step in enumerate(steps) if source.match(step)]
    assert lock_copy < install < min(sources), "a source change must not reinstall the dependencies"
    project = [step for step in steps if re.search(r"pip install (\S+ )*\.(\s|$)", step)]
    assert project and all("--no-deps" in step and "pip check" in step for step in project), project
    assert not any("torch==" in step or "ray[" in step for step in steps), "nothing installed beside the lock"
    base = re.search(r"^FROM python:(\d+\.\d+\.\d+)-", dockerfile, re.MULTILINE)
    locked_python = re.search(r"^# Python (\S+) on ", LOCK.read_text(), re.MULTILINE)
    assert base and locked_python and base.group(1) == locked_python.group(1), "the Python the lock was made with"


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


BASE_DIGEST = "sha256:" + "ab" * 32  # what the stand-in `docker` says the tag names


def _build_sh(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    """infra/docker/build.sh in a copy of infra/docker/, with a stand-in `docker` that records its calls."""
    root = tmp_path / "repo"
    shutil.copytree(INFRA / "docker", root / "infra" / "docker")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(f"""#!/bin/sh
echo "$@" >> {tmp_path}/docker.calls
case "$*" in
  "image inspect"*) echo "python@{BASE_DIGEST}" ;;
esac
""")
    (bin_dir / "docker").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "REGISTRY": "registry.example"}
    result = subprocess.run(["bash", str(root / "infra" / "docker" / "build.sh"), *args], env=env,
                            capture_output=True, text=True, timeout=30)
    return result, root / "infra" / "docker" / "Dockerfile"


def test_the_base_image_is_pinned_by_digest_before_a_build(tmp_path, dockerfile):
    """No build from a tag alone: build.sh refuses until `build.sh pin-base` wrote the tag's digest into FROM."""
    base = re.search(r"^FROM (\S+)", dockerfile, re.MULTILINE).group(1)
    if "@sha256:" in base:
        assert re.fullmatch(r"python:[\w.-]+@sha256:[0-9a-f]{64}", base), base
        return
    refused, _ = _build_sh(tmp_path)
    assert refused.returncode == 1 and "build.sh pin-base" in refused.stderr
    assert not (tmp_path / "docker.calls").exists(), "nothing built from an unpinned base"
    pinned_run, pinned_file = _build_sh(tmp_path / "pin", "pin-base")
    assert pinned_run.returncode == 0, pinned_run.stderr
    assert re.search(rf"^FROM {re.escape(base)}@{BASE_DIGEST}$", pinned_file.read_text(), re.MULTILINE)
    assert "pull --quiet " + base in (tmp_path / "pin" / "docker.calls").read_text()


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


def test_work_pool_renders_no_ray_address_and_no_secret(work_pool):
    """RAY_ADDRESS differs per platform (auto on the launcher's head, the Jobs API in KubeRay's head pod):
    the template would override the worker's, so it sets none."""
    from prefect.utilities.templating import apply_values
    from prefect.workers.process import ProcessJobConfiguration

    defaults = {key: prop["default"] for key, prop in work_pool["variables"]["properties"].items() if "default" in prop}
    rendered = ProcessJobConfiguration(**apply_values(work_pool["job_configuration"], defaults))
    assert "RAY_ADDRESS" not in rendered.env
    assert rendered.env["VIT_PIPELINE_HOME"].startswith("/")
    assert not any("KEY" in key or "TOKEN" in key for key in work_pool["variables"]["properties"]["env"]["default"])


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
    assert pools_started(WORKER_SCRIPT.read_text()) == {pool}
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


def test_cluster_deployments_keep_state_on_shared_storage(deployments, cluster, scaling, monkeypatch, tmp_path):
    """Runs, Ray Train checkpoints and Prefect results on the file system every node mounts; three trainings
    at once, what the cluster holds; and without those overrides the config refuses to load."""
    from tasks.config import ConfigError

    monkeypatch.setenv("DATA_ROOT", str(tmp_path))
    mount = Path(shared_mount(cluster))
    for deployment in deployments:
        parameters = deployment["parameters"]
        config = load_config(REPO_ROOT / parameters["config_file"], parameters["overrides"])
        assert config.scaling.multi_node and config.storage.shared_filesystem == mount, deployment["name"]
        for location in (config.checkpoint_location, config.storage.results, str(config.run_dir)):
            assert Path(location).is_relative_to(mount), f"{deployment['name']}: {location} is not shared"
        assert parameters.get("reuse_trainings", False) is False, "a scheduled retraining retrains"
        if deployment["name"] == "cifar10":
            gpus = cluster["available_node_types"]["gpu_a10g"]["resources"]["GPU"]
            nodes = cluster["available_node_types"]["gpu_a10g"]["max_workers"]
            assert config.orchestration.max_concurrent_trainings == nodes * gpus // scaling.num_workers
        local = [o for o in parameters["overrides"] if not o.startswith(("tracking.output_dir", "storage."))]
        with pytest.raises(ConfigError, match="tracking.output_dir: .* is local to one machine"):
            load_config(REPO_ROOT / parameters["config_file"], local)


def test_prefect_yaml_matches_prefect_deploy(deployments):
    """`prefect deploy` reads prefect.yaml with models that ignore unknown keys: a misspelt key would vanish
    silently, so every key must be one of theirs, and every schedule one its strict schedule model takes."""
    from prefect.cli.deploy._models import DeploymentConfig, PrefectYamlModel, RawScheduleConfig

    PrefectYamlModel.model_validate(yaml.safe_load(PREFECT_YAML.read_text()))
    for deployment in deployments:
        unknown = set(deployment) - set(DeploymentConfig.model_fields)
        assert not unknown, f"{deployment['name']}: prefect deploy ignores {unknown}"
        for schedule in deployment.get("schedules") or []:
            RawScheduleConfig.model_validate(schedule)


def test_a_redeploy_keeps_the_schedule_paused_or_running(deployments):
    """With a slug, the server patches the existing schedule with the fields set (exclude_none): no `active`
    leaves the operator's pause in place. `active: false` re-paused it on every `prefect deploy`; `active`
    unset without a slug recreates the schedule active."""
    from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule
    from prefect.client.schemas.actions import DeploymentScheduleUpdate

    for deployment in deployments:
        for schedule in deployment.get("schedules") or []:
            where = f"{deployment['name']}: {schedule}"
            assert schedule.get("slug"), f"{where}: without a slug a redeploy recreates the schedule"
            update = DeploymentScheduleUpdate(**_schedule_config_to_deployment_schedule(schedule))
            assert "active" not in update.model_dump(exclude_none=True), f"{where}: a redeploy sets `active`"
    (weekly,) = [d for d in deployments if d.get("schedules")]
    readme = (INFRA / "README.md").read_text()
    assert f"prefect deployment schedule pause vit-pipeline/{weekly['name']}" in readme


def test_scheduled_runs_do_not_overlap(deployments):
    """A deployment concurrency limit of one: late runs after an outage do not all start at once."""
    from prefect.cli.deploy._models import ConcurrencyLimitSpec
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy, ConcurrencyOptions

    for deployment in [d for d in deployments if d.get("schedules")]:
        spec = ConcurrencyLimitSpec.model_validate(deployment.get("concurrency_limit") or {})
        assert spec.limit == 1, f"{deployment['name']}: concurrency_limit {spec.limit}"
        assert spec.collision_strategy in {s.value for s in ConcurrencyLimitStrategy}, spec.collision_strategy
        ConcurrencyOptions(collision_strategy=spec.collision_strategy)


def test_pull_step_uses_the_pool_home(work_pool):
    steps = yaml.safe_load(PREFECT_YAML.read_text())["pull"]
    directories = [s["prefect.deployments.steps.set_working_directory"]["directory"] for s in steps
                   if "prefect.deployments.steps.set_working_directory" in s]
    variables = {m for d in directories for m in re.findall(r"\{\{\s*\$(\w+)\s*\}\}", d)}
    assert variables, "prefect.yaml's pull step does not take its directory from the environment"
    assert variables <= set(work_pool["variables"]["properties"]["env"]["default"])


def test_the_readme_prices_every_instance_type_and_dates_the_prices(cluster, raycluster):
    readme = (INFRA / "README.md").read_text()
    costs = readme[readme.index("## Costs"):readme.index("## 1.")]
    assert re.search(r"as of \d{4}-\d{2}-\d{2}", costs), "prices need the date they were read"
    for node_type in cluster["available_node_types"].values():
        instance = node_type["node_config"]["InstanceType"]
        assert re.search(rf"\| {re.escape(instance)} .*\$\d+\.\d+ / h", costs), f"no hourly price for {instance}"
    for step in ("## 1. Build", "## 2a. Bring up", "## 2b.", "## 3. Prefect", "## 4. Run", "## 6. Tear down"):
        assert step in readme, step


def test_the_readme_says_what_a_run_costs_with_its_sources():
    readme = (INFRA / "README.md").read_text()
    costs = readme[readme.index("## Costs"):readme.index("## 1.")]
    for line in ("GPU hours", "idle head", "NAT gateway", "storage writes"):
        assert re.search(rf"^\| {line} \|", costs, re.MULTILINE), f"no cost line for {line}"
    assert re.search(r"330 GB.*\$\d+\.\d\d per run", costs), "what a run's checkpoint writes cost"
    sources = costs[costs.index("Sources"):]
    for page in ("/ec2/pricing", "/vpc/pricing", "/efs/pricing", "/s3/pricing"):
        assert page in sources, f"no source for {page}"


def _readme_section(readme: str, heading: str) -> str:
    start = readme.index(heading)
    following = re.search(r"^## ", readme[start + len(heading):], re.MULTILINE)
    return readme[start:start + len(heading) + following.start()] if following else readme[start:]


def test_the_runbook_sets_up_prefect_in_order_with_operations_and_notifications(monkeypatch, tmp_path):
    """Work pool, notification block, `python -m flows.operations`, then the deployments; the operations command
    as written is one the module takes (its config loads, the block slug is valid)."""
    import shlex

    from flows import operations

    readme = (INFRA / "README.md").read_text()
    prefect = _readme_section(readme, "## 3. Prefect")
    steps = ["prefect work-pool create", ".save('", "python -m flows.operations", "prefect deploy --all"]
    position = 0
    for step in steps:
        position = prefect.find(step, position)
        assert position >= 0, f"infra/README.md section 3: no `{step}` after the steps before it ({steps})"
    command = re.search(r"python -m flows\.operations (.*?)\n\s*```", prefect, re.DOTALL).group(1)
    argv = shlex.split(command.replace("\\\n", " "))
    block = re.search(r"\.save\('([\w.-]+)'\)", prefect).group(1)
    assert f"orchestration.notify_block=slack-webhook/{block}" in argv, "the operations command names the block saved"
    applied = []
    monkeypatch.setattr(operations, "apply", lambda config, limit=None: applied.append(config) or ["done"])
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))
    assert operations.main(argv) == 0 and applied[0].orchestration.notify_block == f"slack-webhook/{block}"


def test_the_kuberay_runbook_covers_the_cluster_prerequisites():
    readme = (INFRA / "README.md").read_text()
    kuberay = _readme_section(readme, "## 2b.")
    for needed in ("kubectl apply -f infra/kuberay/gpu-nodepool.yaml", "Karpenter", "cluster-autoscaler",
                   "kubectl apply -f infra/kuberay/efs-storageclass.yaml", "AmazonEFSCSIDriverPolicy",
                   "efs-csi-controller-sa", "kubectl apply -f infra/kuberay/shared-volume.yaml",
                   "kubectl apply -f infra/kuberay/raycluster.yaml"):
        assert needed in kuberay, f"infra/README.md 2b does not say {needed}"
    for taint in gpu_taints():
        assert f"{taint['key']}={taint['value']}:{taint['effect']}" in kuberay, f"the runbook's taint is not {taint}"
    order = [kuberay.index(f"infra/kuberay/{name}") for name in
             ("gpu-nodepool.yaml", "efs-storageclass.yaml", "shared-volume.yaml", "raycluster.yaml")]
    assert order == sorted(order)
    assert "not there yet" not in readme, "S3 resume is there: tests/unit/training/test_checkpoints_s3.py"


def test_only_the_off_cluster_worker_takes_the_runs_that_bring_their_own_cluster():
    """A flow with a cluster launcher must not run on the cluster's own worker (its `ray down` would end it):
    those deployments go to the `launcher` queue, which the cluster's workers (the head's systemd unit, the
    KubeRay sidecar) do not poll, and which the runbook's off-cluster worker does."""
    declared = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())["deployments"]
    for deployment in declared:
        launches = any(override.startswith("orchestration.cluster.launcher=") and not override.endswith("=none")
                       for override in deployment["parameters"].get("overrides", []))
        queue = deployment["work_pool"].get("work_queue_name", "default")
        assert (queue == "launcher") == launches, deployment["name"]
    assert any(d["work_pool"].get("work_queue_name") == "launcher" for d in declared)

    def polled_queues(command: str) -> list[str]:
        return re.findall(r"--work-queue[ ,\"]+(\w+)", command)

    head_worker = (INFRA / "ray" / "prefect-worker.sh").read_text()
    head_pod = yaml.safe_load((INFRA / "kuberay" / "raycluster.yaml").read_text())["spec"]["headGroupSpec"]["template"]
    sidecar = next(container for container in head_pod["spec"]["initContainers"]
                   if container["name"] == "prefect-worker")
    for command in (next(line for line in head_worker.splitlines() if "worker start" in line),
                    json.dumps(sidecar["command"])):
        assert polled_queues(command) == ["default"], command
    runbook = (INFRA / "README.md").read_text()
    assert polled_queues(next(line for line in runbook.splitlines() if "vit-pipeline-launcher" in line)) == ["launcher"]
