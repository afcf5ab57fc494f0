"""Deployment files: the Kubernetes manifests in docker/k8s/ validate offline against the oldest
Kubernetes they support, and they and the compose files configure the gateway with settings it
accepts, stop it only after its drain, and start vLLM servers sharing a GPU one at a time."""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from kubernetes_validate import utils as kubernetes_validate

from gateway.settings import VARIABLES, Settings

DOCKER = Path(__file__).resolve().parent.parent / "docker"
K8S = DOCKER / "k8s"
COMPOSE = DOCKER / "compose.yaml"
COMPOSE_SHARED_GPU = DOCKER / "compose.shared-gpu.yaml"
# The oldest Kubernetes the manifests support (hence an exec preStop, not 1.30's `sleep`
# action), and the newest one kubernetes-validate bundles, where an API removed since fails.
OLDEST_KUBERNETES = "1.27"
NEWEST_KUBERNETES = "1.37"
DEFAULTS = {variable.name: variable.default for variable in VARIABLES}
# What a secretKeyRef holds in a real cluster; any valid key does here.
SECRET_STANDIN = "key-from-a-kubernetes-secret"
# CoreDNS's default TTL for cluster names: how long a vanished vLLM pod may still resolve.
DNS_TTL_S = 5
VLLM_DEFAULT_GPU_SHARE = 0.9

Doc = dict[str, Any]


# --- loading ---------------------------------------------------------------------------------


def load_manifests() -> list[tuple[str, Doc]]:
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            found.extend((path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc)
    return found


@pytest.fixture(scope="module")
def manifests() -> list[tuple[str, Doc]]:
    return load_manifests()


def kustomization() -> Doc:
    loaded: Doc = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return loaded


def find(manifests: list[tuple[str, Doc]], kind: str, name: str | None = None) -> list[Doc]:
    return [
        doc
        for _, doc in manifests
        if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)
    ]


def gateway_deployment(manifests: list[tuple[str, Doc]]) -> Doc:
    (deployment,) = find(manifests, "Deployment", "vllm-gateway")
    return deployment


def only_container(workload: Doc) -> Doc:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    result: Doc = container
    return result


def compose(path: Path) -> Doc:
    loaded: Doc = yaml.safe_load(path.read_text())
    return loaded


# --- reading Kubernetes fields ---------------------------------------------------------------


def cpu_cores(quantity: str | int | float) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def container_environ(container: Doc) -> dict[str, str]:
    """The environment the container's process gets, as Kubernetes would build it."""
    assert "envFrom" not in container, "envFrom hides variable names from this check"
    environ = {}
    for entry in container.get("env", []):
        source = entry.get("valueFrom")
        if source is None:
            environ[entry["name"]] = str(entry.get("value", ""))
        elif "secretKeyRef" in source:
            environ[entry["name"]] = SECRET_STANDIN
        elif "resourceFieldRef" in source:
            field = source["resourceFieldRef"]
            kind, resource = field["resource"].split(".")
            limit = container["resources"][kind].get(resource)
            # Without a limit Kubernetes hands over the node's allocatable CPU instead.
            assert limit is not None, f"{entry['name']} reads {field['resource']}, which is unset"
            value = cpu_cores(limit) / cpu_cores(field.get("divisor", "1"))
            environ[entry["name"]] = str(math.ceil(value))
        else:
            raise AssertionError(f"{entry['name']}: no stand-in for valueFrom {source}")
    return environ


def container_port(container: Doc, port: int | str) -> int:
    for declared in container.get("ports", []):
        if port in (declared["containerPort"], declared.get("name")):
            number: int = declared["containerPort"]
            return number
    raise AssertionError(f"port {port!r} is not one of the container's ports")


def prestop_pause_s(container: Doc) -> float:
    pre_stop = container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert len(command) == 2 and Path(command[0]).name == "sleep", command
    return float(command[1])


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def cli_flag(args: list[str], flag: str) -> str | None:
    for index, arg in enumerate(args):
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
        if arg == flag:
            return args[index + 1]
    return None


# --- Kubernetes ------------------------------------------------------------------------------


def test_kubernetes_validate_bundles_the_pinned_versions() -> None:
    versions = {kubernetes_validate.major_minor(v) for v in kubernetes_validate.all_versions()}
    assert {OLDEST_KUBERNETES, NEWEST_KUBERNETES} <= versions, sorted(versions)


def test_every_manifest_validates_strictly_against_oldest_and_newest_kubernetes(
    manifests: list[tuple[str, Doc]],
) -> None:
    assert len(manifests) >= 8
    failures = []
    for version in (OLDEST_KUBERNETES, NEWEST_KUBERNETES):
        for file, doc in manifests:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(part) for part in exc.path)
                failures.append(f"{file} {doc['kind']} on {version}: {path}: {exc.message}")
            except kubernetes_validate.SchemaNotFoundError as exc:
                failures.append(f"{file}: {exc.message}")
    assert failures == []


def test_strict_validation_rejects_a_misspelled_field(manifests: list[tuple[str, Doc]]) -> None:
    deployment = yaml.safe_load(yaml.safe_dump(gateway_deployment(manifests)))
    only_container(deployment)["imagePullPolice"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError, match="imagePullPolice"):
        kubernetes_validate.validate(deployment, OLDEST_KUBERNETES, strict=True)


def test_kustomization_applies_every_manifest_file() -> None:
    files = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization()["resources"]) == sorted(files)


def test_every_gateway_variable_in_the_deployment_files_is_a_setting(
    manifests: list[tuple[str, Doc]],
) -> None:
    declared = set(DEFAULTS)
    in_env = {
        name
        for _, doc in manifests
        if doc["kind"] in ("Deployment", "StatefulSet")
        for container in doc["spec"]["template"]["spec"]["containers"]
        for name in container_environ(container)
        if name.startswith("GATEWAY_")
    }
    for path in (COMPOSE, COMPOSE_SHARED_GPU):
        for service in compose(path)["services"].values():
            in_env |= {name for name in compose_environ(service) if name.startswith("GATEWAY_")}
    assert {"GATEWAY_BACKENDS", "GATEWAY_WORKERS", "GATEWAY_METRICS_DIR"} <= in_env
    assert in_env - declared == set()
    # Comments and READMEs too: a misspelt name there is one a reader copies.
    texts = [*K8S.iterdir(), COMPOSE, COMPOSE_SHARED_GPU]
    mentioned = {name for path in texts for name in re.findall(r"GATEWAY_\w+", path.read_text())}
    assert mentioned - declared == set()


def test_gateway_deployment_environment_parses_as_settings(
    manifests: list[tuple[str, Doc]],
) -> None:
    container = only_container(gateway_deployment(manifests))
    settings = Settings.from_environ(container_environ(container))
    assert settings.workers == math.ceil(cpu_cores(container["resources"]["limits"]["cpu"]))
    assert settings.log_format == "json"
    # /metrics then needs a key too: README.md shows Prometheus reading it from the Secret.
    assert settings.api_keys == {SECRET_STANDIN}


def test_gateway_backends_are_the_headless_services_of_the_vllm_statefulsets(
    manifests: list[tuple[str, Doc]],
) -> None:
    namespace = kustomization()["namespace"]
    container = only_container(gateway_deployment(manifests))
    settings = Settings.from_environ(container_environ(container))
    headless = {
        doc["metadata"]["name"]: doc
        for doc in find(manifests, "Service")
        if doc["spec"].get("clusterIP") == "None"
    }
    named = set()
    for backend in settings.backends:
        url = urlsplit(backend.url)
        service_name, _, domain = (url.hostname or "").partition(".")
        assert domain == f"{namespace}.svc.cluster.local", backend.url
        service = headless[service_name]
        (port,) = service["spec"]["ports"]
        assert url.port == port["port"]
        assert service["spec"].get("publishNotReadyAddresses", False) is False
        (statefulset,) = find(manifests, "StatefulSet", service_name)
        assert statefulset["spec"]["serviceName"] == service_name
        labels = statefulset["spec"]["template"]["metadata"]["labels"]
        assert selects(service["spec"]["selector"], labels)
        container_port(only_container(statefulset), port["targetPort"])
        named.add(service_name)
    assert named == set(headless) and len(named) == 2


def test_gateway_pod_is_killed_only_after_its_prestop_pause_and_drain(
    manifests: list[tuple[str, Doc]],
) -> None:
    deployment = gateway_deployment(manifests)
    container = only_container(deployment)
    environ = container_environ(container)
    drain_s = float(environ.get("GATEWAY_DRAIN_TIMEOUT_S", DEFAULTS["GATEWAY_DRAIN_TIMEOUT_S"]))
    grace_s = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace_s > prestop_pause_s(container) + drain_s


def test_gateway_probes_hit_health_and_ready_on_the_port_it_listens_on(
    manifests: list[tuple[str, Doc]],
) -> None:
    container = only_container(gateway_deployment(manifests))
    environ = container_environ(container)
    listening = int(environ.get("GATEWAY_PORT", DEFAULTS["GATEWAY_PORT"]))
    paths = {"livenessProbe": "/health", "readinessProbe": "/ready", "startupProbe": "/health"}
    for probe, path in paths.items():
        http_get = container[probe]["httpGet"]
        assert http_get["path"] == path, probe
        assert container_port(container, http_get["port"]) == listening, probe
    (service,) = find(manifests, "Service", "vllm-gateway")
    (port,) = service["spec"]["ports"]
    assert container_port(container, port["targetPort"]) == listening


def test_gateway_root_filesystem_is_read_only_and_metrics_go_to_a_memory_volume(
    manifests: list[tuple[str, Doc]],
) -> None:
    pod = gateway_deployment(manifests)["spec"]["template"]["spec"]
    container = only_container(gateway_deployment(manifests))
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    metrics_dir = Path(container_environ(container)["GATEWAY_METRICS_DIR"])
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = [
        mount
        for mount in container["volumeMounts"]
        if metrics_dir.is_relative_to(mount["mountPath"]) and not mount.get("readOnly", False)
    ]
    assert mounts, f"{metrics_dir} is on no writable volume"
    deepest = max(mounts, key=lambda mount: len(mount["mountPath"]))
    assert volumes[deepest["name"]]["emptyDir"]["medium"] == "Memory"
    # Unset, the gateway makes its metrics directory under the temporary directory.
    assert any(mount["mountPath"] == "/tmp" for mount in container["volumeMounts"])


def test_gateway_runs_unprivileged(manifests: list[tuple[str, Doc]]) -> None:
    pod = gateway_deployment(manifests)["spec"]["template"]["spec"]
    context = only_container(gateway_deployment(manifests))["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    # Service links would add <SERVICE>_PORT variables: a Service named `gateway` would
    # inject GATEWAY_PORT=tcp://..., which the gateway refuses at startup.
    assert pod["enableServiceLinks"] is False


def test_service_pdb_and_autoscaler_all_target_the_gateway_pods(
    manifests: list[tuple[str, Doc]],
) -> None:
    deployment = gateway_deployment(manifests)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"]["matchLabels"], labels)
    (service,) = find(manifests, "Service", "vllm-gateway")
    assert selects(service["spec"]["selector"], labels)
    (budget,) = find(manifests, "PodDisruptionBudget")
    assert selects(budget["spec"]["selector"]["matchLabels"], labels)
    (autoscaler,) = find(manifests, "HorizontalPodAutoscaler")
    target = autoscaler["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "vllm-gateway")
    assert autoscaler["spec"]["minReplicas"] >= 2
    # CPU utilization is a share of the request, and a replica count here would fight the HPA.
    (metric,) = autoscaler["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert "cpu" in only_container(deployment)["resources"]["requests"]
    assert "replicas" not in deployment["spec"]


def test_vllm_servers_take_a_gpu_are_ready_on_health_and_drain_before_they_stop(
    manifests: list[tuple[str, Doc]],
) -> None:
    gateway = container_environ(only_container(gateway_deployment(manifests)))
    interval_s = float(
        gateway.get("GATEWAY_HEALTH_INTERVAL_S", DEFAULTS["GATEWAY_HEALTH_INTERVAL_S"])
    )
    statefulsets = find(manifests, "StatefulSet")
    assert len(statefulsets) == 2
    for statefulset in statefulsets:
        pod = statefulset["spec"]["template"]["spec"]
        container = only_container(statefulset)
        name = statefulset["metadata"]["name"]
        assert container["image"].startswith("vllm/vllm-openai:"), name
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1, name
        probe = container["readinessProbe"]["httpGet"]
        assert probe["path"] == "/health", name
        port = container_port(container, probe["port"])
        assert cli_flag(container["args"], "--port") == str(port), name
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        (shm,) = [mount for mount in container["volumeMounts"] if mount["mountPath"] == "/dev/shm"]
        assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory", name
        # Gone from DNS, a pod keeps taking requests until the gateway has resolved again...
        pause_s = prestop_pause_s(container)
        assert pause_s > interval_s + DNS_TTL_S, name
        # ...then vLLM lets those in flight finish before the kill.
        shutdown_s = float(cli_flag(container["args"], "--shutdown-timeout") or 0)
        assert shutdown_s > 0, name
        assert pod["terminationGracePeriodSeconds"] > pause_s + shutdown_s, name


# --- compose ---------------------------------------------------------------------------------


def interpolate(value: str) -> str:
    """Compose's ${NAME}, ${NAME-default} and ${NAME:-default}, none of them set in the shell."""

    def substitute(match: re.Match[str]) -> str:
        return match["default"] or ""

    value = re.sub(r"\$\{\w+(?::?-(?P<default>[^}]*))?\}", substitute, value)
    assert "${" not in value, value
    return value.replace("$$", "$")


def compose_environ(service: Doc) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(entry.split("=", 1) for entry in environment)
    return {name: interpolate(str(value or "")) for name, value in environment.items()}


def duration_s(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert "".join(number + unit for number, unit in parts) == text, text
    return sum(float(number) * units[unit] for number, unit in parts)


def gpus_of(service: Doc) -> list[str]:
    reservations = service.get("deploy", {}).get("resources", {}).get("reservations", {})
    gpus = []
    for device in reservations.get("devices", []):
        if "gpu" in device.get("capabilities", []):
            # A count would leave the sharing of GPUs to chance, and this test blind to it.
            gpus.extend(str(gpu) for gpu in device["device_ids"])
    return gpus


def vllm_by_gpu(services: dict[str, Doc]) -> dict[str, list[str]]:
    by_gpu: dict[str, list[str]] = {}
    for name, service in services.items():
        for gpu in gpus_of(service):
            by_gpu.setdefault(gpu, []).append(name)
    return by_gpu


def command_args(service: Doc) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(arg) for arg in command]


COMPOSE_FILES = pytest.mark.parametrize(
    "path", [COMPOSE, COMPOSE_SHARED_GPU], ids=lambda path: path.name
)


@COMPOSE_FILES
def test_compose_gateway_environment_parses_as_settings(path: Path) -> None:
    services = compose(path)["services"]
    gateways = [
        service
        for service in services.values()
        if any(name.startswith("GATEWAY_") for name in compose_environ(service))
    ]
    assert len(gateways) == 1
    (gateway,) = gateways
    settings = Settings.from_environ(compose_environ(gateway))
    assert {urlsplit(backend.url).hostname for backend in settings.backends} == set(
        name for name in services if name.startswith("vllm-")
    )
    # One worker per core the container may use.
    assert settings.workers == math.ceil(cpu_cores(gateway["cpus"]))
    assert duration_s(gateway["stop_grace_period"]) > settings.drain_timeout_s
    assert gateway["read_only"] is True and "/tmp" in gateway["tmpfs"]


@COMPOSE_FILES
def test_compose_gpu_shares_on_each_gpu_add_up_to_less_than_one(path: Path) -> None:
    services = compose(path)["services"]
    by_gpu = vllm_by_gpu(services)
    assert by_gpu
    for gpu, names in by_gpu.items():
        shares = [
            float(
                cli_flag(command_args(services[name]), "--gpu-memory-utilization")
                or VLLM_DEFAULT_GPU_SHARE
            )
            for name in names
        ]
        assert sum(shares) < 1, f"GPU {gpu}: {dict(zip(names, shares, strict=True))}"


def test_compose_gives_each_vllm_a_gpu_of_its_own() -> None:
    by_gpu = vllm_by_gpu(compose(COMPOSE)["services"])
    assert sorted(by_gpu.values()) == [["vllm-llama"], ["vllm-qwen"]]


def test_compose_shared_gpu_starts_the_second_vllm_once_the_first_is_healthy() -> None:
    services = compose(COMPOSE_SHARED_GPU)["services"]
    by_gpu = vllm_by_gpu(services)
    shared = [names for names in by_gpu.values() if len(names) > 1]
    assert shared == [["vllm-llama", "vllm-qwen"]]
    for names in shared:
        waiting = []
        for name in names:
            depends_on = services[name].get("depends_on", {})
            for other in names:
                if depends_on.get(other, {}).get("condition") == "service_healthy":
                    assert "/health" in " ".join(services[other]["healthcheck"]["test"])
                    waiting.append(name)
        # All but the first wait for another one on their GPU.
        assert len(waiting) == len(names) - 1
