"""The Kubernetes examples under config/kubernetes/ are valid and agree with the proxy.

Every manifest validates offline, in strict mode (unknown fields are errors), against the schemas that
kubernetes-validate ships, for the oldest Kubernetes with native sidecars (1.29) and the newest it knows.
Then each proxy container is checked against its own ConfigMap, parsed with proxy.config: the ports it
names are the ones the configuration listens on, the probes hit /healthz and /readyz on the HTTP port,
every file the configuration names is mounted, and the shutdown timeout fits the grace period.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from examples import file_paths, load_with_stand_ins

REPO = Path(__file__).resolve().parents[2]
KUBERNETES = REPO / "config" / "kubernetes"
SCHEMA_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
PROXY_CONTAINER = "pg-tenant-proxy"


def documents(example: str) -> list[dict[str, Any]]:
    return [doc for path in sorted((KUBERNETES / example).glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [doc for doc in docs if doc["kind"] == kind]
    return found


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment")["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def proxy_container(pod: dict[str, Any]) -> dict[str, Any]:
    (found,) = [c for c in pod.get("initContainers", []) + pod["containers"] if c["name"] == PROXY_CONTAINER]
    return found


def port_of(listen: str) -> int:
    return int(listen.rpartition(":")[2])


def config_path(container: dict[str, Any]) -> str:
    args = container["args"]
    return str(args[args.index("--config") + 1])


def mount_for(container: dict[str, Any], pod: dict[str, Any], path: str) -> tuple[dict[str, Any], str]:
    """The volume that holds `path` in `container`, and the path inside the volume."""
    mounts = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mounts, f"{path} is not under any volume mounted in {container['name']}"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return volume, path[len(mount["mountPath"].rstrip("/")) + 1:]


def files_in(volume: dict[str, Any], docs: list[dict[str, Any]]) -> set[str]:
    """The file names a ConfigMap or Secret volume provides (a Secret's by its explicit items)."""
    if "configMap" in volume:
        (configmap,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == volume["configMap"]["name"]]
        return set(configmap["data"])
    assert "secret" in volume, volume
    return {item["path"] for item in volume["secret"]["items"]}


def proxy_toml(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The proxy's configuration as the Deployment mounts it, parsed."""
    pod = pod_spec(docs)
    container = proxy_container(pod)
    volume, name = mount_for(container, pod, config_path(container))
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == volume["configMap"]["name"]]
    return tomllib.loads(configmap["data"][name])


def probe_target(container: dict[str, Any], probe: str) -> tuple[str, int]:
    """(path, port number) of an httpGet probe, resolving a named port."""
    get = container[probe]["httpGet"]
    port = get["port"]
    if isinstance(port, str):
        (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return get["path"], int(port)


def test_the_examples_exist() -> None:
    assert {path.name for path in KUBERNETES.iterdir() if path.is_dir()} == {"sidecar", "central"}
    assert {d["kind"] for d in documents("central")} >= {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"}


@pytest.mark.parametrize("path", sorted(KUBERNETES.glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_manifest_validates_against_the_kubernetes_schemas(path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: checked against the Service in test_central_example_service_and_scrape
        for version in SCHEMA_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_refuses_what_it_should() -> None:
    deployment = one(documents("sidecar"), "Deployment")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["initContainers"][0]["readinessProbee"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, SCHEMA_VERSIONS[0], strict=True)
    with pytest.raises(kubernetes_validate.ValidationError):  # native sidecars need 1.28 or later
        kubernetes_validate.validate(deployment, "1.27.0", strict=True)


@pytest.mark.parametrize("example", ["sidecar", "central"])
def test_ports_probes_and_files_match_the_configuration(example: str, tmp_path: Path) -> None:
    docs = documents(example)
    pod = pod_spec(docs)
    container = proxy_container(pod)
    raw = proxy_toml(docs)
    settings = load_with_stand_ins(raw, tmp_path)
    http_port = port_of(raw["http"]["listen"])
    assert probe_target(container, "livenessProbe") == ("/healthz", http_port)
    assert probe_target(container, "startupProbe") == ("/healthz", http_port)
    assert probe_target(container, "readinessProbe") == ("/readyz", http_port)
    ports = {p["containerPort"] for p in container["ports"]}
    assert http_port in ports
    if settings.listen_host not in ("127.0.0.1", "localhost", "::1"):
        assert settings.listen_port in ports
    for path in file_paths(raw) + [config_path(container)]:
        volume, name = mount_for(container, pod, path)
        assert name in files_in(volume, docs), f"{path}: {name} is not in volume {volume['name']}"
    annotations = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(http_port) and annotations["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize("example", ["sidecar", "central"])
def test_proxy_runs_unprivileged_with_a_read_only_root(example: str) -> None:
    pod = pod_spec(documents(example))
    container = proxy_container(pod)
    security = container["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] and security["runAsNonRoot"]
    assert security["runAsUser"] != 0 and security["readOnlyRootFilesystem"]
    assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    # A read-only root leaves /tmp to an emptyDir (the workers' rendezvous directory lives there).
    volume, _ = mount_for(container, pod, "/tmp/pgtp-workers")
    assert "emptyDir" in volume


def test_sidecar_is_native_and_shares_the_socket_directory() -> None:
    docs = documents("sidecar")
    pod = pod_spec(docs)
    (sidecar,) = pod["initContainers"]
    assert sidecar["name"] == PROXY_CONTAINER and sidecar["restartPolicy"] == "Always"
    raw = proxy_toml(docs)
    socket_path = raw["listen_unix"]
    directory, _, name = socket_path.rpartition("/")
    match = re.fullmatch(r"\.s\.PGSQL\.(\d+)", name)
    assert match, f"{socket_path} does not follow libpq's .s.PGSQL.<port> naming"
    volume, _ = mount_for(sidecar, pod, socket_path)
    assert "emptyDir" in volume
    for app in pod["containers"]:
        assert mount_for(app, pod, socket_path)[0] is volume
        env = {item["name"]: item["value"] for item in app["env"]}
        assert env["PGHOST"] == directory and env["PGPORT"] == match.group(1)


def test_central_example_drains_within_the_grace_period() -> None:
    docs = documents("central")
    pod = pod_spec(docs)
    container = proxy_container(pod)
    raw = proxy_toml(docs)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > int(command[1]) + raw["shutdown_timeout"]
    assert raw["tls"]["client_sslmode"] == "require"
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] >= 2 and deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_central_example_service_and_scrape() -> None:
    docs = documents("central")
    labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    container = proxy_container(pod_spec(docs))
    named_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    raw = proxy_toml(docs)
    service = one(docs, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    assert one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    targets = {p["name"]: named_ports[p["targetPort"]] for p in service["spec"]["ports"]}
    assert targets == {"postgres": port_of(raw["listen"]), "http": port_of(raw["http"]["listen"])}
    monitor = one(docs, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [(e["port"], e["path"]) for e in monitor["spec"]["endpoints"]] == [("http", "/metrics")]


@pytest.mark.parametrize("example", ["sidecar", "central"])
def test_image_and_config_path_match_the_dockerfile(example: str) -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    container = proxy_container(pod_spec(documents(example)))
    assert container["image"] == f"pg-tenant-proxy:{version}"
    dockerfile = (REPO / "Dockerfile").read_text()
    assert f'CMD ["run", "--config", "{config_path(container)}"]' in dockerfile
    raw = proxy_toml(documents(example))
    assert f"HEALTHCHECK_URL=http://127.0.0.1:{port_of(raw['http']['listen'])}/healthz" in dockerfile
