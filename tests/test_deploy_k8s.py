"""deploy/k8s/ and docker-compose.yml describe the same system: the same parts (commands), the
same settings, the same ports, health checks on /health and Prometheus scraping the ports that
serve /metrics. Checked without a cluster or a Docker engine."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from paysentinel.cli import app
from paysentinel.config import SECRETS, Settings
from paysentinel.profile import secret_problems
from tests.test_compose import APP_SERVICES, COMPOSE, _secret_files

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
DOCS = [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]
SETTINGS = Settings()
# The port each part listens on (its /health), by the paysentinel command that runs it.
PART_PORTS = {
    "api": SETTINGS.api_port,
    "webhooks": SETTINGS.webhook_port,
    "operator-api": SETTINGS.operator_port,
    "simulator": SETTINGS.simulator_port,
    "worker": SETTINGS.metrics_port,
}
# What the Kubernetes example adds to compose's settings: the Temporal client's mTLS files
# (compose's Temporal runs without TLS).
K8S_ONLY = {
    "TEMPORAL_NAMESPACE",
    "TEMPORAL_TLS_SERVER_CA_CERT_PATH",
    "TEMPORAL_TLS_CLIENT_CERT_PATH",
    "TEMPORAL_TLS_CLIENT_KEY_PATH",
}


def of_kind(kind: str) -> list[dict]:
    return [doc for doc in DOCS if doc["kind"] == kind]


def workloads() -> dict[str, dict]:
    """The single container of each Deployment and Job, by its paysentinel command."""
    found = {}
    for doc in of_kind("Deployment") + of_kind("Job"):
        [container] = doc["spec"]["template"]["spec"]["containers"]
        found[" ".join(container["args"])] = {"doc": doc, "container": container}
    return found


def config_map() -> dict[str, str]:
    [config] = [doc for doc in of_kind("ConfigMap") if doc["metadata"]["name"] == "paysentinel-env"]
    return config["data"]


def compose_health_port(service: dict) -> int | None:
    test = " ".join(service.get("healthcheck", {}).get("test", []))
    if "/health" not in test:
        return None
    return int(test.split("http://127.0.0.1:")[1].split("/")[0])


def test_the_same_parts_run_the_same_commands():
    compose = {" ".join(service["command"]) for service in APP_SERVICES.values()}
    assert set(workloads()) == compose
    runner = CliRunner()
    for command in workloads():
        assert runner.invoke(app, [*command.split(), "--help"]).exit_code == 0, command
    [job] = of_kind("Job")
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["db", "upgrade"]
    replicas = {cmd: w["doc"]["spec"].get("replicas") for cmd, w in workloads().items() if w["doc"]["kind"] == "Deployment"}
    assert replicas["worker"] >= 2 and replicas["api"] >= 2 and replicas["webhooks"] >= 2


def test_the_same_settings():
    compose_env = COMPOSE["x-app"]["environment"]
    k8s_env = config_map()
    assert set(compose_env) <= set(k8s_env), f"missing in deploy/k8s/config.yaml: {set(compose_env) - set(k8s_env)}"
    assert set(k8s_env) - set(compose_env) <= K8S_ONLY, set(k8s_env) - set(compose_env)
    for key in compose_env:
        if key.endswith("_FILE") or key in ("PAYSENTINEL_ENV", "PAYSENTINEL_HOST"):
            assert k8s_env[key] == compose_env[key], key  # the same secret files, the same profile
    for workload in workloads().values():
        container = workload["container"]
        assert container["envFrom"] == [{"configMapRef": {"name": "paysentinel-env"}}]
        assert "env" not in container, "every setting comes from the ConfigMap"


def test_secrets_are_files_from_kubernetes_secrets():
    secrets = {doc["metadata"]["name"]: doc for doc in of_kind("Secret")}
    app_secret = secrets["paysentinel-secrets"]
    required = {secret.name for secret in SECRETS if secret.required}
    assert required <= set(app_secret["stringData"]), required - set(app_secret["stringData"])
    assert set(secrets["temporal-client-tls"]["stringData"]) == {"ca.pem", "client.pem", "client.key"}
    for command, workload in workloads().items():
        spec = workload["doc"]["spec"]["template"]["spec"]
        volumes = {v["name"]: v["secret"]["secretName"] for v in spec["volumes"]}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in workload["container"]["volumeMounts"]}
        assert mounts == {"/run/secrets": "paysentinel-secrets", "/run/temporal-tls": "temporal-client-tls"}, command
    env = config_map()
    for key, path in env.items():
        if key.endswith("_FILE"):
            assert path.startswith("/run/secrets/") and Path(path).name in app_secret["stringData"], key
        if key.startswith("TEMPORAL_TLS_"):
            assert path.startswith("/run/temporal-tls/") and Path(path).name in secrets["temporal-client-tls"]["stringData"], key


def test_the_configuration_is_valid_settings_and_client_configuration(monkeypatch, tmp_path):
    env = _secret_files(config_map(), tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert secret_problems(settings) == []
    assert settings.env == "production"
    from paysentinel.temporal import client_profile

    profile = client_profile()
    assert profile.address == settings.effective_temporal_address
    assert profile.tls is not None and profile.tls.client_cert is not None


def test_the_same_ports_and_health_checks():
    services = {" ".join(s["command"]): s for s in APP_SERVICES.values()}
    k8s_services = {doc["metadata"]["name"]: doc for doc in of_kind("Service")}
    for command, port in PART_PORTS.items():
        container = workloads()[command]["container"]
        assert port in {p["containerPort"] for p in container["ports"]}, command
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"] == {"path": "/health", "port": port}, (command, probe)
        assert compose_health_port(services[command]) == port, f"compose {command} health check"
        published = {int(p.split(":")[-1]) for p in services[command].get("ports", [])}
        if command != "worker":
            assert published == {port}, command
            name = workloads()[command]["doc"]["metadata"]["name"]
            assert [p["port"] for p in k8s_services[name]["spec"]["ports"]] == [port], name
            selector = k8s_services[name]["spec"]["selector"]
            labels = workloads()[command]["doc"]["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items(), name


def test_prometheus_scrapes_the_same_ports_as_compose():
    scrape = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    compose_targets = {t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    for command, workload in workloads().items():
        annotations = workload["doc"]["spec"]["template"]["metadata"].get("annotations", {})
        compose_name = next(name for name, s in APP_SERVICES.items() if " ".join(s["command"]) == command)
        if annotations:
            assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
            assert f"{compose_name}:{annotations['prometheus.io/port']}" in compose_targets, command
        else:
            assert not any(t.startswith(f"{compose_name}:") for t in compose_targets), command
    annotated = {cmd for cmd, w in workloads().items() if w["doc"]["spec"]["template"]["metadata"].get("annotations")}
    assert {"worker", "api", "webhooks"} <= annotated
