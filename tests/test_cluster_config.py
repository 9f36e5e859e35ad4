"""The cluster's configuration and certificates, without starting it."""

from __future__ import annotations

import ssl
from pathlib import Path

import yaml

from paysentinel.cluster import PROCESSES, SERVICES, UI, ClusterPorts, ServerBinaries, TemporalCluster, make_certificates


def cluster(tmp_path: Path, **options) -> TemporalCluster:
    fake = ServerBinaries(tmp_path / "server", tmp_path / "sql", tmp_path / "schema", tmp_path / "ui" / "server")
    return TemporalCluster(fake, tmp_path / "temporal", tmp_path / "state", ports=ClusterPorts.free(), **options)


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


def test_the_web_ui_server_calls_the_frontend_with_the_client_certificate(tmp_path: Path):
    c = cluster(tmp_path, namespace="shop")
    config = c.ui_config()
    assert config["temporalGrpcAddress"] == c.address
    assert (config["host"], config["port"]) == ("127.0.0.1", c.ports.ui)
    assert config["enableUi"] is True and config["defaultNamespace"] == "shop"
    assert config["tls"] == {
        "caFile": str(c.certs.ca),
        "certFile": str(c.certs.client_cert),
        "keyFile": str(c.certs.client_key),
        "serverName": "localhost",
        "enableHostVerification": True,
    }
    assert config["cors"]["allowOrigins"][0] == c.ui_url == f"http://127.0.0.1:{c.ports.ui}"
    assert "codec" not in config
    # Its port is the cluster's own; it starts last, after the frontend.
    assert PROCESSES[-1] == UI and PROCESSES.index("frontend") < PROCESSES.index(UI)
    assert c.ports.ui not in [c.ports.grpc(s) for s in SERVICES] + [c.ports.membership(s) for s in SERVICES]
    assert c.ports.listening(UI) == c.ports.ui
    # `server --root <state> --config ui-config --env cluster start` reads <state>/ui-config/cluster.yaml.
    command = c.ui_command()
    assert command[0] == str(c.binaries.ui_server) and command[-1] == "start"
    root, config_dir, env = (command[command.index(flag) + 1] for flag in ("--root", "--config", "--env"))
    c.write_config()
    assert yaml.safe_load((Path(root) / config_dir / f"{env}.yaml").read_text()) == config
    assert not (c.state_dir / "config" / f"{env}.yaml").samefile(Path(root) / config_dir / f"{env}.yaml")


def test_the_web_ui_decodes_payloads_at_the_codec_endpoint_when_one_is_given(tmp_path: Path):
    c = cluster(tmp_path, ui_codec_endpoint="http://127.0.0.1:8004/codec")
    assert c.ui_config()["codec"] == {
        "endpoint": "http://127.0.0.1:8004/codec",
        "passAccessToken": False,
        "includeCredentials": True,
    }


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
