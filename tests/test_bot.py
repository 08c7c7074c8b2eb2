"""End-to-end tests of the bot: hashtag_bot.py run as a subprocess against the
Mastodon-like test server on 127.0.0.1.

Each test starts the bot through its command line, publishes posts (or injects
raw stream events), and checks what reached the server, the exit status and the
log. The bot talks HTTP to the server: nothing in Mastodon.py is mocked.

A test that must show that a post was *not* acted on publishes it first and a
post that must be boosted last, then waits for that last boost. A hashtag stream
delivers events in order, so by then the bot has decided on the earlier posts.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import pytest
from mastodon_server import MastodonServer
from tcp_proxy import TcpProxy

import hashtag_bot

if TYPE_CHECKING:
    from conftest import BotFiles, BotProcess

BOT_SCRIPT = Path(__file__).resolve().parent.parent / "hashtag_bot.py"
TAG = "python"
# Settings that keep every test short; a test overrides what it exercises.
FAST_SETTINGS: dict[str, Any] = {
    "HASHTAGS": [TAG],
    "ACTION_DELAY_SECONDS": 0,
    "USER_COOLDOWN_SECONDS": 0,
    "STREAM_TIMEOUT_SECONDS": 2,
    "RECONCILE_SECONDS": 3600,
}
# The README promises that the bot stops within a few seconds of Ctrl+C or
# SIGTERM, and that a rejected token ends it at start-up.
STOP_LIMIT_SECONDS = 5.0
FATAL_EXIT_LIMIT_SECONDS = 5.0
# How often the delay test reads the server's action log.
ACTION_POLL_SECONDS = 0.01
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@pytest.fixture
def server(reused_server: MastodonServer) -> MastodonServer:
    """The session's server, reset to its seed.

    It replaces conftest's fresh server, also for the fixtures that take
    ``server``, such as ``bot_files`` and ``stream_proxy``.
    """
    return reused_server


@pytest.fixture
def run_bot(
    server: MastodonServer,
    bot_files: Callable[..., BotFiles],
    start_bot: Callable[..., BotProcess],
) -> Callable[..., BotProcess]:
    """Return ``run(**settings)``, which starts the bot with FAST_SETTINGS updated.

    ``run`` returns once the server has an open stream for every hashtag in
    HASHTAGS, so posts published after that reach the bot.
    """

    def run(**settings: Any) -> BotProcess:
        bot = start_bot(bot_files(**{**FAST_SETTINGS, **settings}))
        for tag in settings.get("HASHTAGS", [TAG]):
            wait_for_stream(bot, server, tag)
        return bot

    return run


def wait_for_stream(bot: BotProcess, server: MastodonServer, tag: str = TAG) -> None:
    bot.wait_until(lambda: server.open_streams(tag), message=f"an open #{tag} stream")


def boosts(server: MastodonServer) -> dict[str, int]:
    """Return the bot account's successful boosts per post id."""
    return server.action_counts("reblog", username="hashbot")


def wait_for_boost(
    bot: BotProcess, server: MastodonServer, post: dict, timeout: float = 10.0
) -> None:
    bot.wait_until(
        lambda: post["id"] in boosts(server),
        timeout,
        message=f"a boost of {post['url']}",
    )


def stream_status(server: MastodonServer, status: dict, tag: str = TAG) -> None:
    """Send ``status`` as an ``update`` event on the bot's stream of ``tag``."""
    receivers = server.publish_raw(tag, "update", json.dumps(status))
    assert receivers == 1, f"{receivers} open #{tag} streams received the event"


def post_unstreamed(server: MastodonServer, username: str, text: str) -> dict:
    """Post an unlisted status, which no hashtag stream carries, and return it.

    The bot's rules allow unlisted posts, so a test can prepare the server for
    the post's id and then deliver the post with :func:`stream_status`.
    """
    return server.post(username, text, visibility="unlisted")


def skip_line(status: dict, reason: str) -> str:
    """Return a pattern for the -v line that skips ``status`` for ``reason``."""
    return rf"DEBUG skip {re.escape(status['url'])} .*: {re.escape(reason)}"


# --- which posts are boosted ----------------------------------------------------


def test_boost_mixed_case_tag(run_bot: Callable, server: MastodonServer) -> None:
    bot = run_bot()
    post = server.post("alice", "Learning #PyThon today")

    wait_for_boost(bot, server, post)
    bot.wait_for_log(f" INFO .*{re.escape(post['url'])}")
    lines = [
        line
        for line in bot.log_text().splitlines()
        if " INFO " in line and post["url"] in line
    ]

    assert boosts(server) == {post["id"]: 1}
    assert len(lines) == 1, lines
    assert "@alice" in lines[0]
    assert "#python" in lines[0]


def test_skip_rules_prevent_boost(run_bot: Callable, server: MastodonServer) -> None:
    bot = run_bot()
    untagged = server.post("alice", "No hashtag here")
    own = server.post("hashbot", "My own #python post")
    private = server.post("alice", "Followers only #python", visibility="private")
    # The server streams neither of these, so the test puts them on the stream
    # itself to prove that the bot's own rules reject them too.
    stream_status(server, untagged)
    stream_status(server, private)
    marker = server.post("bob", "Later #python post")

    wait_for_boost(bot, server, marker)
    boosted = boosts(server)
    log = bot.log_text()

    assert untagged["id"] not in boosted
    assert own["id"] not in boosted
    assert private["id"] not in boosted
    assert re.search(skip_line(untagged, "does not carry #python"), log)
    assert re.search(skip_line(own, "own post"), log)
    assert re.search(skip_line(private, "not public or unlisted (private)"), log)


def test_reblog_event_not_boosted(run_bot: Callable, server: MastodonServer) -> None:
    bot = run_bot()
    original = server.post("alice", "An untagged original")
    path = f"/api/v1/statuses/{original['id']}/reblog"
    reblog = server.request("POST", path, username="bob").json()
    # A boost carries no tags of its own. With the original's tag added, only
    # the bot's rule against boosts can reject this event.
    reblog["tags"] = [{"name": TAG, "url": f"https://{server.domain}/tags/{TAG}"}]
    stream_status(server, reblog)
    marker = server.post("carol", "Later #python post")

    wait_for_boost(bot, server, marker)
    boosted = boosts(server)

    assert reblog["reblog"]["id"] == original["id"]
    assert original["id"] not in boosted
    assert reblog["id"] not in boosted
    assert re.search(skip_line(reblog, "boost of another post"), bot.log_text())


def test_duplicate_delivery_acted_once(
    run_bot: Callable, server: MastodonServer
) -> None:
    bot = run_bot(HASHTAGS=["python", "rust"])
    post = server.post("alice", "Both #python and #rust")
    # The #rust stream and a repeated event each deliver the post once more.
    stream_status(server, post, "python")
    python_marker = server.post("bob", "Later #python post")
    rust_marker = server.post("carol", "Later #rust post")

    wait_for_boost(bot, server, python_marker)
    wait_for_boost(bot, server, rust_marker)
    already_handled = f"DEBUG skip {post['url']}: already handled"

    assert boosts(server)[post["id"]] == 1
    assert bot.log_text().count(already_handled) >= 2


# --- pacing ---------------------------------------------------------------------


def test_cooldown_skips_same_author(run_bot: Callable, server: MastodonServer) -> None:
    bot = run_bot(USER_COOLDOWN_SECONDS=60)
    first = server.post("alice", "First #python post")
    second = server.post("alice", "Second #python post")
    other = server.post("bob", "Another author's #python post")

    wait_for_boost(bot, server, other)
    boosted = boosts(server)

    assert first["id"] in boosted
    assert second["id"] not in boosted
    assert re.search(skip_line(second, "USER_COOLDOWN_SECONDS"), bot.log_text())


def test_action_delay_spaces_boosts(run_bot: Callable, server: MastodonServer) -> None:
    delay = 0.5
    run_bot(ACTION_DELAY_SECONDS=delay)
    published_at = time.monotonic()
    server.post("alice", "First #python post")
    server.post("bob", "Second #python post")

    # The action log has no timestamps, so note when each boost first shows.
    seen_at: list[float] = []
    deadline = published_at + 10
    while len(seen_at) < 2 and time.monotonic() < deadline:
        count = len(boosts(server))
        seen_at += [time.monotonic()] * (count - len(seen_at))
        time.sleep(ACTION_POLL_SECONDS)

    assert len(seen_at) == 2, f"{len(seen_at)} of 2 boosts arrived"
    # Each time is late by up to one poll, so a gap can look that much shorter.
    assert seen_at[0] - published_at >= delay - ACTION_POLL_SECONDS
    assert seen_at[1] - seen_at[0] >= delay - ACTION_POLL_SECONDS


# --- actions ----------------------------------------------------------------------


def test_actions_favourite_and_bookmark(
    run_bot: Callable, server: MastodonServer
) -> None:
    bot = run_bot(ACTIONS=["favourite", "bookmark"])
    post = server.post("alice", "Keep this #python post")

    bot.wait_until(
        lambda: server.action_counts("bookmark", username="hashbot"),
        message="a bookmark by the bot",
    )

    assert server.action_counts("favourite", username="hashbot") == {post["id"]: 1}
    assert server.action_counts("bookmark", username="hashbot") == {post["id"]: 1}
    assert boosts(server) == {}


def test_action_reply_fills_placeholders(
    run_bot: Callable, server: MastodonServer
) -> None:
    bot = run_bot(ACTIONS=["reply"], REPLY_TEXT="thanks {acct} for this #{tag} post")
    post = server.post("alice", "Question about #Python")

    [reply] = bot.wait_until(
        lambda: server.replies("hashbot"), message="a reply by the bot"
    )
    text = reply.params["status"]

    assert text.startswith("@alice ")
    assert text.endswith(" thanks alice for this #python post")
    assert reply.status["visibility"] == "unlisted"
    assert reply.in_reply_to_id == post["id"]


def test_dry_run_changes_nothing(
    bot_files: Callable[..., BotFiles],
    start_bot: Callable[..., BotProcess],
    server: MastodonServer,
    tmp_path: Path,
) -> None:
    files = bot_files(
        **FAST_SETTINGS,
        ACTIONS=["boost", "favourite", "bookmark", "reply"],
        REPLY_TEXT="thanks",
    )
    # One bot for each way to ask for a dry run.
    bots = {
        "--dry-run": start_bot(files, dry_run=True),
        "DRY_RUN=true": start_bot(files, env={"DRY_RUN": "true"}),
    }
    for bot in bots.values():
        bot.wait_for_log("#python: stream connected")
    post = server.post("alice", "Try #python")

    for bot in bots.values():
        # The reply is the last action, so the others were decided by then.
        bot.wait_for_log(f"would reply {re.escape(post['url'])}")
        bot.stop()

    assert server.action_log() == []
    assert not (tmp_path / "hashtag_bot_state.json").exists()
    for way, bot in bots.items():
        assert bot.returncode == 0, f"{way}: exit status {bot.returncode}"
        assert f"would boost {post['url']} by @alice" in bot.log_text(), way


# --- server errors ----------------------------------------------------------------


def test_reblog_errors_skip_or_retry(run_bot: Callable, server: MastodonServer) -> None:
    bot = run_bot()
    # Forced statuses and how many reblog requests of the post each one fails.
    # The persistent 500 fails the first try and every retry.
    faults = {
        "404": (404, 1),
        "403": (403, 1),
        "500-persistent": (500, hashtag_bot.RETRY_ATTEMPTS),
        "500-once": (500, 1),
    }
    posts = {}
    for name, (status, count) in faults.items():
        post = post_unstreamed(server, "alice", f"Reblog fails: {name} #python")
        path = f"/api/v1/statuses/{post['id']}/reblog"
        server.fault(path=path, methods=["POST"], status=status, count=count)
        stream_status(server, post)
        posts[name] = post

    # The persistent 500 costs three retry waits of 0.5-1, 1-2 and 2-4 s.
    wait_for_boost(bot, server, posts["500-once"], timeout=15)
    boosted = boosts(server)
    log = bot.log_text()

    assert posts["404"]["id"] not in boosted
    assert posts["403"]["id"] not in boosted
    assert posts["500-persistent"]["id"] not in boosted
    assert boosted[posts["500-once"]["id"]] == 1
    assert f"skip {posts['404']['url']} by @alice: boost not found (404)" in log
    assert f"skip {posts['403']['url']} by @alice: boost rejected (403)" in log
    skipped_500 = f"skip {posts['500-persistent']['url']} by @alice: boost gave up"
    assert skipped_500 in log
    assert f"WARNING could not boost {posts['500-once']['url']}" in log


# --- the stream breaks --------------------------------------------------------------


def test_stream_refused_then_recovers(
    bot_files: Callable[..., BotFiles],
    start_bot: Callable[..., BotProcess],
    server: MastodonServer,
    stream_proxy: TcpProxy,
) -> None:
    stream_proxy.refuse(True)
    bot = start_bot(bot_files(**FAST_SETTINGS))

    bot.wait_for_log(r"WARNING #python: stream disconnected \(.*\); reconnecting")
    stream_proxy.refuse(False)
    wait_for_stream(bot, server)
    post = server.post("alice", "After the outage #python")

    wait_for_boost(bot, server, post)


def test_stream_cut_post_boosted_once(
    run_bot: Callable, server: MastodonServer, stream_proxy: TcpProxy
) -> None:
    bot = run_bot()
    # Logged at the first bytes from the server, so the cut comes mid-stream.
    bot.wait_for_log("#python: stream connected")
    assert stream_proxy.cut() == 1
    post = server.post("alice", "Published during the cut #python")

    wait_for_boost(bot, server, post)
    marker = server.post("bob", "Later #python post")
    wait_for_boost(bot, server, marker)

    assert boosts(server)[post["id"]] == 1


def test_stream_stall_reconnects(
    run_bot: Callable, server: MastodonServer, stream_proxy: TcpProxy
) -> None:
    timeout = 1.0
    bot = run_bot(STREAM_TIMEOUT_SECONDS=timeout)
    bot.wait_for_log("#python: stream connected")
    start = bot.log_position()

    stream_proxy.stall(True)
    bot.wait_for_log(
        r"WARNING #python: stream disconnected \(.*\); reconnecting",
        timeout=2 * timeout,
        start=start,
    )
    post = server.post("alice", "Published during the stall #python")
    stream_proxy.stall(False)

    wait_for_boost(bot, server, post)


def test_stream_timeout_log_names_setting(
    run_bot: Callable, server: MastodonServer
) -> None:
    timeout = 0.5
    bot = run_bot(STREAM_TIMEOUT_SECONDS=timeout)
    bot.wait_for_log("#python: stream connected")
    server.heartbeat_seconds = None

    line = bot.wait_for_log(r"WARNING #python: stream disconnected .*", 3 * timeout)

    assert "STREAM_TIMEOUT_SECONDS" in line.group(0)


# --- credentials --------------------------------------------------------------------


def test_rejected_token_exits_one(
    bot_files: Callable[..., BotFiles], start_bot: Callable[..., BotProcess]
) -> None:
    files = bot_files(access_token="revoked_token", **FAST_SETTINGS)
    bot = start_bot(files, verbose=True)

    exit_code = bot.wait(timeout=FATAL_EXIT_LIMIT_SECONDS)
    log = bot.log_text()

    assert exit_code == 1
    assert "MASTODON_ACCESS_TOKEN" in log.splitlines()[-1]
    assert "Traceback" not in log
    assert "revoked_token" not in log


def wait_for_fatal_exit(bot: BotProcess) -> str:
    """Wait for the bot to exit with status 1 and return its last stderr line."""
    exit_code = bot.wait(timeout=FATAL_EXIT_LIMIT_SECONDS)
    log = bot.log_text()
    assert exit_code == 1
    assert "Traceback" not in log
    return log.splitlines()[-1]


def test_missing_scope_at_start_exits_one(
    bot_files: Callable[..., BotFiles],
    start_bot: Callable[..., BotProcess],
    server: MastodonServer,
) -> None:
    server.set_scopes("hashbot", ["read", "write:statuses"])
    files = bot_files(ACTIONS=["boost", "favourite"], **FAST_SETTINGS)
    bot = start_bot(files, verbose=True)

    last_line = wait_for_fatal_exit(bot)

    assert "write:favourites" in last_line


@pytest.mark.parametrize(
    ("status", "body", "named"),
    [
        # Mastodon responds with 401 once the owner revokes the token.
        (401, None, "MASTODON_ACCESS_TOKEN (401)"),
        (
            403,
            {"error": "This action is outside the authorized scopes"},
            "write:statuses",
        ),
    ],
    ids=["token-revoked", "scope-missing"],
)
def test_rejection_while_running_exits_one(
    bot_files: Callable[..., BotFiles],
    start_bot: Callable[..., BotProcess],
    server: MastodonServer,
    status: int,
    body: dict | None,
    named: str,
) -> None:
    bot = start_bot(bot_files(**FAST_SETTINGS), verbose=True)
    wait_for_stream(bot, server)
    server.fault(path_regex=r"/reblog$", status=status, body=body, count=1)
    server.post("alice", "Boosted with a rejected token #python")

    last_line = wait_for_fatal_exit(bot)

    assert named in last_line


def test_token_absent_from_verbose_log(
    bot_files: Callable[..., BotFiles],
    start_bot: Callable[..., BotProcess],
    server: MastodonServer,
) -> None:
    # test_rejected_token_exits_one checks the log of a rejected token.
    bot = start_bot(bot_files(**FAST_SETTINGS), verbose=True)
    wait_for_stream(bot, server)
    server.post("hashbot", "Skipped: my own #python post")
    post = server.post("alice", "Boosted #python post")
    wait_for_boost(bot, server, post)
    bot.stop()

    assert " DEBUG " in bot.log_text(), "the bot did not log at debug level"
    assert "hashbot_token" not in bot.log_text()


# --- stopping -----------------------------------------------------------------------


def assert_each_signal_stops(bots: dict[signal.Signals, BotProcess]) -> None:
    """Send each bot its signal, then check its exit status and its log."""
    for signum, bot in bots.items():
        bot.send_signal(signum)
    deadline = time.monotonic() + STOP_LIMIT_SECONDS
    for signum, bot in bots.items():
        # Raises subprocess.TimeoutExpired if the bot is still running then.
        exit_code = bot.wait(timeout=max(0.0, deadline - time.monotonic()))
        log = bot.log_text()
        assert exit_code == 0, f"exit status {exit_code} after {signum.name}"
        assert f"stopping ({signum.name})" in log
        assert "Traceback" not in log, f"traceback after {signum.name}"


def start_bot_per_signal(
    start_bot: Callable[..., BotProcess], files: BotFiles, tmp_path: Path
) -> dict[signal.Signals, BotProcess]:
    """Start one bot for each stop signal, each with a state file of its own."""
    return {
        signum: start_bot(
            files, env={"STATE_FILE": str(tmp_path / f"state-{signum.name}.json")}
        )
        for signum in STOP_SIGNALS
    }


def test_signal_while_idle_exits_zero(
    bot_files: Callable[..., BotFiles],
    start_bot: Callable[..., BotProcess],
    tmp_path: Path,
) -> None:
    bots = start_bot_per_signal(start_bot, bot_files(**FAST_SETTINGS), tmp_path)
    for bot in bots.values():
        bot.wait_for_log("#python: stream connected")

    assert_each_signal_stops(bots)


def test_signal_during_action_delay_exits_zero(
    bot_files: Callable[..., BotFiles],
    start_bot: Callable[..., BotProcess],
    server: MastodonServer,
    tmp_path: Path,
) -> None:
    # The bot never replies to a bot, and it logs that decision just before it
    # waits ACTION_DELAY_SECONDS for the boost. So that line marks the wait.
    settings = {
        **FAST_SETTINGS,
        "ACTIONS": ["reply", "boost"],
        "REPLY_TEXT": "thanks",
        "SKIP_BOTS": False,
        "ACTION_DELAY_SECONDS": 30,
    }
    bots = start_bot_per_signal(start_bot, bot_files(**settings), tmp_path)
    for bot in bots.values():
        bot.wait_for_log("#python: stream connected")
    post = server.post("robo", "An automated #python post")
    for bot in bots.values():
        bot.wait_for_log(f"no reply to {re.escape(post['url'])}: author is a bot")

    assert_each_signal_stops(bots)
    assert boosts(server) == {}


def test_signal_during_backoff_exits_zero(
    bot_files: Callable[..., BotFiles],
    start_bot: Callable[..., BotProcess],
    stream_proxy: TcpProxy,
    tmp_path: Path,
) -> None:
    stream_proxy.refuse(True)
    bots = start_bot_per_signal(start_bot, bot_files(**FAST_SETTINGS), tmp_path)
    for bot in bots.values():
        bot.wait_for_log(r"#python: stream disconnected \(.*\); reconnecting in")

    assert_each_signal_stops(bots)


# --- command line and settings, without a server --------------------------------------


class ConfigErrorCase(NamedTuple):
    """A bad configuration and what the one line on stderr must contain."""

    config_text: str | None  # None: no config.py at the path given to the bot
    environment: dict[str, str]
    base_url: str | None  # None: no env file at the path given to the bot
    # {config} and {env_file} in these texts are placeholders for those paths.
    expected: list[str]


# Nothing listens here: each case stops the bot before it sends a request.
LOOPBACK_BASE_URL = "http://127.0.0.1:9"
VALID_CONFIG = 'HASHTAGS = ["python"]\n'
CONFIG_ERROR_CASES = {
    "unknown-action": ConfigErrorCase(
        VALID_CONFIG + 'ACTIONS = ["retweet"]\n',
        {},
        LOOPBACK_BASE_URL,
        ["ACTIONS", "'retweet'"],
    ),
    "hashtags-missing": ConfigErrorCase(
        'ACTIONS = ["boost"]\n', {}, LOOPBACK_BASE_URL, ["HASHTAGS"]
    ),
    "delay-not-a-number": ConfigErrorCase(
        VALID_CONFIG,
        {"ACTION_DELAY_SECONDS": "abc"},
        LOOPBACK_BASE_URL,
        ["ACTION_DELAY_SECONDS", "'abc'"],
    ),
    "local-only-not-a-boolean": ConfigErrorCase(
        VALID_CONFIG,
        {"LOCAL_ONLY": "maybe"},
        LOOPBACK_BASE_URL,
        ["LOCAL_ONLY", "'maybe'"],
    ),
    "http-remote-base-url": ConfigErrorCase(
        VALID_CONFIG,
        {},
        "http://mastodon.example",
        ["MASTODON_API_BASE_URL", "http://mastodon.example", "https://"],
    ),
    "config-file-missing": ConfigErrorCase(None, {}, LOOPBACK_BASE_URL, ["{config}"]),
    "env-file-missing": ConfigErrorCase(VALID_CONFIG, {}, None, ["{env_file}"]),
    "config-syntax-error": ConfigErrorCase(
        VALID_CONFIG + 'ACTIONS = ["boost"\n',
        {},
        LOOPBACK_BASE_URL,
        ["{config}", "line 2"],
    ),
}


def run_config_error_case(
    directory: Path, case: ConfigErrorCase
) -> subprocess.CompletedProcess:
    """Write the case's files into ``directory``, run the bot there, and return."""
    config, env_file = directory / "config.py", directory / ".env"
    if case.config_text is not None:
        config.write_text(case.config_text, encoding="utf-8")
    if case.base_url is not None:
        env_file.write_text(
            f"MASTODON_API_BASE_URL={case.base_url}\n"
            "MASTODON_ACCESS_TOKEN=hashbot_token\n",
            encoding="utf-8",
        )
    # As in conftest's BotProcess: the developer's own Mastodon settings must
    # not reach the bot.
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("MASTODON_")
    }
    return subprocess.run(
        [sys.executable, str(BOT_SCRIPT), "--config", str(config)]
        + ["--env-file", str(env_file)],
        cwd=directory,
        env={**environment, **case.environment},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture(scope="module")
def config_error_runs(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, tuple[Path, Future]]]:
    """Start the bot for every CONFIG_ERROR_CASES case, all at once.

    Returns each case's directory and the future of its CompletedProcess. Each
    run spends most of its time importing Mastodon.py, so running them side by
    side keeps this file within its time budget.
    """
    with ThreadPoolExecutor(max_workers=len(CONFIG_ERROR_CASES)) as pool:
        runs = {}
        for name, case in CONFIG_ERROR_CASES.items():
            directory = tmp_path_factory.mktemp(name)
            future = pool.submit(run_config_error_case, directory, case)
            runs[name] = (directory, future)
        yield runs


@pytest.mark.parametrize("name", list(CONFIG_ERROR_CASES))
def test_config_error_exits_two(
    config_error_runs: dict[str, tuple[Path, Future]], name: str
) -> None:
    directory, future = config_error_runs[name]
    result = future.result()
    expected = [
        text.format(config=directory / "config.py", env_file=directory / ".env")
        for text in CONFIG_ERROR_CASES[name].expected
    ]
    lines = result.stderr.splitlines()

    assert result.returncode == 2
    assert len(lines) == 1, result.stderr
    for text in expected:
        assert text in lines[0]
    assert "Traceback" not in result.stderr


def test_version_flag_prints_version(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        hashtag_bot.main(["--version"])

    assert exit_info.value.code == 0
    assert hashtag_bot.__version__ in capsys.readouterr().out


def test_help_lists_every_option(capsys: pytest.CaptureFixture) -> None:
    options = ["--config", "--env-file", "--dry-run", "--once", "--check"]
    options += ["--login", "-v", "--verbose", "--version", "--help"]

    with pytest.raises(SystemExit) as exit_info:
        hashtag_bot.main(["--help"])
    help_text = capsys.readouterr().out

    assert exit_info.value.code == 0
    for option in options:
        # A whole option, so "-v" does not match inside "--version".
        pattern = rf"(?<![\w-]){re.escape(option)}\b"
        assert re.search(pattern, help_text), f"{option} is missing from --help"


# --- the state file at start-up --------------------------------------------------


def test_second_bot_on_state_file_exits_one(
    bot_files: Callable[..., BotFiles],
    start_bot: Callable[..., BotProcess],
    server: MastodonServer,
) -> None:
    files = bot_files(**FAST_SETTINGS)
    first = start_bot(files, verbose=True)
    wait_for_stream(first, server)
    second = start_bot(files, verbose=True)

    last_line = wait_for_fatal_exit(second)

    assert "another hashtag_bot is running" in last_line
    assert first.returncode is None


def test_unwritable_state_file_exits_one(
    bot_files: Callable[..., BotFiles],
    start_bot: Callable[..., BotProcess],
    tmp_path: Path,
) -> None:
    missing_folder = tmp_path / "no" / "such" / "folder" / "state.json"
    files = bot_files(**{**FAST_SETTINGS, "STATE_FILE": str(missing_folder)})
    bot = start_bot(files, verbose=True)

    last_line = wait_for_fatal_exit(bot)

    assert "STATE_FILE" in last_line


def test_saved_pause_logged_at_start(
    bot_files: Callable[..., BotFiles],
    start_bot: Callable[..., BotProcess],
    tmp_path: Path,
) -> None:
    state_path = tmp_path / "saved_pause.json"
    state_path.write_text(
        json.dumps(
            {
                "positions": {TAG: ""},
                "pause_until": time.time() + 3600,
                "pause_kind": "ratelimit",
            }
        ),
        encoding="utf-8",
    )
    files = bot_files(**{**FAST_SETTINGS, "STATE_FILE": str(state_path)})
    bot = start_bot(files, verbose=True)

    bot.wait_for_log(r"actions are paused until .*\(rate limited by the server")


def test_budget_pause_ends_when_limit_raised(
    bot_files: Callable[..., BotFiles],
    start_bot: Callable[..., BotProcess],
    server: MastodonServer,
    tmp_path: Path,
) -> None:
    now = time.time()
    state_path = tmp_path / "saved_budget.json"
    state_path.write_text(
        json.dumps(
            {
                "positions": {TAG: ""},
                "action_times": [now - 60],
                "pause_until": now + 3540,
                "pause_kind": "budget",
            }
        ),
        encoding="utf-8",
    )
    settings = {**FAST_SETTINGS, "STATE_FILE": str(state_path)}
    bot = start_bot(bot_files(MAX_ACTIONS_PER_HOUR=60, **settings), verbose=True)
    wait_for_stream(bot, server)
    post = server.post("alice", "Boosted once the limit was raised #python")

    wait_for_boost(bot, server, post)
