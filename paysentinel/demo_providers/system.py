"""The demo's system: the provider fakes (``tests/fakes``) and ``paysentinel up`` on embedded
defaults pointed at one of them, on free loopback ports with short timings."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Optional

import httpx
from rich.console import Console

from paysentinel.cluster.commands import pid_alive

FAKE_PROVIDERS = ("alipay", "wechatpay", "stripe")
PROVIDERS = ("simulator", *FAKE_PROVIDERS)
MERCHANT = "demo"  # the development profile's merchant
AMOUNT_MINOR = 9990

# Short timings for a system started by the demo (seconds), so a run takes about a minute.
DEMO_TIMINGS = {
    "PAYSENTINEL_CALLBACK_TIMEOUT_SECONDS": "1.5",
    "PAYSENTINEL_QUERY_BACKOFF_SECONDS": "0.5,1,1",
    "PAYSENTINEL_RESEND_WINDOW_SECONDS": "6",
    "PAYSENTINEL_CLOSE_ATTEMPTS": "2",
    "PAYSENTINEL_PROVIDER_TIMEOUT_SECONDS": "2",
    "PAYSENTINEL_PROVIDER_RETRY_INITIAL_SECONDS": "0.2",
    "PAYSENTINEL_PROVIDER_MAX_ATTEMPTS": "3",
    "PAYSENTINEL_CHECKOUT_WAIT_SECONDS": "20",  # a busy machine: the create's retries may outlast 8 s
    "PAYSENTINEL_REFUND_SUBMISSIONS": "2",
    "PAYSENTINEL_NOTIFY_RETRY_INITIAL_SECONDS": "0.3",
    "PAYSENTINEL_NOTIFY_MAX_ATTEMPTS": "4",
    "PAYSENTINEL_RECONCILE_VERIFY_WAIT_SECONDS": "20",
}
PORTS = ("temporal", "temporal_ui", "api", "operator", "webhook", "simulator", "sdk_metrics", "metrics")


class DemoUnavailable(RuntimeError):
    """The demo cannot run here (the fakes are missing, or the system did not start)."""


# --- The fakes -----------------------------------------------------------------------------------


def load_fake(provider: str) -> ModuleType:
    """``tests.fakes.<provider>``: importable from the repository root (the current directory)."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)
    try:
        return importlib.import_module(f"tests.fakes.{provider}")
    except ImportError as err:
        raise DemoUnavailable(
            f"the {provider} fake (tests/fakes/{provider}.py) cannot be imported ({err}): "
            "`paysentinel demo --provider` runs from a checkout of the repository; run it from the "
            "repository root"
        ) from err


def _fake_root(module: ModuleType) -> Path:
    """The directory that holds the ``tests`` package the fake came from."""
    return Path(module.__file__ or ".").resolve().parents[2]


# --- The system ----------------------------------------------------------------------------------


def _clean_environment() -> dict[str, str]:
    """This process's environment without paysentinel's and Temporal's settings (the Temporal
    CLI's cache stays, so a started system finds the CLI it found before)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PAYSENTINEL_", "TEMPORAL_"))}
    if "PAYSENTINEL_CACHE_DIR" in os.environ:
        env["PAYSENTINEL_CACHE_DIR"] = os.environ["PAYSENTINEL_CACHE_DIR"]
    return env


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc; elsewhere none are found)."""
    found = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and fields[1] == str(pid):
            found.append(int(entry.name))
    return found


def _stop(process: subprocess.Popen, timeout: float = 30) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class System:
    """``paysentinel up`` (and a provider's fake) started for the demo."""

    provider: str
    workdir: Path
    ports: dict[str, int]
    env: dict[str, str]
    fake_url: str = ""
    fake_env: dict[str, str] = field(default_factory=dict)
    fake_root: Optional[Path] = None
    up: Optional[subprocess.Popen] = None
    fake: Optional[subprocess.Popen] = None
    helpers: list[tuple[int, str]] = field(default_factory=list)  # up's children: (pid, command line)
    merchant_key: str = ""

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def log_file(self) -> Path:
        return self.workdir / "paysentinel.log"

    def url(self, part: str) -> str:
        return f"http://127.0.0.1:{self.ports[part]}"

    @property
    def api_url(self) -> str:
        return self.url("api")

    @property
    def database_url(self) -> str:
        return f"sqlite+aiosqlite:///{self.data_dir / 'paysentinel.db'}"

    @classmethod
    def prepare(cls, provider: str) -> "System":
        fake = load_fake(provider) if provider != "simulator" else None
        from paysentinel.devserver import free_port

        workdir = Path(tempfile.mkdtemp(prefix=f"paysentinel-demo-{provider}-"))
        ports = {name: free_port() for name in PORTS}
        env = {
            **_clean_environment(),
            **DEMO_TIMINGS,
            **{f"PAYSENTINEL_{name.upper()}_PORT": str(port) for name, port in ports.items()},
            "PAYSENTINEL_DATA_DIR": str(workdir / "data"),
        }
        system = cls(provider, workdir, ports, env)
        if fake is not None:
            port = free_port()
            setup = fake.prepare(workdir / "fake", port, f"{system.url('webhook')}/webhooks/{provider}")
            env.update(setup.app_env)
            env["PAYSENTINEL_PROVIDERS"] = f"simulator,{provider}"
            system.fake_url = f"http://127.0.0.1:{port}"
            system.fake_root = _fake_root(fake)
            python_path = os.pathsep.join(filter(None, [str(system.fake_root), os.environ.get("PYTHONPATH", "")]))
            system.fake_env = {**_clean_environment(), **setup.fake_env, "PYTHONPATH": python_path}
        return system

    def start(self, console: Console, timeout: float = 120) -> None:
        with open(self.log_file, "ab") as log:
            if self.fake_url:
                self.fake = subprocess.Popen(
                    [sys.executable, "-m", f"tests.fakes.{self.provider}"],
                    env=self.fake_env,
                    cwd=self.fake_root,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            self.up = subprocess.Popen(
                [sys.executable, "-m", "paysentinel.cli", "up"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        urls = [self.url(p) for p in ("api", "operator", "webhook", "simulator")] + ([self.fake_url] if self.fake_url else [])
        started = time.monotonic()
        with console.status(
            f"starting paysentinel up{' and the ' + self.provider + ' fake' if self.fake_url else ''} ({self.workdir})"
        ):
            pending = list(urls)
            while pending:
                for name, process in (("paysentinel up", self.up), (f"the {self.provider} fake", self.fake)):
                    if process is not None and process.poll() is not None:
                        raise DemoUnavailable(f"{name} exited with {process.returncode}:\n{self.log_tail()}")
                if time.monotonic() - started > timeout:
                    raise DemoUnavailable(f"{pending} not healthy after {timeout:g}s:\n{self.log_tail()}")
                try:
                    if httpx.get(pending[0] + "/health", timeout=2).status_code == 200:
                        pending.pop(0)
                        continue
                except httpx.HTTPError:
                    pass
                time.sleep(0.3)
        assert self.up is not None
        # The Temporal dev server (its own session): remembered so it is stopped even if up is not.
        self.helpers = [(pid, self._cmdline(pid)) for pid in _children(self.up.pid)]
        key_file = self.data_dir / "merchant-key"
        self.merchant_key = key_file.read_text().strip() if key_file.exists() else ""
        if not self.merchant_key:
            raise DemoUnavailable(f"paysentinel up wrote no merchant key to {key_file}")
        console.print(
            f"[dim]{self.provider}: paysentinel up (pid {self.up.pid})"
            + (f", the fake (pid {self.fake.pid}) at {self.fake_url}" if self.fake else "")
            + f", ready in {time.monotonic() - started:.1f}s; logs: {self.log_file}[/dim]",
            soft_wrap=True,
        )

    @staticmethod
    def _cmdline(pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> list[str]:
        """Stop what was started, by pid: up (which stops its dev server), then anything of up's
        still running, then the fake. Returns what had to be stopped by force."""
        forced = []
        if self.up is not None:
            if self.up.poll() is None:
                self.up.send_signal(signal.SIGTERM)
                try:
                    self.up.wait(45)
                except subprocess.TimeoutExpired:
                    self.up.kill()
                    self.up.wait()
                    forced.append(f"paysentinel up (pid {self.up.pid})")
        for pid, cmdline in self.helpers:
            if pid_alive(pid) and self._cmdline(pid) == cmdline:
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + 10
                while pid_alive(pid) and self._cmdline(pid) == cmdline and time.monotonic() < deadline:
                    time.sleep(0.2)
                if pid_alive(pid) and self._cmdline(pid) == cmdline:
                    os.kill(pid, signal.SIGKILL)
                forced.append(f"{cmdline.split(' ')[0]} (pid {pid})")
        if self.fake is not None:
            _stop(self.fake)
        return forced

    def log_tail(self, characters: int = 4000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-characters:]
        except OSError:
            return "(no log)"
