"""How every process finds Temporal: settings plus the SDK's environment configuration (a TOML
profile and TEMPORAL_* variables), without a server."""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.service import TLSConfig

from paysentinel.cluster import make_certificates
from paysentinel.config import Settings
from paysentinel.temporal import configured_address, connect, connect_options
from tests.conftest import TEST_PAYLOAD_KEYS


def test_defaults_reach_the_local_dev_server():
    options = connect_options(Settings(), environ={})
    assert options == {"target_host": "127.0.0.1:7233", "namespace": "default"}
    assert configured_address(Settings(), environ={}) == ""


def test_a_toml_profile_with_variables_over_it(tmp_path: Path):
    certs = make_certificates(tmp_path / "tls")
    config = tmp_path / "temporal.toml"
    config.write_text(f"""
[profile.default]
address = "default.example:7233"

[profile.cloud]
address = "payments.a1b2c.tmprl.cloud:7233"
namespace = "payments.a1b2c"
[profile.cloud.tls]
client_cert_path = "{certs.client_cert}"
client_key_path = "{certs.client_key}"
""")
    env = {"TEMPORAL_CONFIG_FILE": str(config), "TEMPORAL_PROFILE": "cloud"}
    options = connect_options(Settings(), environ=env)
    assert options["target_host"] == "payments.a1b2c.tmprl.cloud:7233"
    assert options["namespace"] == "payments.a1b2c"
    tls = options["tls"]
    assert isinstance(tls, TLSConfig) and tls.client_cert == certs.client_cert.read_bytes()
    assert configured_address(Settings(), environ=env) == "payments.a1b2c.tmprl.cloud:7233"
    # A variable wins over the profile; PAYSENTINEL_TEMPORAL_NAMESPACE and TEMPORAL_ADDRESS win over both.
    assert connect_options(Settings(), environ={**env, "TEMPORAL_NAMESPACE": "other"})["namespace"] == "other"
    explicit = Settings(TEMPORAL_ADDRESS="127.0.0.1:9999", temporal_namespace="mine")
    options = connect_options(explicit, environ=env)
    assert (options["target_host"], options["namespace"]) == ("127.0.0.1:9999", "mine")


def test_an_api_key_turns_tls_on():
    options = connect_options(
        Settings(),
        environ={
            "TEMPORAL_ADDRESS": "us-east-1.aws.api.temporal.io:7233",
            "TEMPORAL_NAMESPACE": "payments.a1b2c",
            "TEMPORAL_API_KEY": "key-123",
        },
    )
    assert options["api_key"] == "key-123" and options["tls"] is True
    assert options["namespace"] == "payments.a1b2c"


def test_a_missing_tls_file_says_which_variable(tmp_path: Path):
    env = {
        "TEMPORAL_ADDRESS": "127.0.0.1:7233",
        "TEMPORAL_TLS_CLIENT_CERT_PATH": str(tmp_path / "nope.pem"),
        "TEMPORAL_TLS_CLIENT_KEY_PATH": str(tmp_path / "nope.key"),
    }
    with pytest.raises(RuntimeError, match="TEMPORAL_TLS_CLIENT_CERT_PATH"):
        connect_options(Settings(), environ=env)


async def test_nothing_listening_says_where_it_tried():
    from paysentinel.devserver import free_port

    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(RuntimeError) as failed:
        await connect(Settings(TEMPORAL_ADDRESS=address, payload_keys=TEST_PAYLOAD_KEYS), environ={})
    assert f"cannot connect to Temporal at {address} (namespace default, without TLS)" in str(failed.value)
    assert "TEMPORAL_ADDRESS" in str(failed.value)
