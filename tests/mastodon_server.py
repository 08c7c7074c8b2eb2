"""A local Mastodon test server: mastodon-mock 0.6.1 corrected to behave like Mastodon.

It runs the mock's ASGI app under uvicorn in a thread, on 127.0.0.1 and a port the
OS picks, with :mod:`mastodon_middleware` installed. Compared with the bare mock:

* bios and profile field values are HTML with Mastodon's hashtag links;
* statuses carry ``filtered`` results for the token's account, on REST and on
  hashtag streams, from all of its unexpired keyword filters;
* ``/api/v2/instance`` reports ``configuration.timelines_access``;
* ``/api/v1/apps/verify_credentials`` works with the seeded tokens, and REST calls
  outside a token's scopes return 403;
* hashtags are normalised (NFKC, lower case, accents folded), also after an edit,
  which reaches the new tags' streams as ``status.update``;
* only public posts reach hashtag streams, and hashtag streams need a valid token;
* the advertised streaming URL can point elsewhere, such as at a TCP proxy.

It also records every boost, favourite, bookmark and reply per post, lets a test
put arbitrary events on a hashtag stream, and keeps the mock's fault injection.

Example::

    with MastodonServer() as server:
        status = server.post("alice", "Hello #python")
        server.client("hashbot").status_reblog(status["id"])
        assert server.action_counts("reblog") == {status["id"]: 1}
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any, Callable

import requests
import uvicorn
from mastodon import Mastodon
from mastodon_middleware import (
    HASHTAG_FEED_ACCESS_VALUES,
    ActionRecord,
    MastodonEventBus,
    MastodonLikeMiddleware,
    RawData,
    ReplyRecord,
    ServerState,
    StreamInfo,
    retag_status,
)
from mastodon_mock.app import create_app
from mastodon_mock.config import (
    DatabaseConfig,
    MastodonMockConfig,
    SeedAccount,
    SeedConfig,
    SeedFollow,
    StreamingConfig,
)
from mastodon_mock.db.models import Account, OAuthToken, Status
from mastodon_mock.streaming import Event, hashtag_channel
from mastodon_rules import normalize_stream_hashtag
from sqlalchemy import select
from starlette.middleware import Middleware

logger = logging.getLogger(__name__)

TEST_APP_NAME = "hashtag bot tests"
HOST = "127.0.0.1"
HTTP_TIMEOUT_SECONDS = 10.0

# The tokens are obviously fake strings; they only work against this server.
DEFAULT_ACCOUNTS: list[SeedAccount] = [
    SeedAccount(
        username="hashbot",
        display_name="Hashtag Bot",
        note="I boost posts tagged #python.\n\nPut #nobot in your bio to opt out.",
        bot=True,
        access_token="hashbot_token",
    ),
    SeedAccount(username="alice", display_name="Alice", access_token="alice_token"),
    SeedAccount(username="bob", display_name="Bob", access_token="bob_token"),
    SeedAccount(username="carol", display_name="Carol", access_token="carol_token"),
    SeedAccount(
        username="robo",
        display_name="Another Bot",
        note="Automated posts about #python.",
        bot=True,
        access_token="robo_token",
    ),
    SeedAccount(
        username="optout",
        display_name="Opted Out",
        note="Writes about #python. Please no boosts: #NoBot",
        access_token="optout_token",
    ),
    # "#NöBot" normalises to "nobot": NFKC, lower case, then ö folds to o.
    SeedAccount(
        username="optoutaccent",
        display_name="Opted Out Too",
        note="Bitte keine Bots. #NöBot",
        access_token="optoutaccent_token",
    ),
    # A remote account: no token, as on Mastodon. server.post() still works for
    # it (see MastodonServer.token).
    SeedAccount(username="dave", display_name="Dave", domain="remote.example"),
]


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str | None = None,
) -> Any:
    """Call ``predicate`` until it returns a true value, and return that value.

    Raises AssertionError after ``timeout`` seconds. The error names ``message``
    (or the predicate), so the failure shows what never happened.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            what = message or getattr(predicate, "__name__", repr(predicate))
            raise AssertionError(f"timed out after {timeout:g} s waiting for: {what}")
        time.sleep(interval)


class FaultHandle:
    """A fault rule on the mock; ``delete()`` or the end of a with block removes it."""

    def __init__(self, base_url: str, rule_id: str) -> None:
        self._base_url = base_url
        self.id = rule_id

    def __enter__(self) -> FaultHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.delete()

    def delete(self) -> None:
        """Remove the rule; removing it twice is harmless."""
        requests.delete(
            f"{self._base_url}/api/v1/_mock/faults/{self.id}",
            timeout=HTTP_TIMEOUT_SECONDS,
        )


class MastodonServer:
    """A started-on-demand Mastodon-like server on 127.0.0.1; see the module docs.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        *,
        accounts: Sequence[SeedAccount] | None = None,
        extra_accounts: Iterable[SeedAccount] = (),
        follows: Iterable[SeedFollow] = (),
        heartbeat_seconds: float | None = 0.2,
        default_scopes: Sequence[str] = ("read", "write"),
        hashtag_feeds: str = "public",
        streaming_url: str | None = None,
        startup_timeout: float = 10.0,
        shutdown_timeout: float = 5.0,
    ) -> None:
        """Configure the server; nothing runs until :meth:`start`.

        ``accounts`` replaces :data:`DEFAULT_ACCOUNTS`; ``extra_accounts`` adds to
        them. ``heartbeat_seconds`` is the hashtag streams' heartbeat interval
        (Mastodon sends one every 15 s); None sends none. ``default_scopes`` are
        the scopes of every seeded token.
        """
        base = list(DEFAULT_ACCOUNTS if accounts is None else accounts)
        self._seed = SeedConfig(
            accounts=base + list(extra_accounts), follows=list(follows)
        )
        self._default_scopes = list(default_scopes)
        self._startup_timeout = startup_timeout
        self._shutdown_timeout = shutdown_timeout
        self._settings = {
            "heartbeat_seconds": heartbeat_seconds,
            "hashtag_feeds": hashtag_feeds,
            "streaming_url": streaming_url,
        }
        self._state = ServerState(
            heartbeat_seconds=heartbeat_seconds,
            app_name=TEST_APP_NAME,
            streaming_url=streaming_url,
        )
        self.hashtag_feeds = hashtag_feeds

        self._app: Any = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None
        self._tokens = self._seed_tokens()

    def _seed_tokens(self) -> dict[str, str | None]:
        return {a.username: a.access_token for a in self._seed.accounts}

    # --- lifecycle --------------------------------------------------------

    def start(self) -> MastodonServer:
        """Start uvicorn in a daemon thread and wait until it accepts requests."""
        if self._server is not None:
            return self

        heartbeat = self._state.heartbeat_seconds
        config = MastodonMockConfig(
            database=DatabaseConfig(path=":memory:"),
            seed=self._seed,
            # The mock's own streams need a number; the hashtag streams use
            # ServerState.heartbeat_seconds instead.
            streaming=StreamingConfig(heartbeat_seconds=heartbeat or 15.0),
        )
        app = create_app(config)
        app.state.event_bus = MastodonEventBus(
            app.state, queue_maxsize=config.streaming.queue_maxsize
        )
        # Appended last, so it runs innermost: inside the mock's fault middleware.
        app.user_middleware.append(
            Middleware(
                MastodonLikeMiddleware, server_state=self._state, app_state=app.state
            )
        )
        self._app = app
        self._prepare_database()

        server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=HOST,
                port=0,
                log_level="warning",
                access_log=False,
                # Bounds stop() when a client keeps a connection open.
                timeout_graceful_shutdown=2,
            )
        )
        thread = threading.Thread(
            target=server.run, name="mastodon-server", daemon=True
        )
        thread.start()
        deadline = time.monotonic() + self._startup_timeout
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the test server thread exited during startup")
            if time.monotonic() > deadline:
                server.should_exit = True
                thread.join(self._shutdown_timeout)
                raise TimeoutError(
                    f"the test server did not start within {self._startup_timeout:g} s"
                )
            time.sleep(0.01)

        # Port 0 lets the OS choose; read the bound port back from the socket.
        self._port = server.servers[0].sockets[0].getsockname()[1]
        self._server = server
        self._thread = thread
        return self

    def stop(self) -> None:
        """End the hashtag streams, stop uvicorn and join its thread."""
        if self._server is None:
            return
        self._state.close_streams()
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(self._shutdown_timeout)
            if self._thread.is_alive():
                logger.warning(
                    "test server thread still running %g s after stop; "
                    "it is a daemon thread and ends with the test process",
                    self._shutdown_timeout,
                )
        self._server = None
        self._thread = None
        self._port = None

    def reset(self) -> None:
        """Return the running server to the state :meth:`start` left it in.

        It closes the hashtag streams, rebuilds the database from the seed, removes
        the fault rules, clears the recorded actions and restores the constructor's
        settings. It is much faster than a new server, because FastAPI prepares
        all of an app's routes on its first request, and the mock has about 300.
        """
        self.close_streams()
        wait_until(
            lambda: not self.open_streams(), 5.0, message="hashtag streams to close"
        )
        self._checked("POST", "/api/v1/_mock/reset")
        self._prepare_database()
        self._state.clear_records()
        self._state.streams_silenced = False
        self.heartbeat_seconds = self._settings["heartbeat_seconds"]
        self.hashtag_feeds = self._settings["hashtag_feeds"]
        self.streaming_url = self._settings["streaming_url"]
        self._tokens = self._seed_tokens()

    def __enter__(self) -> MastodonServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _prepare_database(self) -> None:
        with self._app.state.session_factory() as session:
            for token in session.scalars(select(OAuthToken)).all():
                token.scopes = list(self._default_scopes)
            # Seeded posts skip the event bus, so normalise their tags here.
            for status in session.scalars(select(Status)).all():
                if status.reblog_of_id is None:
                    retag_status(session, status)
            session.commit()

    # --- addresses and settings -------------------------------------------

    @property
    def port(self) -> int:
        """The bound port; raises RuntimeError before :meth:`start`."""
        if self._port is None:
            raise RuntimeError("the test server is not started; call start() first")
        return self._port

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{HOST}:{self.port}"

    @property
    def domain(self) -> str:
        """The instance's own domain, used in post, profile and tag URLs."""
        return self._config.domain

    @property
    def _config(self) -> MastodonMockConfig:
        return self._app.state.config

    @property
    def streaming_url(self) -> str | None:
        """Streaming base URL the instance endpoints advertise; None means this server.

        Give an ``http://`` URL (such as a proxy's); the server advertises it as
        ``ws://``, as Mastodon does, and Mastodon.py turns it back into HTTP.
        """
        return self._state.streaming_url

    @streaming_url.setter
    def streaming_url(self, url: str | None) -> None:
        self._state.streaming_url = url

    @property
    def hashtag_feeds(self) -> str:
        """Hashtag feed access: "public", "authenticated" or "disabled".

        "disabled" empties the tag timeline and makes hashtag streams send only
        heartbeats; "authenticated" makes the tag timeline need a token.
        """
        return self._state.hashtag_feeds

    @hashtag_feeds.setter
    def hashtag_feeds(self, value: str) -> None:
        if value not in HASHTAG_FEED_ACCESS_VALUES:
            allowed = ", ".join(HASHTAG_FEED_ACCESS_VALUES)
            raise ValueError(f"invalid hashtag_feeds {value!r}; use one of: {allowed}")
        self._state.hashtag_feeds = value

    @property
    def heartbeat_seconds(self) -> float | None:
        """Heartbeat interval of the hashtag streams; a change applies at once."""
        return self._state.heartbeat_seconds

    @heartbeat_seconds.setter
    def heartbeat_seconds(self, seconds: float | None) -> None:
        self._state.heartbeat_seconds = seconds

    def silence_streams(self, silenced: bool = True) -> None:
        """Keep hashtag streams open with heartbeats but deliver no posts.

        This is how Mastodon's streaming server can fail after its Redis restarts.
        Injected events (:meth:`publish_raw`) still go through.
        """
        self._state.streams_silenced = silenced

    # --- accounts and tokens ------------------------------------------------

    def token(self, username: str) -> str:
        """Return the access token of a seeded account.

        An account seeded without a token (a remote one) gets a server-side token
        on first use, so tests can post as it; Mastodon has no such token.
        """
        token = self._tokens.get(username)
        if token:
            return token
        with self._app.state.session_factory() as session:
            account = self._account(session, username)
            token = f"server_side_token_for_{username}"
            session.add(
                OAuthToken(
                    access_token=token,
                    account_id=account.id,
                    scopes=list(self._default_scopes),
                )
            )
            session.commit()
        self._tokens[username] = token
        return token

    def account_id(self, username: str) -> str:
        """Return the account id of a seeded account."""
        with self._app.state.session_factory() as session:
            return str(self._account(session, username).id)

    @staticmethod
    def _account(session: Any, username: str) -> Account:
        account = session.scalar(select(Account).where(Account.username == username))
        if account is None:
            raise LookupError(f"no account named {username!r} is seeded")
        return account

    def set_scopes(self, username: str, scopes: Sequence[str]) -> None:
        """Give the account's token these OAuth scopes.

        ``/api/v1/apps/verify_credentials`` reports them, and REST calls outside
        them return 403.
        """
        token = self.token(username)
        with self._app.state.session_factory() as session:
            row = session.scalar(
                select(OAuthToken).where(OAuthToken.access_token == token)
            )
            row.scopes = list(scopes)
            session.commit()

    def set_profile(
        self,
        username: str,
        *,
        note: str | None = None,
        fields: Sequence[Sequence[str]] | None = None,
        bot: bool | None = None,
        display_name: str | None = None,
        silenced: bool | None = None,
    ) -> None:
        """Change an account's profile; ``fields`` is a list of (name, value) pairs.

        Give the bio and field values as plain text; the server renders them as
        Mastodon HTML. ``silenced`` makes the account limited.
        """
        with self._app.state.session_factory() as session:
            account = self._account(session, username)
            if note is not None:
                account.note = note
            if fields is not None:
                account.fields = [
                    {"name": name, "value": value, "verified_at": None}
                    for name, value in fields
                ]
            if bot is not None:
                account.bot = bot
            if display_name is not None:
                account.display_name = display_name
            if silenced is not None:
                account.silenced = silenced
            session.commit()

    def client(self, username: str, **kwargs: Any) -> Mastodon:
        """Return a Mastodon.py client logged in as ``username``.

        Defaults: no version check, a 10 s request timeout and
        ``ratelimit_method="throw"`` (an injected 429 must not make a test sleep);
        ``kwargs`` override them.
        """
        options: dict[str, Any] = {
            "version_check_mode": "none",
            "request_timeout": HTTP_TIMEOUT_SECONDS,
            "ratelimit_method": "throw",
        }
        options.update(kwargs)
        return Mastodon(
            access_token=self.token(username), api_base_url=self.base_url, **options
        )

    # --- REST helpers -------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        username: str | None = None,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> requests.Response:
        """Send a request to this server, as ``username`` if given."""
        all_headers = dict(headers or {})
        if username is not None:
            all_headers["Authorization"] = f"Bearer {self.token(username)}"
        kwargs.setdefault("timeout", HTTP_TIMEOUT_SECONDS)
        return requests.request(
            method, self.base_url + path, headers=all_headers, **kwargs
        )

    def _checked(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.request(method, path, **kwargs)
        if not response.ok:
            raise RuntimeError(
                f"{method} {path} failed with {response.status_code}: {response.text}"
            )
        return response.json()

    def post(
        self,
        username: str,
        text: str,
        *,
        visibility: str = "public",
        in_reply_to_id: str | None = None,
        spoiler_text: str | None = None,
        language: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Post a status as ``username`` and return the status as JSON."""
        body: dict[str, Any] = {"status": text, "visibility": visibility}
        if in_reply_to_id is not None:
            body["in_reply_to_id"] = in_reply_to_id
        if spoiler_text is not None:
            body["spoiler_text"] = spoiler_text
        if language is not None:
            body["language"] = language
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._checked(
            "POST", "/api/v1/statuses", username=username, json=body, headers=headers
        )

    def edit(self, username: str, status_id: str, text: str) -> dict[str, Any]:
        """Edit the text of ``username``'s status and return the new version."""
        return self._checked(
            "PUT",
            f"/api/v1/statuses/{status_id}",
            username=username,
            json={"status": text},
        )

    def delete(self, username: str, status_id: str) -> None:
        """Delete ``username``'s status."""
        self._checked("DELETE", f"/api/v1/statuses/{status_id}", username=username)

    def add_filter(
        self,
        username: str,
        title: str,
        keywords: Sequence[str],
        action: str = "warn",
        *,
        context: Sequence[str] = ("home", "public"),
        whole_word: bool = True,
    ) -> dict[str, Any]:
        """Create a v2 keyword filter for ``username`` and return it."""
        body = {
            "title": title,
            "context": list(context),
            "filter_action": action,
            "keywords_attributes": [
                {"keyword": keyword, "whole_word": whole_word} for keyword in keywords
            ],
        }
        return self._checked("POST", "/api/v2/filters", username=username, json=body)

    # --- faults ---------------------------------------------------------------

    def fault(
        self,
        *,
        path: str | None = None,
        path_regex: str | None = None,
        methods: Sequence[str] | None = None,
        type: str = "status",
        status: int | None = None,
        body: Any = None,
        headers: dict[str, str] | None = None,
        delay_ms: int = 0,
        truncate: bool = True,
        count: int | None = None,
    ) -> FaultHandle:
        """Add a mock fault rule (POST /api/v1/_mock/faults) and return its handle.

        ``type`` is "status", "ratelimit", "latency", "malformed" or "timeout"; a
        "path" may use ``*`` wildcards; ``count`` limits how often the rule fires.
        The arguments mirror mastodon-mock's MockServer.fault.
        """
        effect: dict[str, Any] = {
            "type": type,
            "delay_ms": delay_ms,
            "truncate": truncate,
        }
        if status is not None:
            effect["status"] = status
        if body is not None:
            effect["body"] = body
        if headers is not None:
            effect["headers"] = headers
        rule = {
            "match": {
                "methods": list(methods) if methods else None,
                "path": path,
                "path_regex": path_regex,
            },
            "effect": effect,
            "count": count,
        }
        created = self._checked("POST", "/api/v1/_mock/faults", json=rule)
        return FaultHandle(self.base_url, created["id"])

    def clear_faults(self) -> None:
        """Remove every fault rule."""
        self._checked("DELETE", "/api/v1/_mock/faults")

    # --- what the server saw --------------------------------------------------

    def action_log(self) -> list[ActionRecord]:
        """Return every boost, favourite, bookmark and reply request, in order.

        It includes failed ones (see ``status_code``). Requests that a fault rule
        intercepted never reached the server and are not in it.
        """
        with self._state.lock:
            return list(self._state.actions)

    def action_counts(
        self,
        action: str,
        *,
        username: str | None = None,
        include_replays: bool = True,
    ) -> dict[str, int]:
        """Count successful (2xx) actions per post id.

        ``action`` is "reblog", "favourite", "bookmark" or "reply" (keyed by the
        replied-to post). A repeated boost counts again, although Mastodon only
        returns the first boost for it. ``include_replays=False`` leaves out replies
        that an Idempotency-Key turned into a replay of an earlier one.
        """
        counts: dict[str, int] = {}
        for record in self.action_log():
            if record.action != action or record.status_code not in range(200, 300):
                continue
            if username is not None and record.username != username:
                continue
            if record.replayed and not include_replays:
                continue
            counts[record.post_id] = counts.get(record.post_id, 0) + 1
        return counts

    def replies(self, username: str | None = None) -> list[ReplyRecord]:
        """Return the successful replies (request parameters and the status)."""
        with self._state.lock:
            replies = list(self._state.replies)
        return [r for r in replies if username is None or r.username == username]

    # --- streams ----------------------------------------------------------------

    def open_streams(self, tag: str | None = None) -> list[StreamInfo]:
        """Return the open hashtag streams, for one tag (any spelling) if given."""
        with self._state.lock:
            streams = list(self._state.streams)
        if tag is None:
            return streams
        wanted = {
            hashtag_channel(normalize_stream_hashtag(tag), local=local)
            for local in (False, True)
        }
        return [s for s in streams if s.channel in wanted]

    def wait_for_stream(
        self, tag: str, *, username: str | None = None, timeout: float = 5.0
    ) -> StreamInfo:
        """Wait until a hashtag stream for ``tag`` is open and return it.

        Events published before that are lost, as on Mastodon, so tests wait for
        this before posting.
        """

        def stream_is_open() -> StreamInfo | None:
            for info in self.open_streams(tag):
                if username is None or info.username == username:
                    return info
            return None

        return wait_until(stream_is_open, timeout, message=f"a stream for #{tag}")

    def close_streams(self) -> int:
        """End every hashtag stream cleanly, as a streaming server restart would."""
        return self._state.close_streams()

    def publish_raw(
        self, tag: str, event_name: str, data_text: str, *, local: bool = False
    ) -> int:
        """Send ``event: EVENT_NAME`` and ``data: DATA_TEXT`` on a hashtag stream.

        The text goes out exactly as given: invalid JSON, an empty string, or a
        status Mastodon would never stream. A newline in ``data_text`` ends the
        data line, so a test can also send broken framing. Returns how many open
        streams it was sent to; with none open it is lost, as on Mastodon.
        """
        bus: MastodonEventBus = self._app.state.event_bus
        channel = hashtag_channel(normalize_stream_hashtag(tag), local=local)
        receivers = bus.subscriber_count(channel)
        bus.publish(
            Event(
                name=event_name,
                payload=RawData(data_text),
                channels=frozenset({channel}),
            )
        )
        return receivers
