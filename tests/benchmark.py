#!/usr/bin/env python3
"""Measure the hashtag bot's throughput, decision time, memory and idle CPU.

Run it from the repository, with the packages of requirements-dev.txt::

    python tests/benchmark.py              # full run, a few minutes
    python tests/benchmark.py --quick      # smaller counts, under a minute
    python tests/benchmark.py --markdown   # also print the rows for BENCHMARKS.md

It measures, on this machine:

1. events per second that a bare Mastodon.py ``StreamListener`` and the bot's
   ``HashtagListener`` (dry run) read from a hashtag stream, which a local
   server-sent events server in a child process sends. Also the share of the
   reading thread's CPU time that the bot's ``on_update`` takes;
2. the time ``HashtagBot.handle_post`` takes per post (p50, p99), on status
   dicts, and its CPU time in the stream, on Mastodon.py ``Status`` objects;
3. the resident memory (RSS) of a process that feeds 1,000 and then 1,000,000
   posts from 100,000 authors to ``handle_post``, with a fake clock;
4. the CPU the bot process uses while its stream only carries heartbeats;
5. the seconds from starting the bot process to its stream being open.

Every server here listens on 127.0.0.1 only and stops when its measurement
ends. This is a script, not a pytest module: its name does not match
``test_*.py`` and it defines no ``test_`` functions.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import hashlib
import importlib.metadata
import json
import logging
import multiprocessing
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from mastodon import Mastodon, StreamListener

REPO_ROOT = Path(__file__).resolve().parent.parent
BOT_SCRIPT = REPO_ROOT / "hashtag_bot.py"
# The script runs as ``python tests/benchmark.py``, so sys.path starts with
# tests/; the bot lives one level up.
sys.path.insert(0, str(REPO_ROOT))
import hashtag_bot  # noqa: E402

HOST = "127.0.0.1"
TAG = "benchmark"
TOKEN = "benchmark-token"
INSTANCE_DOMAIN = "social.example"
# Accounts of this domain are in DENY_ACCOUNTS, so their posts are skipped.
DENIED_DOMAIN = "spam.example"
FIRST_STATUS_ID = 113_000_000_000_000_000
# The instance of the bots fed by handle_post directly: in a dry run a decision
# makes no request, so nothing ever connects to it.
UNUSED_BASE_URL = "http://127.0.0.1:9"

# The targets of the measurements, explained in BENCHMARKS.md.
TARGET_THROUGHPUT_RATIO = 0.9
TARGET_DECISION_P99_MS = 0.5
TARGET_RSS_MB = 50.0
TARGET_RSS_GROWTH_MB = 5.0
TARGET_IDLE_CPU_PERCENT = 0.5

# Full and --quick sizes of each measurement.
FULL_SIZES = {
    "events": 600,
    "repeats": 5,
    "decisions": 100_000,
    "posts": 1_000_000,
    "idle": 60.0,
}
QUICK_SIZES = {
    "events": 200,
    "repeats": 2,
    "decisions": 10_000,
    "posts": 100_000,
    "idle": 15.0,
}
STARTUP_RUNS = 3
MEMORY_AUTHORS = 100_000
MEMORY_FIRST_CHECKPOINT = 1000
MEMORY_TIMEOUT_SECONDS = 3600.0
DECISION_AUTHORS = 10_000
# Fake seconds between two posts: one every 0.5 to 1 s is a busy hashtag.
FAKE_SECONDS_BETWEEN_POSTS = (0.5, 1.0)

HEARTBEAT_SECONDS = 15.0  # what Mastodon's streaming server sends
STREAM_READ_TIMEOUT_SECONDS = 60.0
# Any stream of the benchmark server ends after this, even when it is not stopped.
STREAM_MAX_SECONDS = 600.0
# The server sends the stream to the socket in slices of this many bytes.
SEND_SLICE_BYTES = 64 * 1024
GIT_TIMEOUT_SECONDS = 10.0
SERVER_START_TIMEOUT_SECONDS = 10.0
SERVER_STOP_TIMEOUT_SECONDS = 5.0
BOT_START_TIMEOUT_SECONDS = 30.0
BOT_STOP_TIMEOUT_SECONDS = 10.0
LOG_POLL_SECONDS = 0.01
# After the stream opens the bot catches up once, so the idle window starts later.
IDLE_SETTLE_SECONDS = 2.0

# How often each kind of post occurs in the mix, per 100 posts.
POST_MIX = {
    "passes the rules": 86,
    "author is a bot": 4,
    "author opted out in bio": 3,
    "more than MAX_HASHTAGS": 3,
    "author in DENY_ACCOUNTS": 2,
    "same author again (cooldown)": 2,
}


# --- Realistic statuses ----------------------------------------------------------

AVATAR_URL = "https://files.example/avatars/original/5f1c0d2b.png"
HEADER_URL = "https://files.example/headers/original/a3b2c1d0.jpg"
BIO_HTML = (
    "<p>Backend developer. I write about "
    '<a href="https://social.example/tags/python" class="mention hashtag" '
    'rel="tag">#<span>python</span></a> and databases.</p>'
)
OPT_OUT_BIO_HTML = BIO_HTML.replace(
    "and databases.",
    'and databases. No bots: <a href="https://social.example/tags/nobot" '
    'class="mention hashtag" rel="tag">#<span>nobot</span></a>',
)
CONTENT_HTML = (
    "<p>Our test suite went from 9 to 2 minutes: one shared server, no sleeps.</p>"
    '<p><a href="https://social.example/tags/benchmark" class="mention hashtag" '
    'rel="tag">#<span>benchmark</span></a> '
    '<a href="https://social.example/tags/python" class="mention hashtag" '
    'rel="tag">#<span>python</span></a></p>'
)


def make_tag(name: str) -> dict[str, str]:
    return {"name": name, "url": f"https://{INSTANCE_DOMAIN}/tags/{name}"}


ACCOUNT_TEMPLATE: dict[str, Any] = {
    "id": "",
    "username": "",
    "acct": "",
    "display_name": "Ada Example :python:",
    "locked": False,
    "bot": False,
    "discoverable": True,
    "indexable": True,
    "group": False,
    "created_at": "2022-11-06T00:00:00.000Z",
    "note": BIO_HTML,
    "url": "",
    "uri": "",
    "avatar": AVATAR_URL,
    "avatar_static": AVATAR_URL,
    "header": HEADER_URL,
    "header_static": HEADER_URL,
    "followers_count": 321,
    "following_count": 210,
    "statuses_count": 1234,
    "last_status_at": "2024-11-05",
    "hide_collections": False,
    "emojis": [
        {
            "shortcode": "python",
            "url": "https://files.example/custom_emojis/original/python.png",
            "static_url": "https://files.example/custom_emojis/static/python.png",
            "visible_in_picker": True,
        }
    ],
    "roles": [],
    "fields": [
        {
            "name": "Website",
            "value": '<a href="https://ada.example" target="_blank" '
            'rel="nofollow noopener me">ada.example</a>',
            "verified_at": "2024-01-01T00:00:00.000+00:00",
        },
    ],
}

STATUS_TEMPLATE: dict[str, Any] = {
    "id": "",
    "created_at": "2024-11-05T10:12:33.000Z",
    "in_reply_to_id": None,
    "in_reply_to_account_id": None,
    "sensitive": False,
    "spoiler_text": "",
    "visibility": "public",
    "language": "en",
    "uri": "",
    "url": "",
    "replies_count": 0,
    "reblogs_count": 0,
    "favourites_count": 0,
    "edited_at": None,
    "content": CONTENT_HTML,
    "filtered": [],
    "reblog": None,
    "account": ACCOUNT_TEMPLATE,
    "media_attachments": [],
    "mentions": [],
    "tags": [make_tag(TAG), make_tag("python")],
    "emojis": [],
    "card": None,
    "poll": None,
}

SPAM_TAGS = [make_tag(TAG)] + [make_tag(f"giveaway{n}") for n in range(9)]


class StatusFactory:
    """Builds Mastodon 4.x shaped statuses (about 2.2 KB of JSON) in the POST_MIX.

    Each status is a shallow copy of a template with a new id and author, so a
    million of them can be made in seconds. The kinds repeat in a shuffled
    cycle of 100, and authors are drawn at random from ``authors`` accounts.
    """

    def __init__(self, authors: int, seed: int = 1):
        self.authors = authors
        self.random = random.Random(seed)
        cycle = [kind for kind, count in POST_MIX.items() for _ in range(count)]
        self.random.shuffle(cycle)
        self.cycle = cycle
        self.previous_author = 0
        self.bot_account = dict(ACCOUNT_TEMPLATE, bot=True)
        self.opt_out_account = dict(ACCOUNT_TEMPLATE, note=OPT_OUT_BIO_HTML)

    def make(self, number: int) -> dict[str, Any]:
        """Return the status with index ``number``. Ids grow with the index."""
        kind = self.cycle[number % len(self.cycle)]
        if kind == "same author again (cooldown)":
            author = self.previous_author
        else:
            author = self.random.randrange(self.authors)
        self.previous_author = author

        template = ACCOUNT_TEMPLATE
        if kind == "author is a bot":
            template = self.bot_account
        elif kind == "author opted out in bio":
            template = self.opt_out_account
        domain = "remote.example"
        if kind == "author in DENY_ACCOUNTS":
            domain = DENIED_DOMAIN
        username = f"user{author}"
        profile = f"https://{domain}/@{username}"
        account = dict(
            template,
            id=str(100_000 + author),
            username=username,
            acct=f"{username}@{domain}",
            url=profile,
            uri=f"https://{domain}/users/{username}",
        )

        status_id = str(FIRST_STATUS_ID + number)
        status = dict(
            STATUS_TEMPLATE,
            id=status_id,
            uri=f"https://{domain}/users/{username}/statuses/{status_id}",
            url=f"{profile}/{status_id}",
            account=account,
        )
        if kind == "more than MAX_HASHTAGS":
            status["tags"] = SPAM_TAGS
        return status


def encode_event(status: dict[str, Any]) -> bytes:
    """Return one ``update`` event, framed like Mastodon's streaming server."""
    data = json.dumps(status, separators=(",", ":"))
    return f"event: update\ndata: {data}\n\n".encode()


def encode_chunk(data: bytes) -> bytes:
    """Return ``data`` as one HTTP/1.1 chunk, as Node.js writes each event."""
    return b"%x\r\n%s\r\n" % (len(data), data)


# --- A local Mastodon-like server --------------------------------------------------


def rest_responses(base_url: str) -> dict[str, Any]:
    """Return the minimal JSON of each REST endpoint the bot reads at start."""
    host = urlsplit(base_url).netloc
    feeds = {"local": "public", "remote": "public"}
    bot_account = dict(
        ACCOUNT_TEMPLATE,
        id="1",
        username="hashbot",
        acct="hashbot",
        bot=True,
        url=f"https://{INSTANCE_DOMAIN}/@hashbot",
        note="<p>I boost #benchmark posts. Put #nobot in your bio to opt out.</p>",
        source={"privacy": "public", "sensitive": False, "language": "en"},
    )
    return {
        "/api/v1/accounts/verify_credentials": bot_account,
        "/api/v1/apps/verify_credentials": {
            "name": "hashtag bot benchmark",
            "website": None,
            "scopes": ["read", "write"],
        },
        "/api/v1/blocks": [],
        "/api/v1/mutes": [],
        "/api/v1/domain_blocks": [],
        "/api/v1/instance": {
            "uri": INSTANCE_DOMAIN,
            "title": "Benchmark",
            "version": "4.3.0",
            "urls": {"streaming_api": f"ws://{host}"},
        },
        "/api/v2/instance": {
            "domain": INSTANCE_DOMAIN,
            "title": "Benchmark",
            "version": "4.3.0",
            "configuration": {
                "urls": {"streaming": f"ws://{host}"},
                "timelines_access": {
                    "live_feeds": feeds,
                    "hashtag_feeds": feeds,
                    "trending_link_feeds": feeds,
                },
            },
        },
    }


class BenchmarkServer(ThreadingHTTPServer):
    """A Mastodon-like HTTP server on 127.0.0.1, run in a thread.

    It serves the few REST endpoints the bot reads at start (empty block lists,
    an empty tag timeline) and the hashtag stream. A stream sends ``:)``, then
    ``stream_events`` as fast as the client reads them. With
    ``heartbeat_seconds`` None the stream then ends. Otherwise it sends
    ``:thump`` at that interval until the server stops, for at most
    STREAM_MAX_SECONDS.
    """

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__((HOST, 0), BenchmarkHandler)
        self.stopping = threading.Event()
        self.stream_events: list[bytes] = []
        self.heartbeat_seconds: float | None = None
        self.heartbeats_sent = 0
        self.responses = rest_responses(self.base_url)
        self.thread = threading.Thread(
            target=self.serve_forever, name="benchmark-server", daemon=True
        )

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.server_address[1]}"

    def __enter__(self) -> BenchmarkServer:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopping.set()
        self.shutdown()
        self.server_close()
        self.thread.join(SERVER_STOP_TIMEOUT_SECONDS)


class BenchmarkHandler(BaseHTTPRequestHandler):
    """Handles one connection to a BenchmarkServer."""

    protocol_version = "HTTP/1.1"
    # Without TCP_NODELAY, a body sent after its headers waits for the client's
    # delayed ACK, which adds about 40 ms to every REST response on Linux.
    disable_nagle_algorithm = True
    server: BenchmarkServer

    def log_message(self, format: str, *args: Any) -> None:
        """Keep the benchmark's output readable: no access log."""

    def do_GET(self) -> None:
        # Mastodon.py 2.3.3 requests /api/v2/instance/ with a trailing slash.
        path = urlsplit(self.path).path.rstrip("/")
        if path == "/api/v1/streaming/hashtag":
            self.send_stream()
        elif path.startswith("/api/v1/timelines/tag/"):
            self.send_json([])
        elif path in self.server.responses:
            self.send_json(self.server.responses[path])
        else:
            self.send_json({"error": "Record not found"}, status=404)

    def send_json(self, data: Any, status: int = 200) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_stream(self) -> None:
        server = self.server
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "private, no-store")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        # One chunk per event, as Mastodon sends them. The events are encoded
        # before the stream starts, so this thread takes little CPU from the client.
        payload = memoryview(
            encode_chunk(b":)\n")
            + b"".join(encode_chunk(event) for event in server.stream_events)
        )
        try:
            for start in range(0, len(payload), SEND_SLICE_BYTES):
                self.wfile.write(payload[start : start + SEND_SLICE_BYTES])
            deadline = time.monotonic() + STREAM_MAX_SECONDS
            interval = server.heartbeat_seconds
            while interval is not None and time.monotonic() < deadline:
                if server.stopping.wait(interval):
                    return
                self.wfile.write(encode_chunk(b":thump\n"))
                server.heartbeats_sent += 1
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            return


def serve_in_child(events: list[bytes], connection: Connection) -> None:
    """Run a BenchmarkServer that streams ``events``, in a child process.

    Sends the server's port through ``connection``, then serves until the
    parent sends a message or closes its end.
    """
    with BenchmarkServer() as server:
        server.stream_events = events
        connection.send(server.server_address[1])
        with contextlib.suppress(EOFError):
            connection.recv()


class ServerProcess:
    """A BenchmarkServer in a child process, for the stream throughput runs.

    In a thread of the benchmark process, the server would compete with the
    reading thread for the GIL and delay it by up to the 5 ms switch interval.
    A real instance is another machine, so the server gets a process of its own.
    """

    def __init__(self, events: list[bytes]):
        self.connection, child_end = multiprocessing.Pipe()
        self.process = multiprocessing.Process(
            target=serve_in_child, args=(events, child_end), daemon=True
        )
        self.base_url = ""

    def __enter__(self) -> ServerProcess:
        self.process.start()
        if not self.connection.poll(SERVER_START_TIMEOUT_SECONDS):
            self.__exit__()
            raise RuntimeError(
                f"the benchmark server process did not start within "
                f"{SERVER_START_TIMEOUT_SECONDS:g} s"
            )
        self.base_url = f"http://{HOST}:{self.connection.recv()}"
        return self

    def __exit__(self, *exc_info: object) -> None:
        with contextlib.suppress(OSError):
            self.connection.send("stop")
        self.process.join(SERVER_STOP_TIMEOUT_SECONDS)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(SERVER_STOP_TIMEOUT_SECONDS)


# --- Measurements ------------------------------------------------------------------


@dataclass
class Row:
    """One line of the results table."""

    measure: str
    target: str
    value: str
    verdict: str


def write_bot_files(directory: Path, base_url: str) -> tuple[Path, Path]:
    """Write the config.py and .env of a benchmark bot and return their paths."""
    config = directory / "config.py"
    config.write_text(
        "# Written by tests/benchmark.py.\n"
        f"HASHTAGS = [{TAG!r}]\n"
        "DRY_RUN = True\n"
        "ACTION_DELAY_SECONDS = 0\n"
        f"DENY_ACCOUNTS = ['@{DENIED_DOMAIN}']\n"
        f"STATE_FILE = {str(directory / 'state.json')!r}\n",
        encoding="utf-8",
    )
    env = directory / ".env"
    env.write_text(
        f"MASTODON_API_BASE_URL={base_url}\nMASTODON_ACCESS_TOKEN={TOKEN}\n",
        encoding="utf-8",
    )
    return config, env


class FakeClock:
    """A clock in Unix seconds that moves only when ``advance`` is called."""

    def __init__(self) -> None:
        self.now = 1_730_800_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class DiscardingStream:
    """A text stream that drops what is written to it."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def make_bot(
    directory: Path, base_url: str, clock: Callable[[], float] = time.time
) -> hashtag_bot.HashtagBot:
    """Return a dry-run HashtagBot as ``start()`` would leave it, without REST calls.

    Logging is set up as ``main()`` does without ``-v``: INFO, so one line per
    post acted on is formatted, but the line is then dropped, not written.
    """
    config, _env = write_bot_files(directory, base_url)
    settings = hashtag_bot.load_settings(config, {})
    bot = hashtag_bot.HashtagBot(
        settings, hashtag_bot.Credentials(base_url, TOKEN), clock=clock
    )
    bot.me = {
        "id": "1",
        "acct": "hashbot",
        "domain": INSTANCE_DOMAIN,
        "blocked_ids": set(),
        "blocked_domains": set(),
    }
    hashtag_bot.configure_logging(verbose=False)
    handler = hashtag_bot.log.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(DiscardingStream())
    return bot


class CountingListener(StreamListener):
    """A bare listener: counts the posts and does nothing else with them."""

    def __init__(self) -> None:
        super().__init__()
        self.updates = 0

    def on_update(self, status):
        self.updates += 1


class TimedHashtagListener(hashtag_bot.HashtagListener):
    """The bot's listener, which also measures the CPU time of each ``on_update``.

    ``on_update`` is where the bot decides on each post. Mastodon.py parses each
    event before it calls it, so the rest of the thread's CPU time is mostly
    the parsing that a bare listener pays too. The catch-up when the stream
    opens (one REST request, in ``handle_heartbeat``) is not counted.
    CPU time leaves out the time other processes hold the core, which on a
    busy machine would dominate the slowest calls.
    """

    def __init__(self, watcher: hashtag_bot.TagWatcher):
        super().__init__(watcher)
        self.decision_cpu_ms: list[float] = []

    def on_update(self, status):
        start = time.thread_time()
        try:
            super().on_update(status)
        finally:
            self.decision_cpu_ms.append(1000 * (time.thread_time() - start))


@dataclass
class StreamRun:
    """One read of the stream to its end: posts handled, wall and CPU seconds.

    ``decision_cpu_ms`` is the CPU time of each call of the bot's ``on_update``,
    empty for the bare listener.
    """

    events: int
    wall_seconds: float
    cpu_seconds: float
    decision_cpu_ms: list[float] = field(default_factory=list)

    @property
    def events_per_second(self) -> float:
        return self.events / self.wall_seconds

    @property
    def cpu_ms_per_event(self) -> float:
        return 1000 * self.cpu_seconds / self.events


class StreamSummary:
    """The best wall-clock rate and the lowest CPU per event of several runs.

    Other processes on the machine only ever slow a run down, so the best run
    is the closest to what the code itself costs. The share of the CPU time
    spent in the bot's ``on_update`` is taken over all runs.
    """

    def __init__(self, runs: list[StreamRun]):
        cpu_ms = [run.cpu_ms_per_event for run in runs]
        self.per_second = max(run.events_per_second for run in runs)
        self.cpu_ms_per_event = min(cpu_ms)
        self.worst_cpu_ms_per_event = max(cpu_ms)
        self.per_cpu_second = 1000 / self.cpu_ms_per_event
        decision_ms = sum(sum(run.decision_cpu_ms) for run in runs)
        self.decision_share = decision_ms / (1000 * sum(r.cpu_seconds for r in runs))
        self.decision_ms_per_event = self.decision_share * statistics.mean(cpu_ms)

    def describe(self) -> str:
        return (
            f"{self.per_second:.0f}/s by wall clock, {self.per_cpu_second:.0f} per "
            f"CPU second ({self.cpu_ms_per_event:.2f} ms CPU per event, "
            f"{self.worst_cpu_ms_per_event:.2f} ms in the slowest run)"
        )


def read_stream(client: Mastodon, listener: StreamListener) -> tuple[float, float]:
    """Read the server's hashtag stream to its end and return wall and CPU seconds.

    The CPU time is this thread's alone.
    """
    wall_start = time.perf_counter()
    cpu_start = time.thread_time()
    client.stream_hashtag(TAG, listener, timeout=STREAM_READ_TIMEOUT_SECONDS)
    return time.perf_counter() - wall_start, time.thread_time() - cpu_start


def read_bare_stream(base_url: str) -> StreamRun:
    client = Mastodon(
        access_token=TOKEN, api_base_url=base_url, version_check_mode="none"
    )
    listener = CountingListener()
    wall, cpu = read_stream(client, listener)
    return StreamRun(listener.updates, wall, cpu)


def read_bot_stream(base_url: str, directory: Path) -> StreamRun:
    """Read the stream with a fresh bot's HashtagListener, as its TagWatcher does."""
    bot = make_bot(directory, base_url)
    watcher = hashtag_bot.TagWatcher(bot, TAG)
    watcher.client = bot.make_client()
    listener = TimedHashtagListener(watcher)
    wall, cpu = read_stream(watcher.client, listener)
    return StreamRun(bot.stats["seen"], wall, cpu, listener.decision_cpu_ms)


def measure_streams(
    event_count: int, repeats: int, work_dir: Path
) -> tuple[list[StreamRun], list[StreamRun]]:
    """Return the runs of a bare listener and of the bot's, which take turns.

    Taking turns spreads any load from other processes over both listeners.
    """
    factory = StatusFactory(DECISION_AUTHORS, seed=2)
    events = [encode_event(factory.make(n)) for n in range(event_count)]
    print(
        f"  {event_count} events of {statistics.mean(map(len, events)):.0f} bytes "
        f"on average, {repeats} runs per listener"
    )
    bare_runs, bot_runs = [], []
    with ServerProcess(events) as server:
        for repeat in range(repeats):
            bare_runs.append(read_bare_stream(server.base_url))
            directory = work_dir / f"stream{repeat}"
            directory.mkdir()
            bot_runs.append(read_bot_stream(server.base_url, directory))
    for run in bare_runs + bot_runs:
        if run.events != event_count:
            raise RuntimeError(
                f"the stream delivered {run.events} of {event_count} events"
            )
    return bare_runs, bot_runs


def measure_decisions(count: int, work_dir: Path) -> list[float]:
    """Return the time of each ``handle_post`` call, in milliseconds."""
    clock = FakeClock()
    bot = make_bot(work_dir, UNUSED_BASE_URL, clock)
    factory = StatusFactory(DECISION_AUTHORS, seed=3)
    low, high = FAKE_SECONDS_BETWEEN_POSTS
    times = []
    for number in range(count):
        status = factory.make(number)
        clock.advance(factory.random.uniform(low, high))
        start = time.perf_counter_ns()
        bot.handle_post(status, TAG, "stream")
        times.append((time.perf_counter_ns() - start) / 1e6)
    skipped = bot.stats["skipped"]
    print(
        f"  {count} posts: {bot.stats['acted']} acted on in dry run, {skipped} "
        "skipped: "
        + ", ".join(f"{reason} {n}" for reason, n in bot.skip_reasons.most_common())
    )
    return times


def rss_mb() -> float:
    """Return this process's resident memory (VmRSS) in MB."""
    return read_status_mb(Path("/proc/self/status"), "VmRSS")


def read_status_mb(path: Path, key: str) -> float:
    """Return a value such as VmRSS from a /proc/PID/status file, in MB.

    The file gives it in "kB", which are KiB (1024 bytes).
    """
    for line in path.read_text(encoding="ascii").splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError(f"{key} not found in {path}")


def run_memory_child(posts: int) -> dict[str, Any]:
    """Feed ``posts`` posts to a fresh bot in this process and return the figures.

    Runs in a child process, so the RSS is the bot's and this driver's alone.
    """
    with tempfile.TemporaryDirectory(prefix="bot-benchmark-") as directory:
        clock = FakeClock()
        bot = make_bot(Path(directory), UNUSED_BASE_URL, clock)
        factory = StatusFactory(MEMORY_AUTHORS, seed=4)
        low, high = FAKE_SECONDS_BETWEEN_POSTS
        result: dict[str, Any] = {"rss_before_mb": rss_mb()}
        fake_start = clock()
        wall_start = time.perf_counter()
        for number in range(posts):
            clock.advance(factory.random.uniform(low, high))
            bot.handle_post(factory.make(number), TAG, "stream")
            if number + 1 == MEMORY_FIRST_CHECKPOINT:
                result["rss_first_mb"] = rss_mb()
        result["seconds"] = time.perf_counter() - wall_start
        result["rss_last_mb"] = rss_mb()
        gc.collect()
        result["rss_last_after_gc_mb"] = rss_mb()
        result["peak_rss_mb"] = read_status_mb(Path("/proc/self/status"), "VmHWM")
        result["fake_days"] = (clock() - fake_start) / 86400
        result["authors_in_cooldown"] = len(bot.state.authors)
        result["handled_ids"] = len(bot.handled)
        result["acted_ids"] = len(bot.state.acted)
        result["acted"] = bot.stats["acted"]
    return result


def measure_memory(posts: int) -> dict[str, Any]:
    """Run the memory measurement in a fresh Python process and return its figures."""
    completed = subprocess.run(
        [sys.executable, __file__, "--memory-child", str(posts)],
        capture_output=True,
        text=True,
        check=False,
        timeout=MEMORY_TIMEOUT_SECONDS,
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"the memory measurement failed with exit status "
            f"{completed.returncode}:\n{completed.stderr}"
        )
    return json.loads(completed.stdout)


class BotProcess:
    """``hashtag_bot.py --config ... --env-file ...`` run as a subprocess.

    Use it in a with block: ``start()`` starts the process, and the end of the
    block stops it (SIGTERM, then SIGKILL after BOT_STOP_TIMEOUT_SECONDS).
    """

    def __init__(self, directory: Path, base_url: str):
        self.directory = directory
        config, env = write_bot_files(directory, base_url)
        self.log_path = directory / "stderr.log"
        self.command = [
            sys.executable,
            str(BOT_SCRIPT),
            "--config",
            str(config),
            "--env-file",
            str(env),
        ]
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> BotProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(BOT_STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(BOT_STOP_TIMEOUT_SECONDS)

    def start(self) -> None:
        environment = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("MASTODON_")
        }
        with open(self.log_path, "wb") as stderr:
            self.process = subprocess.Popen(
                self.command,
                cwd=self.directory,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def wait_for_log(self, pattern: str, timeout: float) -> None:
        """Wait until stderr matches ``pattern``.

        Raises RuntimeError when the bot exits first or ``timeout`` runs out.
        """
        assert self.process is not None
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while not regex.search(self.log_path.read_text(errors="replace")):
            if self.process.poll() is not None or time.monotonic() > deadline:
                log_tail = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(
                    f"the bot did not log {pattern!r} within {timeout:g} s "
                    f"(exit status {self.process.poll()}); its stderr:\n{log_tail}"
                )
            time.sleep(LOG_POLL_SECONDS)

    def cpu_seconds(self) -> float:
        """Return the process's user plus system CPU time from /proc/PID/stat."""
        text = Path(f"/proc/{self.pid}/stat").read_text(encoding="ascii")
        # The command name is in brackets and may contain spaces, so split after
        # it. Index 0 is then field 3 (state), so utime (14) and stime (15) follow.
        fields = text.rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        return read_status_mb(Path(f"/proc/{self.pid}/status"), "VmRSS")


def start_and_wait_connected(bot: BotProcess) -> float:
    """Start the bot process; return the seconds until its stream was open."""
    started = time.perf_counter()
    bot.start()
    bot.wait_for_log(rf"#{TAG}: stream connected", BOT_START_TIMEOUT_SECONDS)
    return time.perf_counter() - started


def measure_process(
    idle_seconds: float, startup_runs: int, work_dir: Path
) -> dict[str, Any]:
    """Measure the bot process: start-up time to an open stream, then idle CPU.

    The first run also measures the idle window, while its stream is the only
    one open, so every heartbeat the server counts went to that bot.
    """
    result: dict[str, Any] = {"startup_seconds": []}
    with BenchmarkServer() as server:
        server.heartbeat_seconds = HEARTBEAT_SECONDS
        for run in range(startup_runs):
            directory = work_dir / f"bot{run}"
            directory.mkdir()
            with BotProcess(directory, server.base_url) as bot:
                result["startup_seconds"].append(start_and_wait_connected(bot))
                if run > 0:
                    continue
                time.sleep(IDLE_SETTLE_SECONDS)
                heartbeats_before = server.heartbeats_sent
                cpu_before = bot.cpu_seconds()
                time.sleep(idle_seconds)
                cpu_after = bot.cpu_seconds()
                result["idle_cpu_seconds"] = cpu_after - cpu_before
                result["idle_heartbeats"] = server.heartbeats_sent - heartbeats_before
                result["idle_rss_mb"] = bot.rss_mb()
                log_lines = bot.log_path.read_text(errors="replace").splitlines()
                result["bot_problems"] = [
                    line
                    for line in log_lines
                    if " WARNING " in line or " ERROR " in line
                ]
    return result


# --- Report ------------------------------------------------------------------------


def verdict(met: bool, gap: str) -> str:
    return "met" if met else f"NOT met ({gap})"


def bot_version() -> tuple[str, str]:
    """Return the SHA-256 of hashtag_bot.py and a description with its commit."""
    digest = hashlib.sha256(BOT_SCRIPT.read_bytes()).hexdigest()[:12]
    git = ["git", "-C", str(REPO_ROOT)]
    try:
        # Name the last commit that changed the file rather than HEAD, because
        # later commits of other files do not change what is measured.
        commit = subprocess.run(
            [*git, "log", "-1", "--format=%h", "--", BOT_SCRIPT.name],
            capture_output=True,
            text=True,
            check=True,
            timeout=GIT_TIMEOUT_SECONDS,
        ).stdout.strip()
        changes = subprocess.run(
            [*git, "status", "--porcelain", "--", BOT_SCRIPT.name],
            capture_output=True,
            text=True,
            check=True,
            timeout=GIT_TIMEOUT_SECONDS,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return digest, f"hashtag_bot.py sha256 {digest}"
    if changes or not commit:
        return digest, f"hashtag_bot.py sha256 {digest}, not committed"
    return digest, f"hashtag_bot.py sha256 {digest}, as in commit {commit}"


def load_average() -> str:
    """Return the 1-minute load average, because other work skews the timings."""
    return f"{os.getloadavg()[0]:.2f}"


def read_field(path: str, key: str, separator: str) -> str | None:
    """Return the value of ``key`` in a file of ``key<separator>value`` lines."""
    with contextlib.suppress(OSError):
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            name, _, value = line.partition(separator)
            if name.strip() == key:
                return value.strip().strip('"')
    return None


def machine_description() -> dict[str, str]:
    """Return the CPU, Python, Mastodon.py and OS this run measured."""
    # A Raspberry Pi's kernel names the board in "Model", such as "Raspberry
    # Pi 4 Model B Rev 1.2". An x86 kernel names the CPU in "model name".
    cpu = (
        read_field("/proc/cpuinfo", "Model", ":")
        or read_field("/proc/cpuinfo", "model name", ":")
        or "unknown CPU"
    )
    megahertz = read_field("/proc/cpuinfo", "cpu MHz", ":")
    if megahertz:
        cpu += f" at {float(megahertz):.0f} MHz"
    flags = read_field("/proc/cpuinfo", "flags", ":") or ""
    if "hypervisor" in flags.split():
        cpu += ", virtual machine"
    os_name = read_field("/etc/os-release", "PRETTY_NAME", "=") or platform.system()
    return {
        "CPU": f"{cpu}, {os.cpu_count()} cores ({platform.machine()})",
        "Python": platform.python_version(),
        # Python 3.9 finds the distribution by its normalised name only.
        "Mastodon.py": importlib.metadata.version("mastodon-py"),
        "OS": f"{os_name}, kernel {platform.release()}",
    }


def decision_row(measure: str, times_ms: list[float]) -> Row:
    centiles = statistics.quantiles(times_ms, n=100)
    p50, p99 = centiles[49], centiles[98]
    return Row(
        measure,
        f"p99 < {TARGET_DECISION_P99_MS} ms",
        f"p50 {p50:.3f} ms, p99 {p99:.3f} ms, max {max(times_ms):.2f} ms",
        verdict(
            p99 < TARGET_DECISION_P99_MS, f"{p99 - TARGET_DECISION_P99_MS:.3f} ms over"
        ),
    )


def build_rows(
    streams: tuple[list[StreamRun], list[StreamRun]] | None,
    decisions: list[float] | None,
    memory: dict[str, Any] | None,
    process: dict[str, Any] | None,
    idle_seconds: float,
) -> list[Row]:
    rows = []
    if streams:
        bare_runs, bot_runs = streams
        bare, with_bot = StreamSummary(bare_runs), StreamSummary(bot_runs)
        cpu_ratio = with_bot.per_cpu_second / bare.per_cpu_second
        wall_ratio = with_bot.per_second / bare.per_second
        share_ratio = 1 - with_bot.decision_share
        runs = f"best of {len(bare_runs)} runs of {bare_runs[0].events} events"
        rows += [
            Row(
                f"Stream events/s, bare Mastodon.py listener ({runs})",
                "(reference)",
                bare.describe(),
                "",
            ),
            Row(
                f"Stream events/s, bot's HashtagListener, dry run ({runs})",
                "(reference)",
                with_bot.describe(),
                "",
            ),
            Row(
                "Stream throughput, bot / bare, from the CPU share of the bot's "
                "on_update",
                f">= {TARGET_THROUGHPUT_RATIO}",
                f"{share_ratio:.3f} (on_update {with_bot.decision_ms_per_event:.3f} "
                "ms per event)",
                verdict(share_ratio >= TARGET_THROUGHPUT_RATIO, f"{share_ratio:.3f}"),
            ),
            Row(
                "Stream throughput, bot / bare, best runs compared",
                "(reference)",
                f"{cpu_ratio:.2f} per CPU second, {wall_ratio:.2f} by wall clock",
                "",
            ),
        ]
    if decisions:
        rows.append(
            decision_row(
                f"Decision time per post, handle_post on dicts, {len(decisions):,} "
                "posts",
                decisions,
            )
        )
    if streams:
        in_stream = [ms for run in streams[1] for ms in run.decision_cpu_ms]
        rows.append(
            decision_row(
                f"Decision CPU time per post in the stream, on_update on "
                f"Mastodon.py Status objects, {len(in_stream):,} posts",
                in_stream,
            )
        )
    if memory:
        first, last = memory["rss_first_mb"], memory["rss_last_mb"]
        growth = last - first
        rows += [
            Row(
                f"RSS after {MEMORY_FIRST_CHECKPOINT:,} posts",
                f"< {TARGET_RSS_MB:.0f} MB",
                f"{first:.1f} MB",
                verdict(first < TARGET_RSS_MB, f"{first - TARGET_RSS_MB:.1f} MB over"),
            ),
            Row(
                f"RSS after {memory['posts']:,} posts "
                f"({MEMORY_AUTHORS:,} authors, {memory['fake_days']:.1f} fake days)",
                f"< {TARGET_RSS_MB:.0f} MB, growth < {TARGET_RSS_GROWTH_MB:.0f} MB",
                f"{last:.1f} MB (growth {growth:+.1f} MB)",
                verdict(
                    last < TARGET_RSS_MB and growth < TARGET_RSS_GROWTH_MB,
                    f"{growth:+.1f} MB growth",
                ),
            ),
        ]
    if process:
        idle_percent = 100 * process["idle_cpu_seconds"] / idle_seconds
        startup = process["startup_seconds"]
        rows += [
            Row(
                f"Bot process CPU, {idle_seconds:.0f} s idle "
                f"(heartbeats sent: {process['idle_heartbeats']})",
                f"< {TARGET_IDLE_CPU_PERCENT}% of a core",
                f"{idle_percent:.2f}% ({process['idle_cpu_seconds']:.2f} s CPU), "
                f"RSS {process['idle_rss_mb']:.1f} MB",
                verdict(idle_percent < TARGET_IDLE_CPU_PERCENT, f"{idle_percent:.2f}%"),
            ),
            Row(
                f"Process start to stream open ({len(startup)} runs)",
                "(reference)",
                f"median {statistics.median(startup):.2f} s, max {max(startup):.2f} s",
                "",
            ),
        ]
    return rows


def print_table(rows: list[Row]) -> None:
    headers = Row("Measure", "Target", "Measured", "Verdict")
    widths = [
        max(len(getattr(row, name)) for row in [headers, *rows])
        for name in ("measure", "target", "value", "verdict")
    ]
    for row in [headers, *rows]:
        cells = (row.measure, row.target, row.value, row.verdict)
        print("  ".join(cell.ljust(width) for cell, width in zip(cells, widths)))


def print_markdown(rows: list[Row], facts: dict[str, str], command: str) -> None:
    print("| Measure | Target | Measured | Verdict |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row.measure} | {row.target} | {row.value} | {row.verdict} |")
    print()
    for name, value in facts.items():
        print(f"- {name}: {value}")
    print(f"- Date: {datetime.date.today().isoformat()}")
    print(f"- Command: `{command}`")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure the hashtag bot's throughput, decision time, memory "
        "and idle CPU against a local server on 127.0.0.1."
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller counts and a 15 s idle window, for a run under a minute",
    )
    parser.add_argument(
        "--markdown", action="store_true", help="also print the BENCHMARKS.md rows"
    )
    parser.add_argument("--events", type=int, help="stream events per run")
    parser.add_argument("--repeats", type=int, help="stream runs per listener")
    parser.add_argument("--decisions", type=int, help="posts timed in handle_post")
    parser.add_argument("--posts", type=int, help="posts fed for the memory figure")
    parser.add_argument(
        "--idle-seconds", type=float, help="length of the idle CPU window in seconds"
    )
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=("stream", "decisions", "memory", "process"),
        help="leave out a measurement (repeatable)",
    )
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_child is not None:
        result = run_memory_child(args.memory_child)
        result["posts"] = args.memory_child
        print(json.dumps(result))
        return 0

    sizes = dict(QUICK_SIZES if args.quick else FULL_SIZES)
    for name in ("events", "repeats", "decisions", "posts"):
        if getattr(args, name) is not None:
            sizes[name] = getattr(args, name)
    if args.idle_seconds is not None:
        sizes["idle"] = args.idle_seconds
    minimums = {
        "events": 1,
        "repeats": 1,
        "decisions": 2,
        "posts": MEMORY_FIRST_CHECKPOINT,
        "idle": 1,
    }
    for name, minimum in minimums.items():
        if sizes[name] < minimum:
            option = "--idle-seconds" if name == "idle" else f"--{name}"
            print(
                f"invalid {option} {sizes[name]:g}: use {minimum} or more",
                file=sys.stderr,
            )
            return 2

    run_start = time.perf_counter()
    load_before = load_average()
    digest_before, version = bot_version()
    streams = decisions = memory = process = None
    with tempfile.TemporaryDirectory(prefix="bot-benchmark-") as directory:
        work_dir = Path(directory)
        if "stream" not in args.skip:
            print("1. Stream throughput")
            (work_dir / "stream").mkdir()
            streams = measure_streams(
                sizes["events"], sizes["repeats"], work_dir / "stream"
            )
        if "decisions" not in args.skip:
            print("2. Decision time")
            (work_dir / "decisions").mkdir()
            decisions = measure_decisions(sizes["decisions"], work_dir / "decisions")
        if "memory" not in args.skip:
            print(f"3. Memory: {sizes['posts']:,} posts in a child process")
            memory = measure_memory(sizes["posts"])
            print(
                f"  {memory['seconds']:.0f} s; at the end "
                f"{memory['authors_in_cooldown']} authors in cooldown, "
                f"{memory['handled_ids']} handled ids, {memory['acted_ids']} "
                f"acted-on ids; RSS before the first post "
                f"{memory['rss_before_mb']:.1f} MB, after gc "
                f"{memory['rss_last_after_gc_mb']:.1f} MB, peak "
                f"{memory['peak_rss_mb']:.1f} MB"
            )
        if "process" not in args.skip:
            print(
                f"4-5. Bot process: {STARTUP_RUNS} starts, then "
                f"{sizes['idle']:.0f} s with heartbeats only"
            )
            process = measure_process(sizes["idle"], STARTUP_RUNS, work_dir)
            for line in process["bot_problems"]:
                print(f"  the bot logged: {line}")
        rows = build_rows(streams, decisions, memory, process, sizes["idle"])

    run_seconds = time.perf_counter() - run_start
    notes = {
        "Bot": version,
        "Run time": f"{run_seconds:.0f} s",
        "Load average (1 min) before and after": f"{load_before}, {load_average()}",
    }
    digest_after, version_after = bot_version()
    if digest_after != digest_before:
        notes["Bot at the end of the run"] = version_after
        print(
            "warning: hashtag_bot.py changed during the run, so the measurements "
            "may mix two versions; run the benchmark again",
            file=sys.stderr,
        )
    print()
    print_table(rows)
    print()
    for name, value in notes.items():
        print(f"{name}: {value}")
    if args.markdown:
        print()
        command = " ".join(["python", "tests/benchmark.py", *(argv or sys.argv[1:])])
        print_markdown(rows, {**machine_description(), **notes}, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
