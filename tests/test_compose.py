"""docker-compose.yml is checked without a Docker engine: structure, commands and wiring."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from paysentinel.cli import app
from paysentinel.config import DEV_WEBHOOK_SECRET, SECRETS, Settings, new_webhook_secret
from paysentinel.profile import secret_problems, secured
from paysentinel.runner import PARTS
from tests.helpers import own_operator_tokens

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
APP_SERVICES = {name: s for name, s in SERVICES.items() if s.get("image") == "paysentinel:local"}


def test_every_dependency_is_a_service_with_the_right_condition():
    for name, service in SERVICES.items():
        for dependency, rule in (service.get("depends_on") or {}).items():
            assert dependency in SERVICES, f"{name} depends on unknown service {dependency}"
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in SERVICES[dependency], f"{dependency} has no healthcheck for {name}"


def test_app_services_run_real_cli_commands():
    assert set(APP_SERVICES) == {"migrate", "simulator", "worker", "api", "webhooks", "operator"}
    runner = CliRunner()
    for name, service in APP_SERVICES.items():
        result = runner.invoke(app, [*service["command"], "--help"])
        assert result.exit_code == 0, f"{name}: `paysentinel {' '.join(service['command'])}` is not a command"


def _secret_files(environment: dict[str, str], tmp_path: Path, value: str | None = None) -> dict[str, str]:
    """The environment with each /run/secrets/<name> file (what Compose mounts) made in tmp_path."""
    operator = own_operator_tokens()
    env = dict(environment)
    for key, path in environment.items():
        if key.endswith("_FILE"):
            local = tmp_path / Path(path).name
            content = value or (operator if "OPERATOR" in key else new_webhook_secret())
            local.write_text(content + "\n")
            env[key] = str(local)
    return env


def test_app_configuration_is_valid_settings(monkeypatch, tmp_path):
    environment = _secret_files(APP_SERVICES["worker"]["environment"], tmp_path)
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.effective_temporal_address == "temporal:7233"
    assert settings.effective_database_url.startswith("postgresql+asyncpg://")
    published = {int(p.split(":")[1]) for s in APP_SERVICES.values() for p in s.get("ports", [])}
    assert published == {settings.api_port, settings.webhook_port, settings.simulator_port, settings.operator_port}
    assert (ROOT / "Dockerfile").read_text().count('ENTRYPOINT ["paysentinel"]') == 1


def test_monitoring_services_mount_files_that_exist_and_scrape_real_ports():
    for name in ("prometheus", "grafana"):
        for volume in SERVICES[name]["volumes"]:
            source = volume.split(":")[0]
            assert (ROOT / source).exists(), f"{name} mounts missing {source}"
    scrape = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = {t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    settings = Settings()
    assert targets == {
        f"api:{settings.api_port}",
        f"webhooks:{settings.webhook_port}",
        f"worker:{settings.metrics_port}",
        f"worker:{settings.sdk_metrics_port}",
    }
    assert scrape["rule_files"] == ["/etc/prometheus/alerts.yml"]


def test_every_secret_comes_from_a_compose_secret_file(monkeypatch, tmp_path):
    """Production profile; each required secret set only through a mounted file, never inline."""
    declared = COMPOSE["secrets"]
    for name, service in APP_SERVICES.items():
        environment = service["environment"]
        assert environment["PAYSENTINEL_ENV"] == "production", name
        for secret in SECRETS:
            assert secret.variable not in environment, f"{name} sets {secret.variable} inline"
            if not secret.required:
                continue
            path = environment.get(secret.file_variable)
            assert path == f"/run/secrets/{secret.name}", f"{name}: {secret.file_variable} is {path!r}"
            assert secret.name in service["secrets"], f"{name} does not mount secret {secret.name}"
            assert declared[secret.name]["file"] == f"./secrets/{secret.name}"
    text = (ROOT / "docker-compose.yml").read_text()
    assert all(f"> secrets/{secret.name}" in text for secret in SECRETS if secret.required), (
        "the comment tells how to create each secret file"
    )
    assert "/secrets/" in (ROOT / ".gitignore").read_text().split()

    # With the files in place the services start (here: their secrets pass); with a development
    # value in them, they are refused naming the variable.
    for key, value in _secret_files(APP_SERVICES["webhooks"]["environment"], tmp_path).items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.simulator_webhook_secret.startswith("whsec_") and not settings.simulator_webhook_secret.endswith("\n")
    assert secret_problems(settings) == []
    assert secured(settings, ["webhooks"], PARTS) is settings
    dev = tmp_path / "dev"
    dev.mkdir()
    monkeypatch.setenv("PAYSENTINEL_SIMULATOR_WEBHOOK_SECRET_FILE", str(dev / "s"))
    (dev / "s").write_text(DEV_WEBHOOK_SECRET + "\n")
    [problem] = secret_problems(Settings())
    assert "PAYSENTINEL_SIMULATOR_WEBHOOK_SECRET" in problem
