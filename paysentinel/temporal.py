"""One way to reach Temporal: the same address, namespace and data converter everywhere."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Optional

from temporalio.client import Client, Schedule, ScheduleAlreadyRunningError, ScheduleUpdate, ScheduleUpdateInput
from temporalio.envconfig import ClientConfigProfile
from temporalio.runtime import Runtime
from temporalio.service import TLSConfig

from paysentinel import tracing
from paysentinel.codec import data_converter_for
from paysentinel.config import Settings


def client_profile(environ: Optional[Mapping[str, str]] = None) -> ClientConfigProfile:
    """The Temporal SDK's environment configuration: the profile (``TEMPORAL_PROFILE``, default
    ``default``) of the TOML file (``TEMPORAL_CONFIG_FILE``, default
    ``~/.config/temporalio/temporal.toml``) with the ``TEMPORAL_*`` variables over it: address,
    namespace, ``TEMPORAL_API_KEY``, ``TEMPORAL_TLS*`` (server CA, client certificate and key for
    mTLS, server name), ``TEMPORAL_GRPC_META_*``."""
    try:
        return ClientConfigProfile.load(override_env_vars=dict(os.environ if environ is None else environ))
    except Exception as err:  # noqa: BLE001 - a configuration mistake, said with what to fix
        raise RuntimeError(
            f"the Temporal client configuration cannot be loaded: {err}. Check TEMPORAL_CONFIG_FILE / "
            "TEMPORAL_PROFILE (a TOML file with [profile.<name>]) and the TEMPORAL_* variables."
        ) from err


def configured_address(settings: Settings, environ: Optional[Mapping[str, str]] = None) -> str:
    """The Temporal address this deployment is configured with (TEMPORAL_ADDRESS or the profile's),
    or "" when none is (then `paysentinel up` starts a dev server)."""
    return settings.temporal_address or (client_profile(environ).address or "")


def connect_options(settings: Settings, environ: Optional[Mapping[str, str]] = None) -> dict[str, Any]:
    """What ``Client.connect`` gets from the settings and the environment configuration.

    The address is TEMPORAL_ADDRESS (or the profile's, else the local dev server's); the namespace
    PAYSENTINEL_TEMPORAL_NAMESPACE when set, else the profile's (TEMPORAL_NAMESPACE), else "default".
    TLS, the client certificate and the API key come from the profile."""
    try:
        options: dict[str, Any] = dict(client_profile(environ).to_client_connect_config())
    except OSError as err:  # a TLS file that cannot be read
        raise RuntimeError(
            f"a Temporal TLS file cannot be read: {err}. Check TEMPORAL_TLS_SERVER_CA_CERT_PATH, "
            "TEMPORAL_TLS_CLIENT_CERT_PATH and TEMPORAL_TLS_CLIENT_KEY_PATH (or the profile's "
            "tls section)."
        ) from err
    profile_address = options.pop("target_host", None)
    profile_namespace = options.pop("namespace", None)
    options["target_host"] = settings.temporal_address or profile_address or settings.effective_temporal_address
    explicit = "temporal_namespace" in settings.model_fields_set
    options["namespace"] = settings.temporal_namespace if explicit or not profile_namespace else profile_namespace
    return options


def _describe_tls(options: dict[str, Any], environ: Mapping[str, str]) -> str:
    tls = options.get("tls")
    if not tls:
        return "without TLS"
    parts = ["with TLS"]
    if isinstance(tls, TLSConfig):
        parts.append(
            "client certificate "
            + ("from " + environ.get("TEMPORAL_TLS_CLIENT_CERT_PATH", "the profile") if tls.client_cert else "none")
        )
        parts.append(
            "server CA "
            + (
                "from " + environ.get("TEMPORAL_TLS_SERVER_CA_CERT_PATH", "the profile")
                if tls.server_root_ca_cert
                else "the system's"
            )
        )
        if tls.domain:
            parts.append(f"server name {tls.domain}")
    if options.get("api_key"):
        parts.append("an API key")
    return ", ".join(parts)


def connection_advice(error: str, options: dict[str, Any], environ: Mapping[str, str]) -> str:
    """What to fix, from what went wrong when connecting."""
    text = error.lower()
    tls_words = (
        "certificate",
        "handshake",
        "tls",
        "unknownca",
        "unknown ca",
        "badcert",
        "unknownissuer",
        "alert",
        "invalidcertificate",
    )
    # A server that refuses our client certificate (TLS 1.3) closes the stream right after the handshake.
    refused_after_handshake = options.get("tls") and any(
        word in text for word in ("broken pipe", "connection reset", "transport error", "connection closed", "canceled")
    )
    if any(word in text for word in tls_words) or refused_after_handshake:
        client_cert = isinstance(options.get("tls"), TLSConfig) and options["tls"].client_cert
        missing = "" if client_cert else ("no client certificate is configured, and the server may require one (mTLS); ")
        return (
            f"the TLS handshake failed: {missing}TEMPORAL_TLS_SERVER_CA_CERT_PATH must be the CA that signed the "
            "server's certificate, TEMPORAL_TLS_SERVER_NAME a name in it, and for mTLS "
            "TEMPORAL_TLS_CLIENT_CERT_PATH / TEMPORAL_TLS_CLIENT_KEY_PATH a certificate and key signed by a CA "
            "the server trusts (Temporal Cloud: the CA certificate uploaded for the namespace)"
        )
    if any(word in text for word in ("unauthenticated", "permission", "unauthorized", "api key", "forbidden")):
        return (
            "the server refused our credentials: check TEMPORAL_API_KEY (Temporal Cloud: an API key with access "
            "to the namespace) or the client certificate, and the namespace"
        )
    if not options.get("tls") and any(
        word in text for word in ("connection reset", "broken pipe", "h2 protocol", "frame", "eof")
    ):
        return "the server may require TLS: set TEMPORAL_TLS=true (and the TEMPORAL_TLS_* files for mTLS)"
    return (
        "start the local stack with `paysentinel up`, or set TEMPORAL_ADDRESS (and TEMPORAL_NAMESPACE, "
        "TEMPORAL_TLS_* or TEMPORAL_API_KEY) to your Temporal cluster"
    )


async def connect(
    settings: Settings, runtime: Optional[Runtime] = None, *, environ: Optional[Mapping[str, str]] = None
) -> Client:
    """The one way every process (worker, starters, CLI, tests, benchmarks) connects: the pydantic
    data converter with the payload encryption codec, so no customer data reaches the history;
    address, namespace, TLS and API key from the settings and the SDK's environment configuration
    (``environ``: these variables instead of the process's)."""
    environ = dict(os.environ if environ is None else environ)
    converter = data_converter_for(settings)
    options = connect_options(settings, environ)
    target = options.pop("target_host")
    try:
        return await Client.connect(
            target,
            **options,
            data_converter=converter,
            runtime=runtime,
            interceptors=tracing.interceptors(settings),
        )
    except (RuntimeError, OSError, ValueError) as err:
        options["target_host"] = target
        advice = connection_advice(str(err), options, environ).rstrip(".")
        raise RuntimeError(
            f"cannot connect to Temporal at {target} (namespace {options['namespace']}, "
            f"{_describe_tls(options, environ)}): {err}. What to fix: {advice}."
        ) from err


async def ensure_schedule(client: Client, schedule_id: str, schedule: Schedule) -> None:
    """Create the schedule, or bring an existing one to ``schedule`` (settings may have changed)."""
    try:
        await client.create_schedule(schedule_id, schedule)
    except ScheduleAlreadyRunningError:

        async def replace(_: ScheduleUpdateInput) -> ScheduleUpdate:
            return ScheduleUpdate(schedule=schedule)

        await client.get_schedule_handle(schedule_id).update(replace)


async def remove_schedule(client: Client, schedule_id: str) -> bool:
    """Delete the schedule if there is one; True when one was deleted."""
    try:
        await client.get_schedule_handle(schedule_id).delete()
        return True
    except Exception:  # noqa: BLE001 - RPCError NOT_FOUND: there was none
        return False
