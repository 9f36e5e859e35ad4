from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

import pytest
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest

from paysentinel import devserver, temporal_cli
from paysentinel.config import Settings
from paysentinel.devserver import (
    SEARCH_ATTRIBUTES,
    TEMPORAL_CLI_VERSION,
    DevServer,
    DevServerError,
    TemporalCliUnavailable,
    ensure_search_attributes,
    ensure_temporal_cli,
    free_port,
)

CHMOD = shutil.which("chmod") or "/bin/chmod"


def write_script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def fake_cli(path: Path, version: str = "temporal version 9.9.9-fake") -> Path:
    return write_script(path, f'echo "{version}"')


@pytest.fixture(scope="session")
def real_cli() -> Path:
    try:
        return ensure_temporal_cli(Settings().cache_dir, log=lambda _: None)
    except TemporalCliUnavailable as exc:
        pytest.fail(f"the Temporal CLI is needed for these tests and could not be obtained:\n{exc}", pytrace=False)


@pytest.fixture
def empty_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """PATH holds only an empty directory (no `temporal`, no `go`); returns that directory."""
    path_dir = tmp_path / "path"
    path_dir.mkdir()
    monkeypatch.setenv("PATH", str(path_dir))
    monkeypatch.setattr(temporal_cli, "GO_FALLBACK_DIRS", ())
    return path_dir


@pytest.fixture
def no_sdk_download(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(dest_dir: Path, timeout: float) -> Path:
        raise RuntimeError("no network in this test")

    monkeypatch.setattr(temporal_cli, "_download_with_sdk", fail)


def test_cli_on_path_wins_over_cache(tmp_path: Path, empty_path: Path) -> None:
    on_path = fake_cli(empty_path / "temporal", "temporal version 1.0.0-onpath")
    fake_cli(tmp_path / "cache" / "bin" / "temporal", "temporal version 1.0.0-cached")
    messages: list[str] = []

    assert ensure_temporal_cli(tmp_path / "cache", log=messages.append) == on_path
    assert any("1.0.0-onpath" in m for m in messages)


def test_cached_binary_used_when_none_on_path(tmp_path: Path, empty_path: Path, real_cli: Path) -> None:
    cached = tmp_path / "cache" / "bin" / "temporal"
    cached.parent.mkdir(parents=True)
    cached.symlink_to(real_cli)
    messages: list[str] = []

    assert ensure_temporal_cli(tmp_path / "cache", log=messages.append) == cached
    assert messages[0] == "Temporal CLI: not on PATH"
    assert "temporal version" in messages[-1]


def test_broken_cli_on_path_falls_through_to_cache(tmp_path: Path, empty_path: Path) -> None:
    write_script(empty_path / "temporal", "echo 'segfault' >&2; exit 3")
    cached = fake_cli(tmp_path / "cache" / "bin" / "temporal")
    messages: list[str] = []

    assert ensure_temporal_cli(tmp_path / "cache", log=messages.append) == cached
    assert any("exited with code 3: segfault" in m for m in messages)


def test_sdk_download_is_linked_into_cache(tmp_path: Path, empty_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}

    def download(dest_dir: Path, timeout: float) -> Path:
        seen.update(dest_dir=dest_dir, timeout=timeout)
        return fake_cli(dest_dir / "temporal-sdk-python-1.35.0", "temporal version 1.5.1-sdk")

    monkeypatch.setattr(temporal_cli, "_download_with_sdk", download)
    cache = tmp_path / "cache"

    cli = ensure_temporal_cli(cache, log=lambda _: None)

    assert cli == cache / "bin" / "temporal"
    assert seen["dest_dir"] == cache / "sdk-download"
    assert "1.5.1-sdk" in devserver.temporal_cli_version(cli)


def test_sdk_download_finds_the_file_even_if_the_server_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def download_then_fail(dest_dir: Path) -> None:
        fake_cli(dest_dir / "temporal-sdk-python-1.35.0")
        (dest_dir / "temporal-other.downloading").write_text("partial")
        raise RuntimeError("server did not start")

    monkeypatch.setattr(temporal_cli, "_start_and_stop_sdk_server", download_then_fail)

    found = temporal_cli._download_with_sdk(tmp_path / "dl", timeout=5)

    assert found == tmp_path / "dl" / "temporal-sdk-python-1.35.0"


def test_go_install_builds_into_cache(tmp_path: Path, empty_path: Path, no_sdk_download: None) -> None:
    args_file = tmp_path / "go-args"
    write_script(
        empty_path / "go",
        f'echo "$@" > {args_file}\n'
        'echo "go: downloading example.com/dep v1.0.0"\n'
        'printf \'#!/bin/sh\\necho "temporal version built"\\n\' > "$GOBIN/temporal"\n'
        f'{CHMOD} +x "$GOBIN/temporal"',
    )
    cache = tmp_path / "cache"
    messages: list[str] = []

    cli = ensure_temporal_cli(cache, log=messages.append)

    assert cli == cache / "bin" / "temporal"
    assert args_file.read_text().split() == ["install", f"github.com/temporalio/cli/cmd/temporal@{TEMPORAL_CLI_VERSION}"]
    assert any("a few minutes" in m for m in messages)


def test_go_install_failure_is_reported(tmp_path: Path, empty_path: Path, no_sdk_download: None) -> None:
    write_script(empty_path / "go", "echo 'go: module lookup disabled' >&2; exit 1")

    with pytest.raises(TemporalCliUnavailable) as excinfo:
        ensure_temporal_cli(tmp_path / "cache", log=lambda _: None)

    assert "`go install` exited with code 1: go: module lookup disabled" in str(excinfo.value)


def test_unavailable_lists_every_attempt(tmp_path: Path, empty_path: Path, no_sdk_download: None) -> None:
    with pytest.raises(TemporalCliUnavailable) as excinfo:
        ensure_temporal_cli(tmp_path / "cache", log=lambda _: None)

    message = str(excinfo.value)
    assert "1. PATH: no `temporal` executable on PATH" in message
    assert f"2. cache: {tmp_path / 'cache' / 'bin' / 'temporal'} does not exist" in message
    assert "3. SDK download" in message and "no network in this test" in message
    assert "4. go install" in message and "`go` is not on PATH" in message
    assert "TEMPORAL_ADDRESS" in message


def test_command_line(tmp_path: Path) -> None:
    server = DevServer(Path("temporal"), log_file=tmp_path / "log", port=7300, ui_port=8300, db_filename=tmp_path / "t.db")
    cmd = server.command()

    assert cmd[:3] == ["temporal", "server", "start-dev"]
    assert "--headless" not in cmd and cmd[cmd.index("--ui-port") + 1] == "8300"
    assert cmd[cmd.index("--db-filename") + 1] == str(tmp_path / "t.db")
    assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "--search-attribute"] == [
        f"{k}={v}" for k, v in SEARCH_ATTRIBUTES.items()
    ]
    headless = DevServer(Path("temporal"), log_file=tmp_path / "log").command()
    assert "--headless" in headless and "--ui-port" not in headless and "--db-filename" not in headless


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = DevServer(Path("temporal"), log_file=tmp_path / "log", port=port, db_filename=tmp_path / "t.db")

        with pytest.raises(DevServerError, match=f"port {port} is in use: another Temporal server"):
            server.start()
    assert not server.running


async def test_wait_ready_reports_the_log_tail(tmp_path: Path) -> None:
    cli = write_script(tmp_path / "temporal", "echo 'fatal: database is locked'; exit 1")
    server = DevServer(cli, log_file=tmp_path / "logs" / "temporal.log", port=free_port())
    server.start()

    with pytest.raises(DevServerError, match="exited with code 1") as excinfo:
        await server.wait_ready(timeout=10)
    assert "fatal: database is locked" in str(excinfo.value)
    server.stop()


def test_stop_kills_a_process_that_ignores_sigterm(tmp_path: Path) -> None:
    ready = tmp_path / "trap-installed"
    cli = write_script(tmp_path / "temporal", f"trap '' TERM\ntouch {ready}\nwhile true; do sleep 0.1; done")
    server = DevServer(cli, log_file=tmp_path / "log", port=free_port(), stop_timeout=0.5)
    server.start()
    deadline = time.monotonic() + 10
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    process = server._process
    assert process is not None and server.running

    server.stop()

    assert process.returncode == -9
    assert not server.running


async def test_real_dev_server_registers_search_attributes(tmp_path: Path, real_cli: Path) -> None:
    log_file = tmp_path / "temporal.log"
    async with DevServer(real_cli, log_file=log_file, port=free_port()) as server:
        assert server.client is not None
        listed = await server.client.operator_service.list_search_attributes(ListSearchAttributesRequest(namespace="default"))
        registered = {name: IndexedValueType.Name(kind) for name, kind in listed.custom_attributes.items()}
        for name, kind in SEARCH_ATTRIBUTES.items():
            assert registered.get(name) == f"INDEXED_VALUE_TYPE_{kind.upper()}", (name, registered)

        assert await ensure_search_attributes(server.client) == []
        process = server._process
    assert process is not None and process.returncode == 0, "the server should exit cleanly on SIGTERM"


class PlainDevServer(DevServer):
    """A dev server started with only the Currency search attribute, like a server we did not start."""

    def command(self) -> list[str]:
        cmd = super().command()
        start = cmd.index("--search-attribute")
        return cmd[:start] + ["--search-attribute", "Currency=Keyword"]


async def test_ensure_search_attributes_adds_missing_ones(tmp_path: Path, real_cli: Path) -> None:
    async with PlainDevServer(real_cli, log_file=tmp_path / "temporal.log", port=free_port()) as server:
        assert server.client is not None

        added = await ensure_search_attributes(server.client)

        assert sorted(added) == sorted(set(SEARCH_ATTRIBUTES) - {"Currency"})
        listed = await server.client.operator_service.list_search_attributes(ListSearchAttributesRequest(namespace="default"))
        assert set(SEARCH_ATTRIBUTES) <= set(listed.custom_attributes)
        assert await ensure_search_attributes(server.client) == []
