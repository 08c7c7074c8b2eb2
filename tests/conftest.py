"""Shared fixtures: a fresh Mastodon-like server per test, TCP proxies, and the bot
run as a subprocess.

The bot is driven only through its command line, such as::

    python hashtag_bot.py --config PATH --env-file PATH [--dry-run] [-v]

and its settings: ``config.py`` (Python assignments) or environment variables of
the same names. Tests should wait on server-side state (``wait_until`` with
``server.action_counts``) rather than on the wording of its log.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
from mastodon_server import MastodonServer
from tcp_proxy import TcpProxy

BOT_SCRIPT = Path(__file__).resolve().parent.parent / "hashtag_bot.py"
STOP_TIMEOUT_SECONDS = 10.0
LOG_POLL_SECONDS = 0.05


# --- servers and proxies ----------------------------------------------------------


@pytest.fixture
def server() -> Iterator[MastodonServer]:
    """A fresh test server with the default accounts, stopped after the test."""
    with MastodonServer() as running:
        yield running


@pytest.fixture(scope="session")
def _session_server() -> Iterator[MastodonServer]:
    with MastodonServer() as running:
        yield running


@pytest.fixture
def reused_server(_session_server: MastodonServer) -> MastodonServer:
    """One server for the whole session, reset to its seed before each test.

    A reset is much faster than a fresh server (see MastodonServer.reset). Use
    ``server`` when a test needs a server of its own: a custom seed, or one that
    the test stops.
    """
    _session_server.reset()
    return _session_server


@pytest.fixture
def proxy_factory() -> Iterator[Callable[[int], TcpProxy]]:
    """Return a function that starts a TCP proxy to a port; all stop after the test."""
    proxies: list[TcpProxy] = []

    def start_proxy(target_port: int) -> TcpProxy:
        proxy = TcpProxy(target_port).start()
        proxies.append(proxy)
        return proxy

    yield start_proxy
    for proxy in proxies:
        proxy.stop()


@pytest.fixture
def stream_proxy(
    server: MastodonServer, proxy_factory: Callable[[int], TcpProxy]
) -> TcpProxy:
    """A proxy that the server advertises as its streaming URL.

    Only the streaming connection goes through it; REST calls go to the server
    directly, so cutting the proxy breaks the stream alone.
    """
    proxy = proxy_factory(server.port)
    server.streaming_url = proxy.url
    return proxy


# --- bot configuration files ----------------------------------------------------


@dataclass
class BotFiles:
    """Paths of the settings files written for one bot run."""

    config: Path
    env: Path


def write_bot_files(
    directory: Path,
    server: MastodonServer,
    *,
    base_url: str | None = None,
    access_token: str = "hashbot_token",
    env_extra: dict[str, str] | None = None,
    **settings: Any,
) -> BotFiles:
    """Write ``config.py`` and ``.env`` for the bot into ``directory``.

    Each keyword in ``settings`` becomes a line ``NAME = repr(value)`` in
    ``config.py``. ``STATE_FILE`` defaults to a file in ``directory``: the bot's
    own default is a file beside hashtag_bot.py, in the repository. The ``.env``
    file points the bot at ``base_url`` (default: the server) with
    ``access_token``, plus any ``env_extra`` lines.
    """
    for name in settings:
        if not name.isidentifier():
            raise ValueError(f"setting name {name!r} is not a Python identifier")
    settings.setdefault("STATE_FILE", str(directory / "hashtag_bot_state.json"))

    config_lines = ["# Written by the test suite for one test run."]
    config_lines += [f"{name} = {value!r}" for name, value in settings.items()]
    config_path = directory / "config.py"
    config_path.write_text("\n".join(config_lines) + "\n", encoding="utf-8")

    env_values = {
        "MASTODON_API_BASE_URL": base_url or server.base_url,
        "MASTODON_ACCESS_TOKEN": access_token,
    }
    env_values.update(env_extra or {})
    env_path = directory / ".env"
    env_text = "".join(f"{key}={value}\n" for key, value in env_values.items())
    env_path.write_text(env_text, encoding="utf-8")
    return BotFiles(config=config_path, env=env_path)


@pytest.fixture
def bot_files(tmp_path: Path, server: MastodonServer) -> Callable[..., BotFiles]:
    """Return ``write(**settings)``: :func:`write_bot_files` for this test's server."""

    def write(**settings: Any) -> BotFiles:
        return write_bot_files(tmp_path, server, **settings)

    return write


# --- the bot as a subprocess ----------------------------------------------------


class BotProcess:
    """``hashtag_bot.py`` run as a subprocess, with its stderr captured to a file."""

    def __init__(
        self,
        work_dir: Path,
        *,
        config: Path | None = None,
        env_file: Path | None = None,
        verbose: bool = True,
        dry_run: bool = False,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        script: Path = BOT_SCRIPT,
    ) -> None:
        """Prepare the command; ``env`` adds environment variables (settings).

        ``work_dir`` is the working directory; it also contains ``stderr.log`` and
        ``stdout.log``.
        """
        self.work_dir = work_dir
        self.stderr_path = work_dir / "stderr.log"
        self.stdout_path = work_dir / "stdout.log"
        self.command = [sys.executable, str(script)]
        if config is not None:
            self.command += ["--config", str(config)]
        if env_file is not None:
            self.command += ["--env-file", str(env_file)]
        if dry_run:
            self.command.append("--dry-run")
        if verbose:
            self.command.append("-v")
        self.command += list(extra_args)
        self._extra_env = dict(env or {})
        self._process: subprocess.Popen | None = None

    def start(self) -> BotProcess:
        """Start the bot and return self."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        environment = {
            key: value
            for key, value in os.environ.items()
            # A developer's own Mastodon settings must never reach the bot under test.
            # JOURNAL_STREAM would make the bot log without timestamps.
            if not key.startswith("MASTODON_") and key != "JOURNAL_STREAM"
        }
        environment["PYTHONUNBUFFERED"] = "1"
        environment.update(self._extra_env)
        # The child keeps its own copies of the file descriptors, so the files
        # can be closed here as soon as it has started.
        with (
            open(self.stderr_path, "wb") as stderr,
            open(self.stdout_path, "wb") as stdout,
        ):
            self._process = subprocess.Popen(
                self.command,
                cwd=self.work_dir,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
            )
        return self

    @property
    def pid(self) -> int:
        """The bot's process id."""
        return self._require_process().pid

    @property
    def returncode(self) -> int | None:
        """The exit code, or None while the bot runs."""
        return self._require_process().poll()

    def _require_process(self) -> subprocess.Popen:
        if self._process is None:
            raise RuntimeError("the bot is not started; call start() first")
        return self._process

    def log_text(self) -> str:
        """Return everything the bot has written to stderr so far."""
        if not self.stderr_path.exists():
            return ""
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def stdout_text(self) -> str:
        """Return everything the bot has written to stdout so far."""
        if not self.stdout_path.exists():
            return ""
        return self.stdout_path.read_text(encoding="utf-8", errors="replace")

    def log_position(self) -> int:
        """Return the current length of the log, to search only what comes later."""
        return len(self.log_text())

    def wait_for_log(
        self, pattern: str, timeout: float = 10.0, *, start: int = 0
    ) -> re.Match[str]:
        """Wait until a line of stderr (from offset ``start``) matches ``pattern``.

        ``pattern`` is a regular expression searched with re.MULTILINE. Raises
        AssertionError with the end of the log when the time runs out or the bot
        exits without writing a match.
        """
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            exited = self.returncode is not None
            match = regex.search(self.log_text(), start)
            if match:
                return match
            if exited:
                self._fail(
                    f"the bot exited with {self.returncode} before logging {pattern!r}"
                )
            if time.monotonic() >= deadline:
                self._fail(f"no log line matched {pattern!r} within {timeout:g} s")
            time.sleep(LOG_POLL_SECONDS)

    def wait_until(
        self,
        predicate: Callable[[], Any],
        timeout: float = 10.0,
        message: str | None = None,
    ) -> Any:
        """Like ``mastodon_server.wait_until``, but fail at once if the bot exits.

        The AssertionError ends with the last lines of the bot's stderr.
        """
        what = message or getattr(predicate, "__name__", repr(predicate))
        deadline = time.monotonic() + timeout
        while True:
            if self.returncode is not None:
                self._fail(f"the bot exited with {self.returncode} before: {what}")
            result = predicate()
            if result:
                return result
            if time.monotonic() >= deadline:
                self._fail(f"timed out after {timeout:g} s waiting for: {what}")
            time.sleep(LOG_POLL_SECONDS)

    def _fail(self, reason: str) -> None:
        tail = "\n".join(self.log_text().splitlines()[-40:])
        raise AssertionError(
            f"{reason}\n--- last lines of the bot's stderr ---\n{tail}"
        )

    def send_signal(self, signum: int) -> None:
        """Send a signal, such as signal.SIGINT, to the bot."""
        self._require_process().send_signal(signum)

    def wait(self, timeout: float = STOP_TIMEOUT_SECONDS) -> int:
        """Wait for the bot to exit and return its exit code.

        Raises subprocess.TimeoutExpired if it is still running after ``timeout``.
        """
        return self._require_process().wait(timeout)

    def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> int | None:
        """Send SIGTERM, wait up to ``timeout`` s, then kill; return the exit code."""
        if self._process is None:
            return None
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout)
        return self._process.returncode


_BOTS_KEY = pytest.StashKey[list[BotProcess]]()


@pytest.fixture
def start_bot(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[..., BotProcess]]:
    """Return ``start(files=None, **options)`` that starts a :class:`BotProcess`.

    ``files`` comes from the ``bot_files`` fixture; ``options`` are BotProcess
    options. Every bot is stopped after the test; when the test fails, the report
    shows each bot's stderr.
    """
    bots: list[BotProcess] = []
    request.node.stash[_BOTS_KEY] = bots

    def start(files: BotFiles | None = None, **options: Any) -> BotProcess:
        if files is not None:
            options.setdefault("config", files.config)
            options.setdefault("env_file", files.env)
        bot = BotProcess(tmp_path / f"bot{len(bots)}", **options).start()
        bots.append(bot)
        return bot

    yield start
    for bot in bots:
        bot.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    """Add the stderr of the test's bots to the report of a failed test."""
    report = yield
    if report.when == "call" and report.failed:
        for number, bot in enumerate(item.stash.get(_BOTS_KEY, [])):
            report.sections.append((f"bot{number} stderr", bot.log_text()))
    return report
