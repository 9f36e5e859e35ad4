"""All configuration comes from environment variables (prefix ``PAYSENTINEL_``).

Defaults run the whole system on one machine with no set-up: a Temporal dev server
started by ``paysentinel up``, a SQLite application database and the provider simulator.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets as _random
from hashlib import sha256
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Annotated, Any, Literal, cast
from pathlib import Path

from pydantic import Field, field_validator


from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

if TYPE_CHECKING:
    from paysentinel.models import PaymentTiming

DEFAULT_DATA_DIR = Path.home() / ".local" / "share" / "paysentinel"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "paysentinel"
# A development secret in the Standard Webhooks format. Production sets its own.
DEV_WEBHOOK_SECRET = "whsec_cGF5c2VudGluZWwtbG9jYWwtZGV2ZWxvcG1lbnQtc2VjcmV0"
# Values published in this repository (the operator token also as its SHA-256): refused as
# secrets, or as any ':'-separated part of one, outside the development profile.
DEVELOPMENT_SECRET_VALUES = frozenset(
    {
        DEV_WEBHOOK_SECRET,
        "dev-operator-token",
        "operator:dev-operator-token",
        sha256(b"dev-operator-token").hexdigest(),
    }
)


def new_webhook_secret() -> str:
    """A fresh Standard Webhooks secret (``whsec_`` + 32 random bytes in base64)."""
    return "whsec_" + base64.b64encode(_random.token_bytes(32)).decode()


@dataclass(frozen=True)
class Secret:
    """A secret setting. Outside the development profile a required one must be set, and none
    may hold a development value (see paysentinel/profile.py); each can come from a file."""

    name: str  # the Settings field
    required: bool = True  # optional ones (a rotation's previous value) are checked only when set
    generate: Callable[[], str] | None = None  # how `paysentinel up` makes one in development

    @property
    def variable(self) -> str:
        return f"PAYSENTINEL_{self.name.upper()}"

    @property
    def file_variable(self) -> str:
        return f"{self.variable}_FILE"


# Every secret setting, in one place: add yours here (and its field to Settings).
SECRETS: list[Secret] = [
    Secret("simulator_webhook_secret", generate=new_webhook_secret),
    Secret("simulator_webhook_secret_previous", required=False),
    Secret("merchant_webhook_secret", generate=new_webhook_secret),
    Secret("merchant_webhook_secret_previous", required=False),
    Secret("operator_tokens"),  # development keeps operator:dev-operator-token
    Secret("payload_keys"),  # development makes its own key file in the data dir (paysentinel/codec.py)
    # Real providers' credentials: required only by a provider listed in PAYSENTINEL_PROVIDERS.
    Secret("alipay_private_key", required=False),
    Secret("alipay_public_key", required=False),  # not secret, but a PEM file is the easy way to give it
    Secret("wechatpay_public_key", required=False),  # likewise
    Secret("wechatpay_private_key", required=False),
    Secret("wechatpay_apiv3_key", required=False),
    Secret("stripe_api_key", required=False),
    Secret("stripe_webhook_secret", required=False),
]


class SecretFilesSource(PydanticBaseSettingsSource):
    """``PAYSENTINEL_<SECRET>_FILE``: the secret is the file's content (as Docker and Kubernetes
    mount secrets), its trailing newline stripped."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # __call__ reads the files

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for secret in SECRETS:
            path = os.environ.get(secret.file_variable)
            if not path:
                continue
            if os.environ.get(secret.variable):
                raise ValueError(f"set {secret.variable} or {secret.file_variable}, not both")
            try:
                values[secret.name] = Path(path).read_text().rstrip("\r\n")
            except OSError as err:
                raise ValueError(f"{secret.file_variable}: cannot read {path}: {err.strerror}") from None
        return values


# Operators: "name:role:sha256-hex-of-token" entries; only the tokens' hashes are configured.
OPERATOR_ROLES = ("viewer", "operator", "approver")  # each may do what the ones before it may
DEV_OPERATOR_TOKEN = "dev-operator-token"  # the development operator's token (an approver)


def token_digest(token: str) -> str:
    """What PAYSENTINEL_OPERATOR_TOKENS holds of a token: its SHA-256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


DEV_OPERATOR = f"operator:approver:{token_digest(DEV_OPERATOR_TOKEN)}"
_OPERATOR_ENTRY = re.compile(r"^([A-Za-z0-9_.@-]{1,32}):(viewer|operator|approver):([0-9a-f]{64})$")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PAYSENTINEL_", env_file=".env", extra="ignore")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        return init_settings, env_settings, SecretFilesSource(settings_cls), dotenv_settings, file_secret_settings

    # "production" refuses development secrets even for `paysentinel up` on embedded defaults.
    env: Literal["development", "production"] = "development"

    # Temporal. An empty address means "start a local dev server" (paysentinel up).
    temporal_address: str = Field("", validation_alias="TEMPORAL_ADDRESS")
    temporal_namespace: str = "default"
    temporal_port: int = 7233
    temporal_ui_port: int = 8233
    task_queue: str = "paysentinel-payments"

    # Where local state lives (Temporal's SQLite file, the app's SQLite file, caches).
    data_dir: Path = DEFAULT_DATA_DIR
    cache_dir: Path = DEFAULT_CACHE_DIR

    # Application database: SQLite by default, PostgreSQL (asyncpg) in production.
    database_url: str = ""

    # HTTP services.
    host: str = "127.0.0.1"
    api_port: int = 8000
    operator_port: int = 8004  # the operator API (reviews, reconciliation, audit): keep it off the public network
    webhook_port: int = 8001
    simulator_port: int = 8002
    # Where the provider should send callbacks (our webhook receiver, as the provider sees it).
    public_webhook_base_url: str = ""
    simulator_url: str = ""
    # Base of the pay URLs the simulator hands out (what a payer's browser can reach).
    simulator_public_url: str = ""

    # Webhooks from providers (secrets: see SECRETS; in development `paysentinel up` makes them).
    simulator_webhook_secret: str = ""
    simulator_webhook_secret_previous: str = ""  # still accepted while the provider rotates
    webhook_tolerance_seconds: int = 300
    webhook_max_body_bytes: int = 64 * 1024

    # Providers this deployment takes payments with (comma-separated: simulator, alipay,
    # wechatpay, stripe). Each real one needs its settings below; keys and secrets can come
    # from files (PAYSENTINEL_<NAME>_FILE), see SECRETS. README: "Going live with a provider".
    providers: Annotated[list[str], NoDecode] = ["simulator"]
    # Alipay open platform (RSA2): the app's id, its private key (PEM), Alipay's public key (PEM).
    alipay_app_id: str = ""
    alipay_gateway_url: str = "https://openapi.alipay.com/gateway.do"
    alipay_private_key: str = ""
    alipay_public_key: str = ""
    alipay_return_url: str = ""  # where the cashier page sends the payer back (page pay)
    # WeChat Pay API v3: merchant id, the app id the payments are for, the serial number of the
    # merchant API certificate and its private key (PEM), the APIv3 key (32 characters), and
    # WeChat Pay's public key (PEM) with its id (PUB_KEY_ID_...) that verifies its answers.
    wechatpay_mchid: str = ""
    wechatpay_appid: str = ""
    wechatpay_api_url: str = "https://api.mch.weixin.qq.com"
    wechatpay_cert_serial: str = ""
    wechatpay_private_key: str = ""
    wechatpay_apiv3_key: str = ""
    wechatpay_public_key: str = ""
    wechatpay_public_key_id: str = ""
    # Stripe: the secret API key, the webhook endpoint's signing secret (whsec_...).
    stripe_api_url: str = "https://api.stripe.com"
    stripe_api_key: str = ""
    stripe_webhook_secret: str = ""

    # Payment timing (the workflow receives these in its input, so they are in its history).
    callback_timeout_seconds: float = 10.0
    # Pauses between queries of a payment still waiting for its payer (the last repeats). They
    # grow to 30 minutes, so a payment with hours to live costs a query or two an hour.
    query_backoff_seconds: Annotated[list[float], NoDecode] = [5, 10, 30, 60, 120, 300, 600, 1800]
    payment_ttl_seconds: float = 900.0
    resend_window_seconds: float = 25 * 3600.0
    close_attempts: int = 5
    provider_timeout_seconds: float = 5.0
    provider_retry_initial_seconds: float = 1.0
    provider_max_attempts: int = 4
    checkout_wait_seconds: float = 10.0
    # Back-pressure on POST /payments: at most checkout_concurrency checkouts in flight per API
    # process; one more waits up to checkout_queue_seconds for a slot, then is answered 503 with
    # Retry-After (as is a checkout Temporal or the database is too busy to take).
    checkout_concurrency: int = Field(32, ge=1)
    checkout_queue_seconds: float = Field(1.0, ge=0)
    retry_after_seconds: int = Field(1, ge=1)  # what overload answers ask callers to wait

    # Worker tuning. A waiting payment is cheap while its workflow stays in the worker's cache;
    # one evicted from it is replayed from its first event at its next timer. Each cached payment
    # costs about 0.4 MiB of worker memory with the isolated sandbox, 0.17 MiB with the shared one
    # (benchmarks/waiting_payments.py): 2,000 keeps an isolated worker under 1 GiB.
    worker_max_cached_workflows: int = Field(2_000, ge=0)
    worker_max_concurrent_workflow_tasks: int = Field(100, ge=2)  # the Temporal SDK's defaults
    worker_max_concurrent_activities: int = Field(100, ge=1)
    # The workflow sandbox re-imports the workflow modules for each payment it starts or
    # replays: keep their compiled bytecode (under cache_dir) even where
    # PYTHONDONTWRITEBYTECODE is set, so it is not compiled from source every time.
    worker_bytecode_cache: bool = True
    # "isolated": each payment's workflow imports the workflow modules afresh inside the sandbox,
    # which then refuses non-deterministic calls in them (about 75 KiB and 6 ms per payment started
    # or replayed, benchmarks/sandbox_cost.py). "shared": the workflow modules are passed through
    # the sandbox, one copy for every payment (about 12 KiB and 0.5 ms), but the sandbox no longer
    # checks their calls; the tests and the release histories' replay (tests/test_replay.py) run
    # isolated and still do. With thousands of payments waiting, "shared" starts and replays them
    # at about twice the rate in less than half the memory (README, "Performance").
    worker_sandbox: Literal["isolated", "shared"] = "isolated"

    # Refunds and manual reviews.
    refund_window_seconds: float = 90 * 86400.0  # how long after payment a refund may be asked for
    refund_submissions: int = 3  # submissions of a failing refund before it goes to review
    review_escalate_seconds: float = 3600.0  # an undecided review raises the alarm after this
    review_deadline_seconds: float = 86400.0  # then the safe default applies
    # Operators: "name:role:sha256-hex-of-token" entries (comma-separated) of the operator API;
    # `paysentinel operator new NAME --role R` makes a token and its entry.
    operator_tokens: Annotated[list[str], NoDecode] = [DEV_OPERATOR]
    operator_token: str = ""  # what the CLI sends (default: the development token while DEV_OPERATOR is configured)
    operator_url: str = ""  # where the CLI finds the operator API (default: http://<host>:<operator port>)
    # Four eyes: a review decision moving more than this (minor units) needs a second approver.
    four_eyes_minor: int = Field(100_000, ge=0)

    # Payload encryption (paysentinel/codec.py): "id:base64key,..." (AES-256; the first encrypts,
    # all decrypt). A secret: empty means "generate a development key once into data_dir".
    payload_keys: str = ""
    # Origins allowed to call the codec endpoint (/codec) from a browser: the Temporal Web UI.
    # Empty: the dev server's Web UI (http://127.0.0.1:<temporal_ui_port>, http://localhost:<...>).
    codec_cors_origins: Annotated[list[str], NoDecode] = []

    # Notifications: e-mail to the customer (off while smtp_host is empty) and a signed
    # webhook to the merchant's notify_url (Standard Webhooks, this secret).
    smtp_host: str = ""
    smtp_port: int = 25
    smtp_from: str = "payments@paysentinel.local"
    merchant_webhook_secret: str = ""
    merchant_webhook_secret_previous: str = ""  # also signs while merchants rotate
    # Host names exempt from the "no internal addresses" rule for notify_url (e.g. a test receiver).
    notify_allowed_hosts: Annotated[list[str], NoDecode] = []
    notify_max_attempts: int = 8
    notify_retry_initial_seconds: float = 2.0

    # Abuse limits (token buckets: a rate per second and a burst; a rate of 0 turns one off) on
    # POST /payments and POST /webhooks/{provider}, per client (its credential, else its address)
    # and per address (IPv6 by /64). A request over either is answered 429 with Retry-After.
    rate_limit_payments_per_second: float = Field(50.0, ge=0)
    rate_limit_payments_burst: int = Field(200, ge=1)
    rate_limit_payments_address_per_second: float = Field(100.0, ge=0)
    rate_limit_payments_address_burst: int = Field(400, ge=1)
    rate_limit_webhooks_per_second: float = Field(100.0, ge=0)
    rate_limit_webhooks_burst: int = Field(500, ge=1)
    rate_limit_webhooks_address_per_second: float = Field(200.0, ge=0)
    rate_limit_webhooks_address_burst: int = Field(1000, ge=1)

    # Metrics: /metrics on the checkout API and the webhook receiver; the Temporal SDK's
    # worker metrics on their own port (0 turns them off); the app's metrics of a worker
    # started alone (`paysentinel worker`) on metrics_port.
    sdk_metrics_port: int = 8003
    metrics_port: int = 8005  # (8004 is the operator API's)

    # The monitor: a Temporal Schedule runs it every monitor_interval_seconds (0: no schedule)
    # over the payments that finished in the last monitor_window_seconds.
    monitor_interval_seconds: float = 60.0
    monitor_window_seconds: float = 900.0
    monitor_failure_threshold: float = 0.05
    monitor_timeout_threshold: float = 0.30
    monitor_min_payments: int = 20
    # Stuck money (the monitor's alert and paysentinel_stuck_payments): a payment CREATED or
    # PENDING this long past its time to live, or REFUNDING / IN_REVIEW this long without a
    # running refund or review workflow; a refund PROCESSING longer than the provider's own
    # limit on answering it (3 days by default).
    stuck_grace_seconds: float = 300.0
    refund_processing_limit_seconds: float = 3 * 86400.0
    # Where alerts go (both optional; without either they are logged as warnings).
    alert_email: str = ""
    alert_webhook_url: str = ""

    # OpenTelemetry tracing: off, otlp (OTEL_EXPORTER_OTLP_ENDPOINT), console, or file.
    tracing: Literal["off", "otlp", "console", "file"] = "off"
    tracing_file: str = ""
    tracing_service_name: str = "paysentinel"

    # Logs: "text" for people, "json" (one object per line) for log pipelines.
    log_format: Literal["text", "json"] = "text"

    # Risk rules evaluated before a trade is created.
    risk_window_seconds: float = 600.0
    risk_max_distinct_amounts: int = 3  # same IP or device trying this many different amounts
    risk_failure_window_seconds: float = 3600.0
    risk_max_failures: int = 3  # same device or customer with this many unpaid payments

    # Reconciliation: settlement bills are cut by this time zone's days (the provider's).
    settlement_timezone: str = "Asia/Shanghai"
    # A Temporal Schedule reconciles yesterday every day at this local time ("HH:MM"),
    # and catches up days without a finished run within reconcile_catchup_days.
    reconcile_at: str = Field("03:00", pattern=r"^([01]\d|2[0-3]):[0-5]\d$")
    reconcile_catchup_days: int = 7
    reconcile_enabled: bool = True
    reconcile_alert_threshold: int = 0  # alert when more differences than this stay unresolved
    reconcile_batch_rows: int = 5000
    # A run waits up to this long for its repairs (refunds, payments settled by their
    # workflows) to show in our books before it writes its report.
    reconcile_verify_wait_seconds: float = Field(900.0, ge=0)
    # Payments only the provider knows (unknown_order) are refunded automatically up to this
    # many per day and this much per day and currency (minor units); beyond, a person decides.
    reconcile_auto_refund_max_count: int = Field(20, ge=0)
    reconcile_auto_refund_max_minor: int = Field(1_000_000, ge=0)

    # Provider simulator (callback resend schedule, like a real provider's backoff).
    simulator_resend_seconds: Annotated[list[float], NoDecode] = [1, 2, 4, 8, 16, 32, 64, 128]
    simulator_hang_seconds: float = 30.0

    @field_validator("query_backoff_seconds", "simulator_resend_seconds", mode="before")
    @classmethod
    def _split_csv(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip().startswith("["):
            return [float(part) for part in value.split(",") if part.strip()]
        return value

    @field_validator("notify_allowed_hosts", "codec_cors_origins", "providers", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("operator_tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        names = set()
        for entry in cast(list, value):
            match = _OPERATOR_ENTRY.match(str(entry))
            if match is None:
                shown = str(entry).partition(":")[0]
                raise ValueError(
                    f"operator entry for {shown!r} is not 'name:role:sha256-hex-of-token' (roles: "
                    f"{', '.join(OPERATOR_ROLES)}); make one with `paysentinel operator new NAME --role ROLE`"
                )
            if match.group(1) in names:
                raise ValueError(f"operator {match.group(1)!r} is configured twice")
            names.add(match.group(1))
        return value

    @property
    def operators(self) -> list[tuple[str, str, bytes]]:
        """(name, role, SHA-256 of the token) of each configured operator."""
        entries = [str(entry).split(":") for entry in self.operator_tokens]
        return [(name, role, bytes.fromhex(digest)) for name, role, digest in entries]

    @property
    def effective_operator_token(self) -> str:
        return self.operator_token or (DEV_OPERATOR_TOKEN if DEV_OPERATOR in self.operator_tokens else "")

    @property
    def effective_operator_url(self) -> str:
        return self.operator_url or f"http://{self.host}:{self.operator_port}"

    @property
    def effective_codec_cors_origins(self) -> list[str]:
        return self.codec_cors_origins or [
            f"http://127.0.0.1:{self.temporal_ui_port}",
            f"http://localhost:{self.temporal_ui_port}",
        ]

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'paysentinel.db'}"

    @property
    def effective_temporal_address(self) -> str:
        return self.temporal_address or f"127.0.0.1:{self.temporal_port}"

    @property
    def effective_simulator_url(self) -> str:
        return self.simulator_url or f"http://{self.host}:{self.simulator_port}"

    @property
    def effective_webhook_base_url(self) -> str:
        return self.public_webhook_base_url or f"http://{self.host}:{self.webhook_port}"


def timing_from(settings: Settings) -> "PaymentTiming":
    from paysentinel.models import PaymentTiming

    return PaymentTiming(
        callback_timeout_seconds=settings.callback_timeout_seconds,
        query_backoff_seconds=settings.query_backoff_seconds,
        payment_ttl_seconds=settings.payment_ttl_seconds,
        resend_window_seconds=settings.resend_window_seconds,
        close_attempts=settings.close_attempts,
        provider_retry_initial_seconds=settings.provider_retry_initial_seconds,
        provider_max_attempts=settings.provider_max_attempts,
        refund_window_seconds=settings.refund_window_seconds,
        refund_submissions=settings.refund_submissions,
        review_escalate_seconds=settings.review_escalate_seconds,
        review_deadline_seconds=settings.review_deadline_seconds,
        notify_max_attempts=settings.notify_max_attempts,
        notify_retry_initial_seconds=settings.notify_retry_initial_seconds,
    )


@lru_cache
def get_settings() -> Settings:
    return Settings()
