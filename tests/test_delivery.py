"""Delivery guarantees of hashtag_bot: it loses no post and acts on none twice.

Most tests run hashtag_bot.py as a subprocess against the local test server and
wait on what the server recorded (``server.action_counts``), through restarts,
crashes, outages, silent streams, rate limits and server errors. Behaviour that
would need long waits (a minute of rate-limit backoff, the hourly budget) runs
the bot in-process with an injected clock whose sleep advances the time at once.
"""

from __future__ import annotations

import json
import math
import random
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import pytest
from mastodon_server import MastodonServer
from tcp_proxy import TcpProxy

import hashtag_bot

REBLOG_PATH = r"^/api/v1/statuses/[^/]+/reblog$"
STREAM_PATH = "/api/v1/streaming/hashtag"
# Settings that let a test see every action at once: no delay, no cooldown.
NO_PACING = {"ACTION_DELAY_SECONDS": 0, "USER_COOLDOWN_SECONDS": 0}
BOOST_TIMEOUT_SECONDS = 10.0


def boost_counts(server: MastodonServer, ids: list[str]) -> dict[str, int]:
    """Return how often the server boosted each of ``ids`` (0 for never)."""
    counts = server.action_counts("reblog")
    return {status_id: counts.get(status_id, 0) for status_id in ids}


def publish(server: MastodonServer, username: str, tag: str, count: int) -> list[str]:
    """Publish ``count`` posts tagged ``tag`` as ``username`` and return their ids."""
    return [server.post(username, f"Post {n} #{tag}")["id"] for n in range(count)]


def wait_for_boosts(
    bot: Any,
    server: MastodonServer,
    ids: list[str],
    timeout: float = BOOST_TIMEOUT_SECONDS,
) -> None:
    """Wait until the server has boosted every post of ``ids`` at least once."""

    def all_boosted() -> bool:
        return all(boost_counts(server, ids).values())

    bot.wait_until(all_boosted, timeout, message=f"boosts of {len(ids)} posts")


def start_watching(
    start_bot: Callable[..., Any], server: MastodonServer, files: Any, tag: str
) -> Any:
    """Start the bot and wait until its stream of ``tag`` is open."""
    bot = start_bot(files)
    bot.wait_until(lambda: server.open_streams(tag), message=f"a stream for #{tag}")
    return bot


def wait_for_live_stream(bot: Any, server: MastodonServer, tag: str) -> None:
    """Publish a post and wait for its boost.

    After that the stream is delivering and the catch-up the bot runs when a
    stream opens is over, so a later post can only arrive through the stream
    or a later catch-up.
    """
    marker = server.post("carol", f"The stream works #{tag}")["id"]
    wait_for_boosts(bot, server, [marker])


def iso_8601(moment: float) -> str:
    """Format a Unix time as ISO 8601 in UTC: ``2025-01-01T12:00:00.000000Z``."""
    text = datetime.fromtimestamp(moment, timezone.utc).isoformat("T", "microseconds")
    return text.replace("+00:00", "Z")


def read_state(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


class FakeClock:
    """Time for an in-process bot: ``sleep`` advances it at once, never blocking."""

    def __init__(self, start: float) -> None:
        self.now = start
        self.stop_event = threading.Event()

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> bool:
        """Advance the time and return True if the bot is stopping, like its sleep."""
        self.now += seconds
        return self.stop_event.is_set()


@pytest.fixture
def server(reused_server: MastodonServer) -> MastodonServer:
    """The session's server, reset to its seed (overrides conftest's fresh one)."""
    return reused_server


@pytest.fixture
def bot_in_process(
    server: MastodonServer, bot_files: Callable[..., Any]
) -> Iterator[Callable[..., tuple[hashtag_bot.HashtagBot, FakeClock]]]:
    """Return ``make(**settings)``: a started HashtagBot on a fake clock.

    Nothing runs in the background: the test calls ``catch_up`` itself, which
    reads the timeline and acts on the posts in the calling thread.
    """
    bots: list[hashtag_bot.HashtagBot] = []

    def make(**settings: Any) -> tuple[hashtag_bot.HashtagBot, FakeClock]:
        files = bot_files(**settings)
        loaded = hashtag_bot.load_settings(files.config, {})
        credentials = hashtag_bot.Credentials(server.base_url, "hashbot_token")
        clock = FakeClock(time.time())
        bot = hashtag_bot.HashtagBot(
            loaded, credentials, clock=clock.time, sleep=clock.sleep
        )
        clock.stop_event = bot.stop_event
        bots.append(bot)
        bot.start()
        return bot, clock

    yield make
    for bot in bots:
        bot.stop()
        bot.api.session.close()


# --- restarts and crashes ------------------------------------------------------


def test_restart_acts_on_posts_missed_while_stopped(
    server: MastodonServer, bot_files: Callable[..., Any], start_bot: Callable[..., Any]
) -> None:
    tag = "restart"
    backlog = publish(server, "alice", tag, 2)
    files = bot_files(HASHTAGS=[tag], **NO_PACING)
    first = start_watching(start_bot, server, files, tag)
    live = server.post("bob", "While running #restart")["id"]
    wait_for_boosts(first, server, [live])
    assert first.stop() == 0

    missed = publish(server, "carol", tag, 3)
    second = start_watching(start_bot, server, files, tag)
    wait_for_boosts(second, server, missed)

    assert boost_counts(server, backlog) == dict.fromkeys(backlog, 0)
    assert server.action_counts("reblog") == dict.fromkeys([live, *missed], 1)


def test_sigkill_mid_stream_repeats_at_most_one(
    server: MastodonServer, bot_files: Callable[..., Any], start_bot: Callable[..., Any]
) -> None:
    tag = "sigkill"
    files = bot_files(
        HASHTAGS=[tag], ACTION_DELAY_SECONDS=0.02, USER_COOLDOWN_SECONDS=0
    )
    first = start_watching(start_bot, server, files, tag)
    ids = publish(server, "alice", tag, 20)
    first.wait_until(
        lambda: len(server.action_counts("reblog")) >= 5, message="5 boosts"
    )
    first.send_signal(signal.SIGKILL)
    first.wait()
    boosted_before_kill = len(server.action_counts("reblog"))

    second = start_bot(files)
    wait_for_boosts(second, server, ids)

    counts = boost_counts(server, ids)
    # A kill between the boost and the state write repeats that one boost, for
    # which Mastodon returns 200 and the same result. Nothing else may repeat.
    repeated = [status_id for status_id, count in counts.items() if count > 1]
    assert boosted_before_kill < len(ids)
    assert min(counts.values()) >= 1
    assert len(repeated) <= 1
    assert max(counts.values()) <= 2


def test_corrupt_state_file_moved_aside(
    server: MastodonServer,
    bot_files: Callable[..., Any],
    start_bot: Callable[..., Any],
    tmp_path: Path,
) -> None:
    tag = "corrupt"
    state_file = tmp_path / "state.json"
    state_file.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe not json")
    before = server.post("alice", "Before the start #corrupt")["id"]
    files = bot_files(HASHTAGS=[tag], STATE_FILE=str(state_file), **NO_PACING)
    bot = start_watching(start_bot, server, files, tag)
    after = server.post("bob", "After the start #corrupt")["id"]
    wait_for_boosts(bot, server, [after])

    assert bot.returncode is None
    assert len(list(tmp_path.glob("state.json.corrupt-*"))) == 1
    assert re.search(r"WARNING state file .* is corrupt", bot.log_text())
    # As on a first run, the posts from before the start are left alone.
    assert boost_counts(server, [before, after]) == {before: 0, after: 1}


# --- broken connections ---------------------------------------------------------


def test_outage_posts_published_meanwhile_boosted_once(
    server: MastodonServer,
    bot_files: Callable[..., Any],
    start_bot: Callable[..., Any],
    proxy_factory: Callable[[int], TcpProxy],
) -> None:
    tag = "outage"
    proxy = proxy_factory(server.port)
    server.streaming_url = proxy.url
    files = bot_files(HASHTAGS=[tag], base_url=proxy.url, **NO_PACING)
    bot = start_watching(start_bot, server, files, tag)

    proxy.refuse(True)
    proxy.cut()
    ids = publish(server, "alice", tag, 3)
    time.sleep(2.0)  # the outage: longer than the bot's first retries
    assert boost_counts(server, ids) == dict.fromkeys(ids, 0)
    proxy.refuse(False)
    wait_for_boosts(bot, server, ids, timeout=20.0)

    assert boost_counts(server, ids) == dict.fromkeys(ids, 1)


def test_stalled_stream_noticed_and_post_boosted(
    server: MastodonServer,
    stream_proxy: TcpProxy,
    bot_files: Callable[..., Any],
    start_bot: Callable[..., Any],
) -> None:
    tag = "stalled"
    timeout = 1.0
    files = bot_files(HASHTAGS=[tag], STREAM_TIMEOUT_SECONDS=timeout, **NO_PACING)
    bot = start_watching(start_bot, server, files, tag)
    wait_for_live_stream(bot, server, tag)

    stream_proxy.stall(True)
    stalled_at = time.monotonic()
    during = server.post("alice", "Nobody hears this #stalled")["id"]
    # Only a catch-up after the bot gave up on the stream can find this post.
    wait_for_boosts(bot, server, [during])
    noticed_after = time.monotonic() - stalled_at
    stream_proxy.stall(False)
    resumed_at = time.monotonic()
    bot.wait_until(
        lambda: any(s.opened_at > resumed_at for s in server.open_streams(tag)),
        message="a new stream after the stall",
    )
    after = server.post("bob", "Heard again #stalled")["id"]
    wait_for_boosts(bot, server, [after])

    # The timeout, a reconnect backoff of at most 1 s and a catch-up.
    assert noticed_after < timeout + 2.5
    assert boost_counts(server, [during, after]) == {during: 1, after: 1}


def test_heartbeats_without_posts_reconciled(
    server: MastodonServer, bot_files: Callable[..., Any], start_bot: Callable[..., Any]
) -> None:
    tag = "silenced"
    files = bot_files(HASHTAGS=[tag], RECONCILE_SECONDS=1, **NO_PACING)
    bot = start_watching(start_bot, server, files, tag)
    wait_for_live_stream(bot, server, tag)

    server.silence_streams()
    ids = publish(server, "alice", tag, 2)
    wait_for_boosts(bot, server, ids)

    def reported_missed() -> int:
        pattern = r"WARNING #silenced: the stream missed (\d+) posts"
        return sum(int(count) for count in re.findall(pattern, bot.log_text()))

    # The bot logs the count after it has acted on the missed posts.
    bot.wait_until(lambda: reported_missed() >= len(ids), message="the warning")
    assert reported_missed() == len(ids)
    assert boost_counts(server, ids) == dict.fromkeys(ids, 1)


def test_stream_refused_401_switches_to_polling(
    server: MastodonServer, bot_files: Callable[..., Any], start_bot: Callable[..., Any]
) -> None:
    tag = "refused"
    server.fault(
        path=STREAM_PATH,
        status=401,
        body={"error": "Error: Invalid access token"},
        count=1000,
    )
    files = bot_files(HASHTAGS=[tag], POLL_SECONDS=1, **NO_PACING)
    bot = start_bot(files)
    bot.wait_for_log(r"polling the timeline every 1 s instead", timeout=15.0)
    ids = publish(server, "alice", tag, 2)
    wait_for_boosts(bot, server, ids)

    polling_lines = re.findall(r".*polling the timeline every.*", bot.log_text())
    assert len(polling_lines) == 1
    assert "refused 3 connects in a row" in polling_lines[0]
    assert "Unauthorized" in polling_lines[0]
    assert boost_counts(server, ids) == dict.fromkeys(ids, 1)


# --- edits -------------------------------------------------------------------------


def test_edit_adding_tag_boosts_once(
    server: MastodonServer, bot_files: Callable[..., Any], start_bot: Callable[..., Any]
) -> None:
    tag = "edited"
    files = bot_files(HASHTAGS=[tag], **NO_PACING)
    bot = start_watching(start_bot, server, files, tag)
    wait_for_live_stream(bot, server, tag)
    post = server.post("alice", "No hashtag yet")["id"]
    # With the stream open and RECONCILE_SECONDS at 300, only the stream's
    # status.update event can bring this post to the bot.
    server.edit("alice", post, "Now with #edited")
    wait_for_boosts(bot, server, [post])

    server.edit("alice", post, "Now with #edited, and a typo fixed")
    # The stream delivers in order: once this post is boosted, the edit before
    # it has been handled too.
    marker = server.post("bob", "After the second edit #edited")["id"]
    wait_for_boosts(bot, server, [marker])

    assert boost_counts(server, [post]) == {post: 1}


# --- rate limits ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "format_reset",
    [iso_8601, lambda moment: str(int(moment))],
    ids=["iso8601", "unix"],
)
def test_ratelimit_reset_header_pauses_then_boosts(
    server: MastodonServer,
    bot_files: Callable[..., Any],
    start_bot: Callable[..., Any],
    format_reset: Callable[[float], str],
) -> None:
    tag = "ratelimited"
    files = bot_files(HASHTAGS=[tag], **NO_PACING)
    bot = start_watching(start_bot, server, files, tag)
    # A whole second, 1 to 2 s ahead, so that both formats state it exactly.
    reset_at = float(math.ceil(time.time() + 1.0))
    server.fault(
        path_regex=REBLOG_PATH,
        type="ratelimit",
        headers={"X-RateLimit-Reset": format_reset(reset_at)},
        count=1,
    )
    post = server.post("alice", "Too fast #ratelimited")["id"]
    wait_for_boosts(bot, server, [post])
    boosted_at = time.time()

    assert boosted_at >= reset_at
    assert boost_counts(server, [post]) == {post: 1}


def test_ratelimit_without_reset_backs_off_doubling(
    server: MastodonServer, bot_in_process: Callable[..., Any]
) -> None:
    tag = "backoff"
    bot, clock = bot_in_process(HASHTAGS=[tag], **NO_PACING)
    bot.catch_up(tag, "catch-up")
    post = server.post("alice", "Limited without a reset #backoff")["id"]

    server.fault(path_regex=REBLOG_PATH, status=429, count=1)
    with pytest.raises(hashtag_bot.Paused):
        bot.catch_up(tag, "catch-up")
    first_pause = bot.state.pause_until - clock.now

    clock.now = bot.state.pause_until
    server.fault(path_regex=REBLOG_PATH, status=429, count=1)
    with pytest.raises(hashtag_bot.Paused):
        bot.catch_up(tag, "catch-up")
    second_pause = bot.state.pause_until - clock.now

    clock.now = bot.state.pause_until
    bot.catch_up(tag, "catch-up")

    assert first_pause == pytest.approx(60.0)
    assert second_pause == pytest.approx(120.0)
    assert boost_counts(server, [post]) == {post: 1}


def test_ratelimit_far_reset_closes_stream(
    server: MastodonServer,
    bot_files: Callable[..., Any],
    start_bot: Callable[..., Any],
    tmp_path: Path,
) -> None:
    tag = "farreset"
    state_file = tmp_path / "state.json"
    files = bot_files(HASHTAGS=[tag], STATE_FILE=str(state_file), **NO_PACING)
    bot = start_watching(start_bot, server, files, tag)
    reset_at = time.time() + 3600.0
    server.fault(
        path_regex=REBLOG_PATH,
        type="ratelimit",
        headers={"X-RateLimit-Reset": iso_8601(reset_at)},
        count=1,
    )
    post = server.post("alice", "Limited for an hour #farreset")["id"]
    bot.wait_for_log(r"rate limited \(429\) .* pausing all actions for \d+ s")
    bot.wait_until(lambda: not server.open_streams(tag), message="the stream to close")

    state = read_state(state_file)
    assert state["pause_until"] >= reset_at
    # The bot measures the wait from the server's Date header, which has whole
    # seconds and which uvicorn refreshes once a second, so up to about 2 s late.
    assert state["pause_until"] - reset_at < 4.0
    assert state["positions"][tag] != post
    assert boost_counts(server, [post]) == {post: 0}
    assert bot.stop() == 0


def test_hourly_budget_waits_then_catches_up(
    server: MastodonServer, bot_in_process: Callable[..., Any]
) -> None:
    tag = "budget"
    bot, clock = bot_in_process(HASHTAGS=[tag], MAX_ACTIONS_PER_HOUR=2, **NO_PACING)
    bot.catch_up(tag, "catch-up")
    started = clock.now
    ids = [
        server.post(user, f"Post by {user} #budget")["id"]
        for user in ("alice", "bob", "carol")
    ]

    with pytest.raises(hashtag_bot.Paused):
        bot.catch_up(tag, "catch-up")
    counts_in_first_hour = boost_counts(server, ids)
    pause_until = bot.state.pause_until
    position = bot.state.positions[tag]
    clock.now = pause_until
    handled_after_the_hour = bot.catch_up(tag, "catch-up")

    assert counts_in_first_hour == {ids[0]: 1, ids[1]: 1, ids[2]: 0}
    assert pause_until == pytest.approx(started + 3600.0)
    assert position == ids[1]
    assert handled_after_the_hour == 1
    assert boost_counts(server, ids) == dict.fromkeys(ids, 1)


# --- server errors -----------------------------------------------------------------


@pytest.mark.parametrize(("status", "count"), [(503, 1), (500, 2)])
def test_reblog_server_error_retried(
    server: MastodonServer,
    bot_files: Callable[..., Any],
    start_bot: Callable[..., Any],
    status: int,
    count: int,
) -> None:
    tag = "retried"
    files = bot_files(HASHTAGS=[tag], **NO_PACING)
    bot = start_watching(start_bot, server, files, tag)
    server.fault(path_regex=REBLOG_PATH, status=status, count=count)
    post = server.post("alice", "Unlucky #retried")["id"]
    wait_for_boosts(bot, server, [post])

    assert boost_counts(server, [post]) == {post: 1}
    assert len(re.findall(rf"HTTP {status} .*; retry \d of 3", bot.log_text())) == count


def test_reblog_server_errors_beyond_retries_skipped(
    server: MastodonServer, bot_in_process: Callable[..., Any]
) -> None:
    tag = "outage5xx"
    bot, _clock = bot_in_process(HASHTAGS=[tag], **NO_PACING)
    bot.catch_up(tag, "catch-up")
    failing = server.post("alice", "During a 502 storm #outage5xx")["id"]

    # A 5xx through every retry is the server's response for this post: it is
    # skipped with a warning, and the position moves past it.
    server.fault(path_regex=REBLOG_PATH, status=502, count=hashtag_bot.RETRY_ATTEMPTS)
    bot.catch_up(tag, "catch-up")
    later = server.post("bob", "After the storm #outage5xx")["id"]
    bot.catch_up(tag, "catch-up")

    assert boost_counts(server, [failing, later]) == {failing: 0, later: 1}
    assert bot.stats["failed"] == 1


# --- chaos ---------------------------------------------------------------------------

CHAOS_SEED = 20241204
CHAOS_POSTS_PER_ACCOUNT = 75
# Minimum seconds between two faults of one kind on the reblog endpoint. After
# a 5xx the bot tries a request at most RETRY_ATTEMPTS times within about 7 s
# (backoff of at most 1, 2 and 4 s). A 5xx fault comes at most once in that
# time, so that no post runs out of retries. Each 429 pauses all actions for 1
# to 3 s.
REBLOG_FAULT_SPACING_SECONDS = {"ratelimit": 8.0, "500": 8.0, "503": 8.0}


class FaultInjector:
    """A thread that breaks the stream proxy and the reblog endpoint at random.

    Every fault is short: a cut or reset of the open connections, a stall of up
    to 2 s, or one 429 (reset 1 s ahead), 500 or 503 on the next boost. A fault
    on the reblog endpoint is only added when none is pending, and no more often
    than REBLOG_FAULT_SPACING_SECONDS allows.
    """

    KINDS = ("cut", "reset", "stall", "ratelimit", "500", "503")

    def __init__(self, server: MastodonServer, proxy: TcpProxy, seed: int) -> None:
        self.server = server
        self.proxy = proxy
        self.rng = random.Random(seed)
        self.done = threading.Event()
        self.injected: Counter = Counter()
        self.broken_connections = 0
        self.errors: list[BaseException] = []
        self.last_reblog_fault_at: dict[str, float] = {}
        self.thread = threading.Thread(target=self.run, name="faults", daemon=True)

    def run(self) -> None:
        """Inject every kind once per round, in a random order, until done."""
        try:
            while not self.done.is_set():
                kinds = list(self.KINDS)
                self.rng.shuffle(kinds)
                for kind in kinds:
                    if self.done.wait(self.rng.uniform(0.3, 1.0)):
                        return
                    self.inject(kind)
        except Exception as error:  # noqa: BLE001 - reported by the test
            self.errors.append(error)
        finally:
            self.proxy.stall(False)

    def inject(self, kind: str) -> None:
        if kind in ("cut", "reset"):
            self.broken_connections += self.proxy.cut(reset=kind == "reset")
        elif kind == "stall":
            self.proxy.stall(True)
            self.done.wait(self.rng.uniform(0.5, 2.0))
            self.proxy.stall(False)
        elif not self.add_reblog_fault(kind):
            return
        self.injected[kind] += 1

    def add_reblog_fault(self, kind: str) -> bool:
        """Add a 429, 500 or 503 for the next boost, unless it is too soon.

        Returns True if it added the fault.
        """
        since_last = time.monotonic() - self.last_reblog_fault_at.get(kind, -1e9)
        if since_last < REBLOG_FAULT_SPACING_SECONDS[kind]:
            return False
        if self.server.request("GET", "/api/v1/_mock/faults").json():
            return False
        if kind == "ratelimit":
            self.server.fault(
                path_regex=REBLOG_PATH,
                type="ratelimit",
                headers={"X-RateLimit-Reset": iso_8601(time.time() + 1.0)},
                count=1,
            )
        else:
            self.server.fault(path_regex=REBLOG_PATH, status=int(kind), count=1)
        self.last_reblog_fault_at[kind] = time.monotonic()
        return True


class Publisher:
    """A thread that publishes tagged posts as one account at random intervals."""

    def __init__(
        self, server: MastodonServer, username: str, count: int, seed: int
    ) -> None:
        self.server = server
        self.username = username
        self.count = count
        self.rng = random.Random(seed)
        self.ids: list[str] = []
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self.run, name=username, daemon=True)

    def run(self) -> None:
        try:
            for number in range(self.count):
                time.sleep(self.rng.uniform(0.06, 0.2))
                text = f"Chaos {number} by {self.username} #chaos"
                self.ids.append(self.server.post(self.username, text)["id"])
        except Exception as error:  # noqa: BLE001 - reported by the test
            self.errors.append(error)


def test_chaos_every_post_boosted_once(
    server: MastodonServer,
    stream_proxy: TcpProxy,
    bot_files: Callable[..., Any],
    start_bot: Callable[..., Any],
) -> None:
    tag = "chaos"
    files = bot_files(
        HASHTAGS=[tag],
        ACTION_DELAY_SECONDS=0,
        USER_COOLDOWN_SECONDS=0,
        MAX_ACTIONS_PER_HOUR=100000,
        STREAM_TIMEOUT_SECONDS=1,
        RECONCILE_SECONDS=2,
        POLL_SECONDS=1,
        CATCH_UP_MAX=1000,
    )
    bot = start_watching(start_bot, server, files, tag)
    faults = FaultInjector(server, stream_proxy, CHAOS_SEED)
    publishers = [
        Publisher(server, username, CHAOS_POSTS_PER_ACCOUNT, CHAOS_SEED + number)
        for number, username in enumerate(("alice", "bob"))
    ]
    faults.thread.start()
    try:
        for publisher in publishers:
            publisher.thread.start()
        for publisher in publishers:
            publisher.thread.join(60.0)
    finally:
        faults.done.set()
        faults.thread.join(10.0)
    server.clear_faults()

    ids = [status_id for p in publishers for status_id in p.ids]
    wait_for_boosts(bot, server, ids, timeout=30.0)
    # One more post gives a repeated boost of an earlier post time to show.
    marker = server.post("carol", "After the chaos #chaos")["id"]
    wait_for_boosts(bot, server, [marker])

    counts = boost_counts(server, ids)
    # Only the stream goes through the proxy, so every boost request gets its
    # response and no boost may repeat, not even the one in flight at a fault.
    not_once = {status_id: n for status_id, n in counts.items() if n != 1}
    assert [p.errors for p in publishers] == [[], []]
    assert faults.errors == []
    assert len(ids) == 2 * CHAOS_POSTS_PER_ACCOUNT
    assert set(faults.injected) == set(FaultInjector.KINDS)
    assert faults.broken_connections > 0
    assert not_once == {}
