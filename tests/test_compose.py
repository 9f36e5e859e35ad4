"""docker-compose.yml is checked without a Docker engine: structure, commands and wiring."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from paysentinel.cli import app
from paysentinel.config import Settings

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
    assert set(APP_SERVICES) == {"migrate", "simulator", "worker", "api", "webhooks"}
    runner = CliRunner()
    for name, service in APP_SERVICES.items():
        result = runner.invoke(app, [*service["command"], "--help"])
        assert result.exit_code == 0, f"{name}: `paysentinel {' '.join(service['command'])}` is not a command"


def test_app_configuration_is_valid_settings(monkeypatch):
    environment = APP_SERVICES["worker"]["environment"]
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.effective_temporal_address == "temporal:7233"
    assert settings.effective_database_url.startswith("postgresql+asyncpg://")
    published = {int(p.split(":")[1]) for s in APP_SERVICES.values() for p in s.get("ports", [])}
    assert published == {settings.api_port, settings.webhook_port, settings.simulator_port}
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
        f"api:{settings.api_port}", f"webhooks:{settings.webhook_port}",
        f"worker:{settings.metrics_port}", f"worker:{settings.sdk_metrics_port}",
    }
    assert scrape["rule_files"] == ["/etc/prometheus/alerts.yml"]
