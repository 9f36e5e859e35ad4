"""Which secrets a start may use: the development profile, and everything else.

The development profile is `paysentinel up` on embedded defaults: every part, no
TEMPORAL_ADDRESS, the SQLite application database and PAYSENTINEL_ENV not ``production``.
It may run on secrets it makes itself: generated once into ``<data dir>/secrets.json``
(mode 0600) and reused on the next start. Any other start refuses to run while a secret of
``config.SECRETS`` is missing or holds a value published in this repository.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection
from pathlib import Path

from paysentinel.config import DEVELOPMENT_SECRET_VALUES, SECRETS, Settings

SECRETS_FILE = "secrets.json"


class SecretsRefused(RuntimeError):
    """A start outside the development profile without its own secrets."""


def not_development(settings: Settings, parts: Collection[str], all_parts: Collection[str]) -> list[str]:
    """Why this start is not the development profile (empty: it is)."""
    reasons = []
    if settings.env == "production":
        reasons.append("PAYSENTINEL_ENV is production")
    if settings.temporal_address:
        reasons.append("TEMPORAL_ADDRESS is set")
    else:
        from paysentinel.temporal import configured_address

        if configured_address(settings):
            reasons.append("a Temporal address is configured (TEMPORAL_CONFIG_FILE / TEMPORAL_PROFILE)")
    if settings.database_url and not settings.database_url.startswith("sqlite"):
        reasons.append("PAYSENTINEL_DATABASE_URL is not SQLite")
    if set(parts) != set(all_parts):
        reasons.append(f"only part(s) {', '.join(parts)} run")
    return reasons


def _is_development_value(value: object) -> bool:
    values = value if isinstance(value, list) else [value]
    return any(
        str(v) in DEVELOPMENT_SECRET_VALUES or any(part in DEVELOPMENT_SECRET_VALUES for part in str(v).split(":"))
        for v in values
    )


def secret_problems(settings: Settings) -> list[str]:
    """One line per secret that is missing or holds a development value, naming its variable."""
    problems = []
    for secret in SECRETS:
        value = getattr(settings, secret.name)
        how = f"set it, or {secret.file_variable} to the path of a file holding it"
        if not value:
            if secret.required:
                problems.append(f"{secret.variable} is not set ({how})")
        elif _is_development_value(value):
            problems.append(f"{secret.variable} holds a published development value ({how}, with a value of your own)")
    return problems


def development_secrets(data_dir: Path) -> dict[str, str]:
    """The development profile's generated secrets: read from ``data_dir/secrets.json``, the
    missing ones generated and written there (mode 0600)."""
    path = data_dir / SECRETS_FILE
    stored: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    missing = [s for s in SECRETS if s.generate is not None and not stored.get(s.name)]
    if missing:
        for secret in missing:
            stored[secret.name] = secret.generate()  # type: ignore[misc]
        data_dir.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(SECRETS_FILE + ".new")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(stored, out, indent=2)
        os.chmod(temporary, 0o600)  # also when the file was there before
        os.replace(temporary, path)
    return {s.name: stored[s.name] for s in SECRETS if s.generate is not None}


def secured(settings: Settings, parts: Collection[str], all_parts: Collection[str]) -> Settings:
    """The settings this start runs with. In the development profile, secrets that are not set
    come from the data dir's generated ones; any other start raises SecretsRefused unless every
    secret is its own."""
    reasons = not_development(settings, parts, all_parts)
    if not reasons:
        generated = development_secrets(settings.data_dir)
        update = {name: value for name, value in generated.items() if not getattr(settings, name)}
        return settings.model_copy(update=update) if update else settings
    problems = secret_problems(settings)
    if problems:
        raise SecretsRefused(
            f"refusing to start without secrets of its own ({'; '.join(reasons)}, so this is not the "
            "development profile):\n  " + "\n  ".join(problems)
        )
    return settings


MERCHANT_KEY_FILE = "merchant-key"
DEV_MERCHANT = "demo"


async def development_merchant_key(settings: Settings) -> str:
    """The development profile's merchant ``demo`` and its key with every scope: the key in
    ``<data dir>/merchant-key`` (mode 0600) while the database still accepts it, else a new one
    written there. Call only in the development profile, after the migrations."""
    from paysentinel import db
    from paysentinel.merchants import API_SCOPES, authenticate, create_key, create_merchant, get_merchant

    path = settings.data_dir / MERCHANT_KEY_FILE
    engine = db.make_engine(settings.effective_database_url)
    try:
        sessions = db.make_sessionmaker(engine)
        if await get_merchant(sessions, DEV_MERCHANT) is None:
            await create_merchant(sessions, DEV_MERCHANT, "Development demo merchant")
        if path.exists():
            key = path.read_text().strip()
            caller = await authenticate(sessions, key)
            if caller is not None and caller.merchant_id == DEV_MERCHANT and set(caller.scopes) == set(API_SCOPES):
                return key
        _, key = await create_key(sessions, DEV_MERCHANT, list(API_SCOPES))
    finally:
        await engine.dispose()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(MERCHANT_KEY_FILE + ".new")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(key + "\n")
    os.chmod(temporary, 0o600)
    os.replace(temporary, path)
    return key


def merchant_key_for_demo(settings: Settings) -> str:
    """The key ``paysentinel demo`` sends: PAYSENTINEL_MERCHANT_KEY, else the data dir's."""
    key = os.environ.get("PAYSENTINEL_MERCHANT_KEY", "").strip()
    path = settings.data_dir / MERCHANT_KEY_FILE
    if not key and path.exists():
        key = path.read_text().strip()
    return key
