"""Tests of the guided setup, ``--login``, ``--check`` and ``--once``.

The bot runs as a subprocess against the test server. It prompts for its
setup only when stdin and stdout are terminals, so the setup tests run it on a
pseudo-terminal (:class:`TerminalBot`) and type a reply at each prompt, as a
person would. Every run passes ``--env-file`` and ``--config`` paths in the test's
temporary directory, so that the setup never writes into the repository.
"""

from __future__ import annotations

import codecs
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Callable, NoReturn
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from conftest import BOT_SCRIPT, BotFiles, BotProcess
from dotenv import dotenv_values
from mastodon_server import MastodonServer

from hashtag_bot import SETTINGS_SPEC

READ_SECONDS = 0.05
PROMPT_TIMEOUT_SECONDS = 10.0
EXIT_TIMEOUT_SECONDS = 10.0

INSTANCE_PROMPT = r"Your instance \(for example https://mastodon\.social\): "
CODE_PROMPT = r"paste the authorization code here: "
HASHTAGS_PROMPT = r"Hashtags to watch, separated by commas .*: "
AUTHORIZE_URL = r"(?P<url>https?://\S*/oauth/authorize\?\S+)"
LOGGED_IN = r"logged in as @hashbot "
VALID_CODE = "mockcode_hashbot"


@pytest.fixture
def server(reused_server: MastodonServer) -> MastodonServer:
    """The session's server, reset to its seed (overrides conftest's fresh one)."""
    return reused_server


def unused_port() -> int:
    """Return a loopback port on which nothing listens (bound, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bot_environment(extra: dict[str, str]) -> dict[str, str]:
    """Return this process's environment without Mastodon or bot settings.

    A developer's own ``MASTODON_*`` variables or settings such as ``HASHTAGS``
    would change what the bot under test does, or where it connects.
    """
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("MASTODON_") and key not in SETTINGS_SPEC
    }
    environment["PYTHONUNBUFFERED"] = "1"
    environment.update(extra)
    return environment


class TerminalBot:
    """``hashtag_bot.py`` run on a pseudo-terminal, as a person at a terminal runs it.

    stdin, stdout and stderr are all the terminal, so :attr:`transcript`
    contains the prompts, the log and the replies that the terminal echoes,
    with the terminal's CR LF line ends converted to LF.
    """

    def __init__(self, args: Sequence[str], work_dir: Path, env: dict[str, str]):
        self.command = [sys.executable, str(BOT_SCRIPT), *args]
        primary, secondary = os.openpty()
        try:
            self.process = subprocess.Popen(
                self.command,
                cwd=work_dir,
                env=bot_environment(env),
                stdin=secondary,
                stdout=secondary,
                stderr=secondary,
                start_new_session=True,
            )
        except BaseException:
            os.close(primary)
            raise
        finally:
            os.close(secondary)
        self._primary = primary
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._raw = ""
        self._closed = False
        self.position = 0

    @property
    def transcript(self) -> str:
        """Everything the terminal showed so far."""
        return self._raw.replace("\r\n", "\n")

    def _read(self, timeout: float) -> None:
        """Append the output that arrives within ``timeout`` seconds."""
        if self._closed:
            return
        ready, _, _ = select.select([self._primary], [], [], timeout)
        if not ready:
            return
        try:
            data = os.read(self._primary, 4096)
        except OSError:
            # Linux reports EIO once every process has closed the terminal.
            data = b""
        if data:
            self._raw += self._decoder.decode(data)
        else:
            self._closed = True

    def _fail(self, reason: str) -> NoReturn:
        tail = "\n".join(self.transcript.splitlines()[-30:])
        raise AssertionError(
            f"{reason}\n--- end of the terminal transcript ---\n{tail}"
        )

    def expect(
        self, pattern: str, timeout: float = PROMPT_TIMEOUT_SECONDS
    ) -> re.Match[str]:
        """Wait until the output after the last match contains ``pattern``."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.transcript, self.position)
            if match:
                self.position = match.end()
                return match
            if self._closed:
                self._fail(
                    f"the bot closed the terminal (exit status "
                    f"{self.process.poll()}) before printing {pattern!r}"
                )
            if time.monotonic() >= deadline:
                self._fail(f"no output matched {pattern!r} within {timeout:g} s")
            self._read(READ_SECONDS)

    def respond(self, pattern: str, text: str) -> None:
        """Wait for the prompt ``pattern``, then type ``text`` and Enter."""
        self.expect(pattern)
        os.write(self._primary, text.encode("utf-8") + b"\n")

    def end_input(self, pattern: str) -> None:
        """Wait for the prompt ``pattern``, then press Ctrl+D (end of input)."""
        self.expect(pattern)
        os.write(self._primary, b"\x04")

    def interrupt(self) -> None:
        """Send SIGINT, as Ctrl+C at the terminal does."""
        self.process.send_signal(signal.SIGINT)

    def wait(self, timeout: float = EXIT_TIMEOUT_SECONDS) -> int:
        """Read the output until the bot exits, and return its exit status."""
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:
            if time.monotonic() >= deadline:
                self._fail(f"the bot did not exit within {timeout:g} s")
            self._read(READ_SECONDS)
        # The rest of the output is still in the terminal's buffer.
        while not self._closed and time.monotonic() < deadline:
            self._read(READ_SECONDS)
        return self.process.returncode

    def close(self) -> None:
        """Kill the bot if it still runs, and close the terminal."""
        try:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(EXIT_TIMEOUT_SECONDS)
        finally:
            os.close(self._primary)


@pytest.fixture
def run_in_terminal(tmp_path: Path) -> Iterator[Callable[..., TerminalBot]]:
    """Return ``run(*args)``: start the bot on a pseudo-terminal.

    The bot gets ``--env-file TMP/.env --config TMP/config.py`` before ``args``
    and ``STATE_FILE`` in the temporary directory, because a relative
    STATE_FILE (the one config.example.py sets) is resolved beside the script.
    Every bot started is killed after the test, if it still runs.
    """
    bots: list[TerminalBot] = []

    def run(*args: str) -> TerminalBot:
        options = [
            "--env-file",
            str(tmp_path / ".env"),
            "--config",
            str(tmp_path / "config.py"),
        ]
        environment = {"STATE_FILE": str(tmp_path / "state.json")}
        bot = TerminalBot([*options, *args], tmp_path, environment)
        bots.append(bot)
        return bot

    try:
        yield run
    finally:
        for bot in bots:
            bot.close()


def file_mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777


def get_with_token(base_url: str, path: str, token: str) -> requests.Response:
    return requests.get(
        base_url + path, headers={"Authorization": f"Bearer {token}"}, timeout=10
    )


def requested_scopes(authorize_url: str) -> list[str]:
    return parse_qs(urlsplit(authorize_url).query)["scope"][0].split()


# --- guided setup ----------------------------------------------------------------


def test_setup_first_run_writes_files_and_starts(
    server: MastodonServer,
    tmp_path: Path,
    run_in_terminal: Callable[..., TerminalBot],
) -> None:
    env_path = tmp_path / ".env"
    config_path = tmp_path / "config.py"
    bot = run_in_terminal()

    bot.respond(INSTANCE_PROMPT, server.base_url)
    url = bot.expect(AUTHORIZE_URL).group("url")
    bot.respond(CODE_PROMPT, VALID_CODE)
    saved = bot.expect(r"Saved the token in (?P<path>\S+) \(readable by you only\)")
    bot.respond(HASHTAGS_PROMPT, "#Python, rust")
    bot.expect(r"Saved the settings in ")
    bot.expect(LOGGED_IN)
    bot.interrupt()
    status = bot.wait()

    assert url.startswith(server.base_url + "/oauth/authorize?")
    assert parse_qs(urlsplit(url).query)["client_id"][0]
    assert saved.group("path") == str(env_path)
    assert file_mode(env_path) == 0o600
    credentials = dotenv_values(env_path)
    assert credentials["MASTODON_API_BASE_URL"] == server.base_url
    token = credentials["MASTODON_ACCESS_TOKEN"]
    assert token
    assert token != server.token("hashbot")
    assert re.search(
        r'^HASHTAGS = \["python", "rust"\]$', config_path.read_text(), re.M
    )
    assert status == 0, bot.transcript
    assert token not in bot.transcript
    assert "Traceback" not in bot.transcript
    # The token that the setup obtained must carry every scope the bot uses.
    assert "could not read the bot account's blocks" not in bot.transcript


def test_setup_token_works_with_the_api(
    server: MastodonServer,
    tmp_path: Path,
    run_in_terminal: Callable[..., TerminalBot],
) -> None:
    bot = run_in_terminal()

    bot.respond(INSTANCE_PROMPT, server.base_url)
    url = bot.expect(AUTHORIZE_URL).group("url")
    bot.respond(CODE_PROMPT, VALID_CODE)
    bot.expect(r"Saved the token in ")
    token = dotenv_values(tmp_path / ".env")["MASTODON_ACCESS_TOKEN"]
    account = get_with_token(
        server.base_url, "/api/v1/accounts/verify_credentials", token
    )
    app = get_with_token(server.base_url, "/api/v1/apps/verify_credentials", token)

    assert account.status_code == 200
    assert account.json()["acct"] == "hashbot"
    assert app.status_code == 200
    assert sorted(app.json()["scopes"]) == sorted(requested_scopes(url))
    # The bot reads these at start-up and every hour. Mastodon's API documentation
    # lists read:blocks (blocks, domain_blocks) and read:mutes (mutes) for them.
    for path in ("/api/v1/blocks", "/api/v1/mutes", "/api/v1/domain_blocks"):
        response = get_with_token(server.base_url, path, token)
        assert response.status_code == 200, (path, response.text)


@pytest.mark.parametrize(
    ("actions", "expected", "unexpected"),
    [
        (["boost"], {"write:statuses"}, {"write:favourites", "write:bookmarks"}),
        (
            ["favourite", "bookmark"],
            {"write:favourites", "write:bookmarks"},
            {"write:statuses"},
        ),
    ],
    ids=["boost", "favourite-bookmark"],
)
def test_setup_requests_scopes_for_actions(
    server: MastodonServer,
    bot_files: Callable[..., BotFiles],
    run_in_terminal: Callable[..., TerminalBot],
    actions: list[str],
    expected: set[str],
    unexpected: set[str],
) -> None:
    files = bot_files(HASHTAGS=["python"], ACTIONS=actions)
    files.env.unlink()
    bot = run_in_terminal()

    bot.respond(INSTANCE_PROMPT, server.base_url)
    scopes = set(requested_scopes(bot.expect(AUTHORIZE_URL).group("url")))
    bot.end_input(CODE_PROMPT)
    status = bot.wait()

    assert expected <= scopes
    assert not scopes & unexpected
    assert "write" not in scopes
    assert {"read:statuses", "read:accounts"} <= scopes
    assert status == 1, bot.transcript


def test_setup_wrong_code_asks_again(
    server: MastodonServer,
    tmp_path: Path,
    bot_files: Callable[..., BotFiles],
    run_in_terminal: Callable[..., TerminalBot],
) -> None:
    files = bot_files(HASHTAGS=["python"])
    files.env.unlink()
    bot = run_in_terminal()

    bot.respond(INSTANCE_PROMPT, server.base_url)
    bot.respond(CODE_PROMPT, "mockcode_nosuchaccount")
    bot.expect(r"That code was not accepted")
    bot.respond(CODE_PROMPT, VALID_CODE)
    bot.expect(LOGGED_IN)
    bot.interrupt()

    assert bot.wait() == 0, bot.transcript
    assert dotenv_values(tmp_path / ".env")["MASTODON_ACCESS_TOKEN"]
    assert "Traceback" not in bot.transcript


def test_setup_unreachable_instance_asks_again(
    server: MastodonServer,
    tmp_path: Path,
    bot_files: Callable[..., BotFiles],
    run_in_terminal: Callable[..., TerminalBot],
) -> None:
    files = bot_files(HASHTAGS=["python"])
    files.env.unlink()
    unreachable = f"http://127.0.0.1:{unused_port()}"
    bot = run_in_terminal()

    bot.respond(INSTANCE_PROMPT, unreachable)
    bot.expect(rf"could not register the bot on {re.escape(unreachable)}\b")
    bot.respond(INSTANCE_PROMPT, server.base_url)
    bot.respond(CODE_PROMPT, VALID_CODE)
    bot.expect(LOGGED_IN)
    bot.interrupt()

    assert bot.wait() == 0, bot.transcript
    assert dotenv_values(tmp_path / ".env")["MASTODON_API_BASE_URL"] == server.base_url
    assert "Traceback" not in bot.transcript


def assert_setup_stopped(bot: TerminalBot, tmp_path: Path, reason: str) -> None:
    """Check that the setup ended with exit 1, one line naming ``reason``."""
    status = bot.wait()
    lines = bot.transcript.strip().splitlines()

    assert status == 1, bot.transcript
    assert lines[-1] == f"hashtag_bot: setup stopped ({reason}); run it again"
    assert "Traceback" not in bot.transcript
    assert not (tmp_path / ".env").exists()


def test_setup_three_bad_instances_exit_1(
    tmp_path: Path, run_in_terminal: Callable[..., TerminalBot]
) -> None:
    port = unused_port()
    bot = run_in_terminal()

    bot.respond(INSTANCE_PROMPT, f"http://127.0.0.1:{port}")
    bot.expect(r"could not register the bot on ")
    bot.respond(INSTANCE_PROMPT, "ftp://127.0.0.1")
    bot.expect(r"invalid MASTODON_API_BASE_URL 'ftp://127\.0\.0\.1'")
    bot.respond(INSTANCE_PROMPT, f"http://127.0.0.1:{port}/?page=1")
    bot.expect(r"invalid MASTODON_API_BASE_URL ")
    assert_setup_stopped(bot, tmp_path, "no instance could be reached")


def test_setup_three_bad_codes_exit_1(
    server: MastodonServer,
    tmp_path: Path,
    run_in_terminal: Callable[..., TerminalBot],
) -> None:
    bot = run_in_terminal()

    bot.respond(INSTANCE_PROMPT, server.base_url)
    for code in ("mockcode_nosuchaccount", "not-a-code", "mockcode_dave"):
        bot.respond(CODE_PROMPT, code)
        bot.expect(r"That code was not accepted")
    assert_setup_stopped(bot, tmp_path, "no valid authorization code")


def test_login_replaces_existing_env_file(
    server: MastodonServer,
    bot_files: Callable[..., BotFiles],
    run_in_terminal: Callable[..., TerminalBot],
) -> None:
    files = bot_files(HASHTAGS=["python"], access_token="revoked_token")
    files.env.chmod(0o644)
    bot = run_in_terminal("--login", server.base_url)

    url = bot.expect(AUTHORIZE_URL).group("url")
    bot.respond(CODE_PROMPT, VALID_CODE)
    bot.expect(LOGGED_IN)
    bot.interrupt()
    status = bot.wait()
    credentials = dotenv_values(files.env)

    assert url.startswith(server.base_url + "/oauth/authorize?")
    assert not re.search(INSTANCE_PROMPT, bot.transcript)
    assert credentials["MASTODON_API_BASE_URL"] == server.base_url
    assert credentials["MASTODON_ACCESS_TOKEN"] not in ("", "revoked_token")
    assert file_mode(files.env) == 0o600
    assert status == 0, bot.transcript
    assert credentials["MASTODON_ACCESS_TOKEN"] not in bot.transcript
    assert "Traceback" not in bot.transcript


# --- without a terminal ------------------------------------------------------------


@pytest.mark.parametrize("env_file", ["missing", "empty"])
def test_no_terminal_no_credentials_exit_2(
    bot_files: Callable[..., BotFiles],
    start_bot: Callable[..., BotProcess],
    env_file: str,
) -> None:
    files = bot_files(HASHTAGS=["python"])
    if env_file == "missing":
        files.env.unlink()
    else:
        files.env.write_text("", encoding="utf-8")
    bot = start_bot(files)

    status = bot.wait()
    lines = bot.log_text().splitlines()

    assert status == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith("hashtag_bot: error: ")
    assert "--login" in lines[0]
    assert bot.stdout_text() == ""


def test_credentials_from_environment_only_start(
    server: MastodonServer,
    bot_files: Callable[..., BotFiles],
    start_bot: Callable[..., BotProcess],
) -> None:
    files = bot_files(HASHTAGS=["python"])
    files.env.unlink()
    # No --env-file: with both variables set, the environment wins over any
    # .env beside the script.
    bot = start_bot(
        config=files.config,
        env={
            "MASTODON_API_BASE_URL": server.base_url,
            "MASTODON_ACCESS_TOKEN": server.token("hashbot"),
        },
    )

    bot.wait_for_log(LOGGED_IN)

    assert bot.stop() == 0
    assert not files.env.exists()
    assert "Traceback" not in bot.log_text()


# --- --check -------------------------------------------------------------------------


def run_check(start_bot: Callable[..., BotProcess], files: BotFiles) -> BotProcess:
    bot = start_bot(files, extra_args=["--check"])
    bot.wait()
    return bot


def check_lines(bot: BotProcess) -> list[str]:
    return bot.stdout_text().splitlines()


def test_check_good_setup_passes(
    bot_files: Callable[..., BotFiles], start_bot: Callable[..., BotProcess]
) -> None:
    bot = run_check(start_bot, bot_files(HASHTAGS=["python"]))
    lines = check_lines(bot)

    checks = [line.split(":")[0] for line in lines]

    assert bot.returncode == 0
    assert checks == [
        "PASS config",
        "PASS credentials",
        "PASS instance",
        "PASS token",
        "PASS scopes",
        "PASS stream",
        "PASS bot flag",
        "PASS opt-out hint",
        "PASS state file",
    ]
    assert "Traceback" not in bot.log_text()


def test_check_bad_token_fails(
    bot_files: Callable[..., BotFiles], start_bot: Callable[..., BotProcess]
) -> None:
    files = bot_files(HASHTAGS=["python"], access_token="not_a_valid_token")
    bot = run_check(start_bot, files)
    failures = [line for line in check_lines(bot) if line.startswith("FAIL")]

    assert bot.returncode == 1
    assert len(failures) == 1, check_lines(bot)
    assert failures[0].startswith("FAIL token: ")
    assert "MASTODON_ACCESS_TOKEN" in failures[0]
    assert "not_a_valid_token" not in bot.stdout_text() + bot.log_text()


def test_check_missing_scope_fails(
    server: MastodonServer,
    bot_files: Callable[..., BotFiles],
    start_bot: Callable[..., BotProcess],
) -> None:
    server.set_scopes("hashbot", ["read", "write:statuses"])
    files = bot_files(HASHTAGS=["python"], ACTIONS=["boost", "favourite"])
    bot = run_check(start_bot, files)
    failures = [line for line in check_lines(bot) if line.startswith("FAIL")]

    assert bot.returncode == 1
    assert len(failures) == 1, check_lines(bot)
    assert failures[0].startswith("FAIL scopes: ")
    assert "lacks write:favourites for ACTIONS" in failures[0]


def test_check_unreachable_instance_fails(
    bot_files: Callable[..., BotFiles], start_bot: Callable[..., BotProcess]
) -> None:
    unreachable = f"http://127.0.0.1:{unused_port()}"
    files = bot_files(HASHTAGS=["python"], base_url=unreachable)
    bot = run_check(start_bot, files)
    lines = check_lines(bot)

    assert bot.returncode == 1
    assert lines[-1].startswith("FAIL instance: ")
    assert unreachable in lines[-1]
    assert "Traceback" not in bot.log_text()


def test_check_bot_flag_off_warns(
    server: MastodonServer,
    bot_files: Callable[..., BotFiles],
    start_bot: Callable[..., BotProcess],
) -> None:
    server.set_profile("hashbot", bot=False)
    bot = run_check(start_bot, bot_files(HASHTAGS=["python"]))
    lines = check_lines(bot)

    assert bot.returncode == 0
    assert any(line.startswith("WARN bot flag: ") for line in lines), lines
    assert not any(line.startswith("FAIL") for line in lines), lines


# --- --once --------------------------------------------------------------------------


def test_once_acts_on_new_posts_once(
    server: MastodonServer,
    bot_files: Callable[..., BotFiles],
    start_bot: Callable[..., BotProcess],
) -> None:
    files = bot_files(HASHTAGS=["oncetag"], ACTION_DELAY_SECONDS=0)
    older = server.post("alice", "Before the first run #oncetag")

    first = start_bot(files, extra_args=["--once"])
    first_status = first.wait()
    boosts_after_first = server.action_counts("reblog")

    posts = [
        server.post(name, f"Hello #oncetag from {name}")
        for name in ("alice", "bob", "carol")
    ]
    second = start_bot(files, extra_args=["--once"])
    second_status = second.wait()
    boosts_after_second = server.action_counts("reblog")

    third = start_bot(files, extra_args=["--once"])
    third_status = third.wait()

    assert first_status == 0
    assert boosts_after_first == {}
    assert second_status == 0
    assert boosts_after_second == {post["id"]: 1 for post in posts}
    assert older["id"] not in boosts_after_second
    assert third_status == 0
    assert server.action_counts("reblog") == {post["id"]: 1 for post in posts}
