"""The cluster's configuration and certificates, without starting it."""

from __future__ import annotations

import ssl
from pathlib import Path

from paysentinel.cluster import SERVICES, ClusterPorts, ServerBinaries, TemporalCluster, make_certificates


def cluster(tmp_path: Path) -> TemporalCluster:
    fake = ServerBinaries(tmp_path / "server", tmp_path / "sql", tmp_path / "schema")
    return TemporalCluster(fake, tmp_path / "temporal", tmp_path / "state", ports=ClusterPorts.free())


def test_each_service_has_its_own_ports_on_loopback(tmp_path: Path):
    c = cluster(tmp_path)
    config = c.config()
    assert set(config["services"]) == set(SERVICES)
    rpcs = [config["services"][s]["rpc"] for s in SERVICES]
    ports = [r["grpcPort"] for r in rpcs] + [r["membershipPort"] for r in rpcs]
    assert len(set(ports)) == len(ports)
    assert all(r["bindOnIP"] == "127.0.0.1" for r in rpcs)
    assert all(r["membershipPort"] < 32768 for r in rpcs)  # Temporal's SQL membership table: smallint
    assert config["persistence"]["datastores"]["default"]["sql"]["pluginName"] == "postgres12"
    assert config["persistence"]["datastores"]["visibility"]["sql"]["databaseName"] == "temporal_visibility"
    assert c.service_command("history")[-2:] == ["--service", "history"]


def test_the_frontend_requires_client_certificates_from_the_clusters_ca(tmp_path: Path):
    c = cluster(tmp_path)
    tls = c.config()["global"]["tls"]
    assert tls["frontend"]["server"]["requireClientAuth"] is True
    assert tls["frontend"]["server"]["clientCaFiles"] == [str(c.certs.ca)]
    assert tls["systemWorker"]["certFile"] == str(c.certs.client_cert)
    env = c.client_env()
    assert env["TEMPORAL_ADDRESS"] == f"127.0.0.1:{c.ports.frontend}"
    assert env["TEMPORAL_TLS_CLIENT_CERT_PATH"] == str(c.certs.client_cert)


def test_certificates_chain_to_the_ca(tmp_path: Path):
    certs = make_certificates(tmp_path)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(certs.server_cert, certs.server_key)
    server.load_verify_locations(certs.ca)
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certs.ca))
    client.load_cert_chain(certs.client_cert, certs.client_key)
    assert (certs.client_key.stat().st_mode & 0o777) == 0o600
    from cryptography import x509

    server_cert = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    names = server_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_cluster_commands_without_a_cluster(tmp_path: Path):
    from typer.testing import CliRunner

    from paysentinel.cli import app

    runner = CliRunner()
    status = runner.invoke(app, ["cluster", "status", "--state-dir", str(tmp_path)])
    assert status.exit_code == 1 and "no cluster in" in status.output
    down = runner.invoke(app, ["cluster", "down", "--state-dir", str(tmp_path)])
    assert down.exit_code == 0 and "no cluster in" in down.output
