"""The ``temporal`` CLI (which runs the dev server): found on PATH or in the cache, else
obtained (the SDK's download, or ``go install`` of the pinned version) and cached.

A missing CLI is reported with every place that was tried and what to do about it."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import threading
from collections import deque
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar


TEMPORAL_CLI_VERSION = "v1.5.1"
TEMPORAL_CLI_MODULE = "github.com/temporalio/cli/cmd/temporal"

SDK_DOWNLOAD_TIMEOUT_SECONDS = 90.0
GO_INSTALL_TIMEOUT_SECONDS = 30 * 60.0
VERSION_CHECK_TIMEOUT_SECONDS = 30.0

T = TypeVar("T")


class TemporalCliUnavailable(RuntimeError):
    """The ``temporal`` CLI is not installed and could not be obtained."""


# --- Finding or obtaining the CLI -------------------------------------------------------------


# Go's official tarball installs here, often not on a service's PATH.
GO_FALLBACK_DIRS: tuple[str, ...] = ("/usr/local/go/bin",)


def ensure_temporal_cli(cache_dir: Path, log: Callable[[str], None] = print) -> Path:
    """Return a working ``temporal`` CLI, obtaining it into ``cache_dir/bin`` if needed.

    Tries, in order: ``temporal`` on PATH, the cached binary, the Temporal SDK's own
    download, and ``go install``. Raises :class:`TemporalCliUnavailable` listing every
    attempt if none works.
    """
    cache_dir = Path(cache_dir)
    cached = cache_dir / "bin" / "temporal"
    attempts: list[str] = []

    on_path = shutil.which("temporal")
    if on_path is None:
        log("Temporal CLI: not on PATH")
        attempts.append("PATH: no `temporal` executable on PATH")
    else:
        found = _try_binary(Path(on_path), "on PATH", attempts, log)
        if found:
            return found

    if cached.exists():
        found = _try_binary(cached, "cached", attempts, log)
        if found:
            return found
    else:
        log(f"Temporal CLI: no cached binary at {cached}")
        attempts.append(f"cache: {cached} does not exist")

    download_dir = cache_dir / "sdk-download"
    log(f"Temporal CLI: downloading it with the Temporal SDK into {download_dir} ...")
    try:
        downloaded = _download_with_sdk(download_dir, SDK_DOWNLOAD_TIMEOUT_SECONDS)
        _install_file(downloaded, cached)
    except Exception as exc:  # noqa: BLE001 - every failure is reported to the user
        log(f"Temporal CLI: SDK download failed: {_describe(exc)}")
        attempts.append(f"SDK download into {download_dir}: {_describe(exc)}")
    else:
        found = _try_binary(cached, "downloaded", attempts, log)
        if found:
            return found

    go = shutil.which("go") or shutil.which("go", path=os.pathsep.join(GO_FALLBACK_DIRS))
    target = f"{TEMPORAL_CLI_MODULE}@{TEMPORAL_CLI_VERSION}"
    if go is None:
        log("Temporal CLI: `go` is not on PATH, cannot build it from source")
        attempts.append(f"go install {target}: `go` is not on PATH")
    else:
        log(f"Temporal CLI: building it with `go install {target}` (takes a few minutes the first time) ...")
        try:
            _go_install(go, target, cached.parent, log)
        except Exception as exc:  # noqa: BLE001
            log(f"Temporal CLI: go install failed: {_describe(exc)}")
            attempts.append(f"go install {target} (GOBIN={cached.parent}): {_describe(exc)}")
        else:
            found = _try_binary(cached, "built", attempts, log)
            if found:
                return found

    raise TemporalCliUnavailable(_unavailable_message(attempts, cached))


def temporal_cli_version(path: Path) -> str:
    """Run ``temporal --version`` and return its first line; raise if it does not work."""
    try:
        result = subprocess.run(
            [str(path), "--version"],
            capture_output=True,
            text=True,
            timeout=VERSION_CHECK_TIMEOUT_SECONDS,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"`{path} --version` did not finish in {exc.timeout:.0f}s") from exc
    except OSError as exc:
        raise RuntimeError(f"`{path} --version` could not run: {exc}") from exc
    output = (result.stdout or "").strip()
    if result.returncode != 0 or not output:
        detail = (result.stderr or result.stdout or "").strip().splitlines()
        raise RuntimeError(f"`{path} --version` exited with code {result.returncode}" + (f": {detail[-1]}" if detail else ""))
    return output.splitlines()[0]


def _try_binary(path: Path, where: str, attempts: list[str], log: Callable[[str], None]) -> Path | None:
    try:
        version = temporal_cli_version(path)
    except RuntimeError as exc:
        log(f"Temporal CLI: {where} binary {path} does not work: {exc}")
        attempts.append(f"{where} binary {path}: {exc}")
        return None
    log(f"Temporal CLI: using {where} binary {path} ({version})")
    return path


def _download_with_sdk(dest_dir: Path, timeout: float) -> Path:
    """Let the Temporal SDK download its dev server CLI into ``dest_dir``; return the file."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    error: BaseException | None = None
    try:
        _run_coroutine(asyncio.wait_for(_start_and_stop_sdk_server(dest_dir), timeout))
    except asyncio.TimeoutError:
        error = TimeoutError(f"no result within {timeout:.0f}s")
    except Exception as exc:  # noqa: BLE001 - the binary may be there even if the server failed
        error = exc
    # The SDK names the file "temporal-sdk-python-<sdk version>" (or "temporal-<version>").
    candidates = [
        p for p in dest_dir.glob("temporal-*") if p.is_file() and not p.name.endswith(".downloading") and os.access(p, os.X_OK)
    ]
    if candidates:
        return max(candidates, key=lambda p: p.stat().st_mtime)
    if error is not None:
        raise error
    raise FileNotFoundError(f"the SDK started a server but no `temporal-*` executable is in {dest_dir}")


async def _start_and_stop_sdk_server(dest_dir: Path) -> None:
    from temporalio.testing import WorkflowEnvironment

    env = await WorkflowEnvironment.start_local(
        download_dest_dir=str(dest_dir),
        dev_server_startup_timeout=timedelta(seconds=30),
    )
    await env.shutdown()


def _run_coroutine(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from synchronous code, even inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _install_file(source: Path, dest: Path) -> None:
    """Hard-link (or copy) ``source`` to ``dest`` atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copy2(source, tmp)
    tmp.chmod(0o755)
    os.replace(tmp, dest)


def _go_install(go: str, target: str, gobin: Path, log: Callable[[str], None]) -> None:
    gobin.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GOBIN": str(gobin)}
    proc = subprocess.Popen(
        [go, "install", target],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    timed_out = threading.Event()

    def kill_on_timeout() -> None:
        timed_out.set()
        proc.kill()

    timer = threading.Timer(GO_INSTALL_TIMEOUT_SECONDS, kill_on_timeout)
    timer.start()
    tail: deque[str] = deque(maxlen=5)
    downloads = 0
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if not line:
                continue
            tail.append(line)
            if line.startswith("go: downloading "):
                downloads += 1
                if downloads % 25 == 0:
                    log(f"  go: {downloads} modules downloaded so far ...")
            else:
                log(f"  {line}")
        returncode = proc.wait()
    finally:
        timer.cancel()
    if timed_out.is_set():
        raise TimeoutError(f"`go install` did not finish within {GO_INSTALL_TIMEOUT_SECONDS / 60:.0f} minutes")
    if returncode != 0:
        detail = " | ".join(tail) or "no output"
        raise RuntimeError(f"`go install` exited with code {returncode}: {detail}")


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or repr(exc)
    return f"{type(exc).__name__}: {text}"


def _unavailable_message(attempts: list[str], cached: Path) -> str:
    lines = ["The Temporal CLI (`temporal`) is not available; tried:"]
    lines += [f"  {i}. {attempt}" for i, attempt in enumerate(attempts, start=1)]
    lines += [
        "What you can do:",
        "  - install the Temporal CLI (https://docs.temporal.io/cli#install) and put it on PATH,",
        f"    or place the binary at {cached};",
        "  - or run a Temporal server yourself and set TEMPORAL_ADDRESS=host:port to use it.",
    ]
    return "\n".join(lines)
