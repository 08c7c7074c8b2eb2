"""ASGI middleware and event bus that make mastodon-mock 0.6.1 behave like Mastodon.

``MastodonServer`` (``mastodon_server.py``) installs both into the mock's app:

* :class:`MastodonEventBus` replaces the mock's event bus. It re-reads hashtags
  (normalised, also after an edit), routes posts to the public and hashtag channels
  only when Mastodon would, and renames the mock's ``status_update`` event to
  Mastodon's ``status.update``.
* :class:`MastodonLikeMiddleware` sits innermost in the app's middleware stack, so
  the mock's fault rules (``/api/v1/_mock/faults``) apply to everything it serves.
  It serves the hashtag streams and ``/api/v1/apps/verify_credentials`` itself,
  checks OAuth scopes, rewrites JSON responses (profile HTML, ``filtered``,
  instance metadata) and records boosts, favourites, bookmarks and replies.

:class:`ServerState` contains the settings that tests change and the records they
read. The server and the middleware share it across threads.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qs, quote

from mastodon_mock.db.models import (
    Account,
    DomainBlock,
    Filter,
    OAuthToken,
    Relationship,
    Status,
    StatusTag,
)
from mastodon_mock.serializers.misc import serialize_filter_v2
from mastodon_mock.serializers.statuses import serialize_status
from mastodon_mock.streaming import Event, EventBus, hashtag_channel
from mastodon_rules import (
    FilterSpec,
    extract_hashtags,
    filter_results,
    has_scope,
    normalize_hashtag,
    normalize_stream_hashtag,
    render_profile_html,
    required_scopes,
)
from sqlalchemy import or_, select

HASHTAG_FEED_ACCESS_VALUES = ("public", "authenticated", "disabled")

_HASHTAG_STREAM_PATHS = {
    "/api/v1/streaming/hashtag": False,
    "/api/v1/streaming/hashtag/local": True,
}
_TAG_TIMELINE_PATH = re.compile(r"^/api/v1/timelines/tag/(?P<tag>[^/]+)$")
_ACTION_PATH = re.compile(
    r"^/api/v1/statuses/(?P<id>[^/]+)/(?P<action>reblog|favourite|bookmark)$"
)
_SUCCESS_STATUSES = range(200, 300)


# --- state shared with the tests ----------------------------------------------


@dataclass
class ActionRecord:
    """One boost, favourite, bookmark or reply request that reached the server."""

    action: str
    post_id: str
    username: str | None
    status_code: int
    # Only replies can be replays: a POST with an Idempotency-Key seen before.
    replayed: bool = False


@dataclass
class ReplyRecord:
    """One successful ``POST /api/v1/statuses`` with ``in_reply_to_id``."""

    username: str | None
    in_reply_to_id: str
    status_id: str
    params: dict[str, Any]
    status: dict[str, Any]
    idempotency_key: str | None
    replayed: bool


@dataclass
class StreamInfo:
    """One open hashtag stream served by the middleware."""

    tag: str
    channel: str
    username: str | None
    local: bool
    opened_at: float
    loop: Any = field(default=None, repr=False)
    stop_event: Any = field(default=None, repr=False)


class ServerState:
    """Settings that tests change at run time, and what the server records.

    Every attribute is read on the server's event loop thread and written from the
    test thread, so the lists are guarded by a lock.
    """

    def __init__(
        self,
        *,
        heartbeat_seconds: float | None,
        app_name: str,
        hashtag_feeds: str = "public",
        streaming_url: str | None = None,
    ) -> None:
        self.heartbeat_seconds = heartbeat_seconds
        self.app_name = app_name
        self.hashtag_feeds = hashtag_feeds
        self.streaming_url = streaming_url
        # Emulates the failure where Mastodon's streaming server keeps sending
        # heartbeats but no posts (after its Redis restarts).
        self.streams_silenced = False
        self.lock = threading.Lock()
        self.actions: list[ActionRecord] = []
        self.replies: list[ReplyRecord] = []
        self.streams: list[StreamInfo] = []
        self._idempotency: dict[tuple[str | None, str], str] = {}

    def clear_records(self) -> None:
        """Forget the recorded actions and replies."""
        with self.lock:
            self.actions.clear()
            self.replies.clear()
            self._idempotency.clear()

    def record_action(self, record: ActionRecord) -> None:
        with self.lock:
            self.actions.append(record)

    def record_reply(self, reply: ReplyRecord, status_code: int) -> None:
        """Store a reply and its action record, marking a replayed reply."""
        with self.lock:
            if reply.idempotency_key is not None:
                # For a repeated Idempotency-Key the mock returns the first post.
                key = (reply.username, reply.idempotency_key)
                reply.replayed = self._idempotency.get(key) == reply.status_id
                self._idempotency.setdefault(key, reply.status_id)
            self.replies.append(reply)
            self.actions.append(
                ActionRecord(
                    "reply",
                    reply.in_reply_to_id,
                    reply.username,
                    status_code,
                    reply.replayed,
                )
            )

    def add_stream(self, info: StreamInfo) -> None:
        with self.lock:
            self.streams.append(info)

    def remove_stream(self, info: StreamInfo) -> None:
        with self.lock:
            if info in self.streams:
                self.streams.remove(info)

    def close_streams(self) -> int:
        """End every open hashtag stream cleanly; return how many were open."""
        with self.lock:
            streams = list(self.streams)
        for info in streams:
            info.loop.call_soon_threadsafe(info.stop_event.set)
        return len(streams)


# --- database helpers -----------------------------------------------------------


@dataclass
class TokenInfo:
    """The account and scopes behind a bearer token."""

    token: str
    app_id: int | None
    scopes: list[str]
    account_id: int | None
    username: str | None
    domain: str | None


def lookup_token(session_factory: Any, token: str) -> TokenInfo | None:
    """Return the token's details, or None for an unknown token."""
    with session_factory() as session:
        row = session.scalar(select(OAuthToken).where(OAuthToken.access_token == token))
        if row is None:
            return None
        account = session.get(Account, row.account_id) if row.account_id else None
        return TokenInfo(
            token=token,
            app_id=row.app_id,
            scopes=list(row.scopes or []),
            account_id=account.id if account else None,
            username=account.username if account else None,
            domain=account.domain if account else None,
        )


def _aware(moment: datetime | None) -> datetime | None:
    # SQLite returns naive datetimes; the mock stores UTC.
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment


def load_filters(session: Any, account_id: int) -> list[FilterSpec]:
    """Return the v2 filters of an account as :class:`FilterSpec` objects."""
    rows = session.scalars(select(Filter).where(Filter.account_id == account_id)).all()
    specs = []
    for row in rows:
        specs.append(
            FilterSpec(
                id=str(row.id),
                title=row.title,
                context=list(row.context or []),
                filter_action=row.filter_action,
                expires_at=_aware(row.expires_at),
                keywords=[(k.keyword, bool(k.whole_word)) for k in row.keywords],
                status_ids=[str(s.status_id) for s in row.status_filters],
                rest_entity=serialize_filter_v2(row),
            )
        )
    return specs


def is_hidden_from(
    session: Any, viewer: TokenInfo, status: dict[str, Any], *, for_stream: bool
) -> bool:
    """Return whether Mastodon leaves ``status`` out for the viewer.

    Mastodon 4.x drops it when the viewer blocks or mutes the author, the author
    blocks the viewer, or the viewer blocks the author's domain. The streaming
    server (streaming/index.js) also drops it when the viewer blocks or mutes a
    mentioned account; the tag timeline (TagFeed) does not.
    """
    author = status.get("account") or {}
    involved = [int(author["id"])]
    if for_stream:
        involved += [int(m["id"]) for m in status.get("mentions") or []]
    viewer_id = viewer.account_id
    relation = session.scalar(
        select(Relationship.id).where(
            or_(
                (Relationship.source_account_id == viewer_id)
                & Relationship.target_account_id.in_(involved)
                & (Relationship.blocking.is_(True) | Relationship.muting.is_(True)),
                (Relationship.source_account_id == int(author["id"]))
                & (Relationship.target_account_id == viewer_id)
                & Relationship.blocking.is_(True),
            )
        )
    )
    if relation is not None:
        return True
    _, _, domain = str(author.get("acct", "")).partition("@")
    if not domain:
        return False
    blocked = session.scalar(
        select(DomainBlock.id).where(
            DomainBlock.account_id == viewer_id, DomainBlock.domain == domain
        )
    )
    return blocked is not None


def retag_status(session: Any, status: Status) -> list[str]:
    """Replace the status's tags with the normalised hashtags of its text."""
    names = extract_hashtags(status.text or "")
    old_rows = session.scalars(
        select(StatusTag).where(StatusTag.status_id == status.id)
    ).all()
    for row in old_rows:
        session.delete(row)
    for name in names:
        session.add(StatusTag(status_id=status.id, name=name))
    return names


# --- JSON rewriting -----------------------------------------------------------


def _is_account(node: dict[str, Any]) -> bool:
    # StatusMention entities have username and acct too, but no note.
    return "acct" in node and "username" in node and "note" in node


def _is_status(node: dict[str, Any]) -> bool:
    return {"id", "content", "account", "visibility", "filtered"} <= node.keys()


def render_accounts(node: Any, base_url: str) -> None:
    """Render every account's bio and field values in ``node`` as Mastodon HTML.

    An account's ``source`` (``verify_credentials``) keeps the plain text, as on
    Mastodon.
    """
    if isinstance(node, list):
        for item in node:
            render_accounts(item, base_url)
        return
    if not isinstance(node, dict):
        return
    if _is_account(node):
        if isinstance(node.get("note"), str):
            node["note"] = render_profile_html(node["note"], base_url)
        for profile_field in node.get("fields") or []:
            if isinstance(profile_field, dict) and isinstance(
                profile_field.get("value"), str
            ):
                profile_field["value"] = render_profile_html(
                    profile_field["value"], base_url, paragraphs=False
                )
    for key, value in node.items():
        if key != "source":
            render_accounts(value, base_url)


def annotate_statuses(node: Any, filters: list[FilterSpec], now: datetime) -> None:
    """Set ``filtered`` on every status in a REST response, as Mastodon does."""
    if isinstance(node, list):
        for item in node:
            annotate_statuses(item, filters, now)
        return
    if not isinstance(node, dict):
        return
    if _is_status(node):
        node["filtered"] = filter_results(node, filters, now, for_stream=False)
    for value in node.values():
        annotate_statuses(value, filters, now)


def _websocket_url(url: str) -> str:
    # Mastodon advertises the streaming server as ws:// or wss://.
    if url.startswith("https://"):
        return "wss://" + url[len("https://") :]
    if url.startswith("http://"):
        return "ws://" + url[len("http://") :]
    return url


def timelines_access(hashtag_feeds: str) -> dict[str, Any]:
    """Return ``configuration.timelines_access`` of ``/api/v2/instance``.

    Mastodon 4.5+ (REST::InstanceSerializer): trending link feeds follow the same
    "topic feed" settings as hashtag feeds.
    """
    topic = {"local": hashtag_feeds, "remote": hashtag_feeds}
    return {
        "live_feeds": {"local": "public", "remote": "public"},
        "hashtag_feeds": topic,
        "trending_link_feeds": dict(topic),
    }


# --- ASGI helpers -------------------------------------------------------------


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers") or []:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _bearer_token(scope: dict[str, Any]) -> str | None:
    authorization = _header(scope, b"authorization")
    if authorization is None:
        return None
    kind, _, token = authorization.partition(" ")
    if kind.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _query(scope: dict[str, Any]) -> dict[str, list[str]]:
    # Mastodon.py puts the tag into the URL unescaped; requests then sends
    # non-ASCII characters percent-encoded as UTF-8.
    return parse_qs(scope.get("query_string", b"").decode("utf-8", "replace"))


async def _send_json(send: Any, status: int, payload: Any) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _parse_request_params(content_type: str, body: bytes) -> dict[str, Any]:
    if content_type.startswith("application/json"):
        try:
            parsed = json.loads(body or b"{}")
        except ValueError:
            return {}
        return parsed if isinstance(parsed, dict) else {}
    if content_type.startswith("application/x-www-form-urlencoded"):
        pairs = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        return {key: values[-1] for key, values in pairs.items()}
    return {}


# --- event bus ------------------------------------------------------------------


class RawData(str):
    """The data line of an injected event; the stream sends it exactly as given."""


def _is_public_channel(channel: str) -> bool:
    return channel.startswith(("public", "hashtag:"))


class MastodonEventBus(EventBus):
    """The mock's event bus with Mastodon's routing of status events.

    Mastodon 4.x (FanOutOnWriteService) sends a post to the public and hashtag
    streams only if it is public, not a boost, and its author is not limited. An
    edit goes, as ``status.update``, to the streams of the tags the post has after
    the edit. Deletes reach the same streams as the post did.
    """

    def __init__(self, app_state: Any, *, queue_maxsize: int) -> None:
        super().__init__(queue_maxsize=queue_maxsize)
        self._app_state = app_state

    def publish(self, event: Event) -> None:
        if isinstance(event.payload, RawData):
            super().publish(event)
            return
        if event.name in ("update", "status_update") and isinstance(
            event.payload, dict
        ):
            event = self._route_status_event(event)
        elif event.name == "delete":
            event = self._route_delete_event(event)
        super().publish(event)

    def subscriber_count(self, channel: str) -> int:
        """Return how many open streams listen on ``channel``."""
        return sum(1 for sub in tuple(self._subscribers) if sub.channel == channel)

    def _route_status_event(self, event: Event) -> Event:
        config = self._app_state.config
        with self._app_state.session_factory() as session:
            status = session.get(Status, int(event.payload["id"]))
            if status is None:
                return event
            payload = event.payload
            tags: list[str] = []
            if status.reblog_of_id is None:
                tags = retag_status(session, status)
                session.commit()
                payload = serialize_status(session, status, config, None)
            author = session.get(Account, status.account_id)
            is_local = author is not None and author.domain is None
            broadcast = (
                status.visibility == "public"
                and status.reblog_of_id is None
                and author is not None
                and not author.silenced
            )

        channels: set[str] = {c for c in event.channels if not _is_public_channel(c)}
        if broadcast:
            channels.add("public")
            channels.add("public:local" if is_local else "public:remote")
            for name in tags:
                channels.add(hashtag_channel(name))
                if is_local:
                    channels.add(hashtag_channel(name, local=True))
        name = "status.update" if event.name == "status_update" else event.name
        return Event(name=name, payload=payload, channels=frozenset(channels))

    def _route_delete_event(self, event: Event) -> Event:
        with self._app_state.session_factory() as session:
            status = session.get(Status, int(str(event.payload)))
            is_public = status is not None and status.visibility == "public"
        if is_public:
            return event
        channels = frozenset(c for c in event.channels if not _is_public_channel(c))
        return Event(name=event.name, payload=event.payload, channels=channels)


# --- the middleware -------------------------------------------------------------


class MastodonLikeMiddleware:
    """Pure ASGI middleware; see the module docstring for what it changes."""

    def __init__(self, app: Any, *, server_state: ServerState, app_state: Any) -> None:
        self.app = app
        self._state = server_state
        self._app_state = app_state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        method = scope["method"]
        path = scope["path"]
        token = _bearer_token(scope)
        token_info = None
        if token is not None:
            token_info = lookup_token(self._app_state.session_factory, token)

        if method == "GET" and path in _HASHTAG_STREAM_PATHS:
            stream = _HashtagStream(self._state, self._app_state, scope, receive, send)
            await stream.serve(token, token_info, local=_HASHTAG_STREAM_PATHS[path])
            return
        is_app_check = method == "GET" and path == "/api/v1/apps/verify_credentials"
        if is_app_check and (token_info is None or token_info.app_id is None):
            await self._send_app_credentials(send, token_info)
            return

        tag_match = _TAG_TIMELINE_PATH.match(path) if method == "GET" else None
        needed = required_scopes(method, path)
        if tag_match and self._state.hashtag_feeds == "public":
            # Tag timelines need a scope only when the admin restricts them
            # (Mastodon 4.x, Api::V1::Timelines::TagController#require_auth?).
            needed = None
        if (
            token_info is not None
            and needed
            and not has_scope(token_info.scopes, needed)
        ):
            await _send_json(
                send, 403, {"error": "This action is outside the authorized scopes"}
            )
            return

        if tag_match:
            if self._state.hashtag_feeds != "public" and token_info is None:
                await _send_json(send, 401, {"error": "The access token is invalid"})
                return
            if self._state.hashtag_feeds == "disabled":
                await _send_json(send, 200, [])
                return
            scope = self._with_normalised_tag(scope, tag_match.group("tag"))

        await self._forward(scope, receive, send, token_info)

    async def _send_app_credentials(
        self, send: Any, token_info: TokenInfo | None
    ) -> None:
        # The seeded tokens belong to no application in the mock. On Mastodon every
        # user token has one, so return the test application.
        if token_info is None:
            await _send_json(send, 401, {"error": "The access token is invalid"})
            return
        await _send_json(
            send,
            200,
            {
                "id": "1",
                "name": self._state.app_name,
                "website": None,
                "scopes": token_info.scopes,
                "redirect_uri": "urn:ietf:wg:oauth:2.0:oob",
                "redirect_uris": ["urn:ietf:wg:oauth:2.0:oob"],
                "vapid_key": "test-vapid-key",
            },
        )

    @staticmethod
    def _with_normalised_tag(scope: dict[str, Any], raw_tag: str) -> dict[str, Any]:
        # Mastodon looks the tag up by its normalised name (Tag.find_normalized).
        name = normalize_hashtag(raw_tag) or raw_tag
        new_path = f"/api/v1/timelines/tag/{name}"
        new_scope = dict(scope)
        new_scope["path"] = new_path
        new_scope["raw_path"] = f"/api/v1/timelines/tag/{quote(name)}".encode()
        return new_scope

    async def _forward(
        self,
        scope: dict[str, Any],
        receive: Any,
        send: Any,
        token_info: TokenInfo | None,
    ) -> None:
        method = scope["method"]
        path = scope["path"]
        request_body = bytearray()
        is_new_status = method == "POST" and path == "/api/v1/statuses"

        async def receive_and_copy() -> dict[str, Any]:
            message = await receive()
            if is_new_status and message["type"] == "http.request":
                request_body.extend(message.get("body", b""))
            return message

        response = _CapturedResponse(send, rewrite=self._should_rewrite(path))
        app_receive = receive_and_copy if is_new_status else receive
        await self.app(scope, app_receive, response.send)
        if not response.buffering:
            self._record(scope, token_info, response, bytes(request_body))
            return
        document = response.json()
        if document is not None:
            self._rewrite(path, document, token_info)
        # Record before the client gets the response, so that a test checking the
        # records right after its request returns finds this one.
        self._record(scope, token_info, response, bytes(request_body))
        await response.flush(document)

    @staticmethod
    def _should_rewrite(path: str) -> bool:
        return path.startswith("/api/") and not path.startswith("/api/v1/_mock")

    def _rewrite(self, path: str, document: Any, token_info: TokenInfo | None) -> None:
        config = self._app_state.config
        render_accounts(document, config.base_url)
        if token_info is not None and token_info.account_id is not None:
            with self._app_state.session_factory() as session:
                filters = load_filters(session, token_info.account_id)
                if _TAG_TIMELINE_PATH.match(path) and isinstance(document, list):
                    # NOTE: Mastodon leaves these out in SQL, so its pages stay
                    # full. Here a page can be shorter or even empty although
                    # its Link header points at more.
                    document[:] = [
                        status
                        for status in document
                        if not is_hidden_from(
                            session, token_info, status, for_stream=False
                        )
                    ]
            annotate_statuses(document, filters, datetime.now(timezone.utc))

        if not isinstance(document, dict):
            return
        streaming_url = self._state.streaming_url
        if path.rstrip("/") == "/api/v1/instance" and streaming_url is not None:
            urls = document.setdefault("urls", {})
            urls["streaming_api"] = _websocket_url(streaming_url)
        if path.rstrip("/") == "/api/v2/instance":
            configuration = document.setdefault("configuration", {})
            feeds = self._state.hashtag_feeds
            configuration["timelines_access"] = timelines_access(feeds)
            if streaming_url is not None:
                urls = configuration.setdefault("urls", {})
                urls["streaming"] = _websocket_url(streaming_url)

    def _record(
        self,
        scope: dict[str, Any],
        token_info: TokenInfo | None,
        response: _CapturedResponse,
        request_body: bytes,
    ) -> None:
        if scope["method"] != "POST" or response.status_code is None:
            return
        username = token_info.username if token_info else None
        action_match = _ACTION_PATH.match(scope["path"])
        if action_match:
            self._state.record_action(
                ActionRecord(
                    action_match.group("action"),
                    action_match.group("id"),
                    username,
                    response.status_code,
                )
            )
            return

        status = response.document
        is_reply = (
            scope["path"] == "/api/v1/statuses"
            and response.status_code in _SUCCESS_STATUSES
            and isinstance(status, dict)
            and status.get("in_reply_to_id")
        )
        if not is_reply:
            return
        content_type = _header(scope, b"content-type") or ""
        reply = ReplyRecord(
            username=username,
            in_reply_to_id=str(status["in_reply_to_id"]),
            status_id=str(status["id"]),
            params=_parse_request_params(content_type, request_body),
            status=status,
            idempotency_key=_header(scope, b"idempotency-key"),
            replayed=False,
        )
        self._state.record_reply(reply, response.status_code)


class _CapturedResponse:
    """Pass a response through, holding back JSON bodies so they can be rewritten."""

    def __init__(self, send: Any, *, rewrite: bool) -> None:
        self._send = send
        self._rewrite = rewrite
        self._start: dict[str, Any] | None = None
        self._body = bytearray()
        self.buffering = False
        self.status_code: int | None = None
        self.document: Any = None

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status_code = message["status"]
            content_type = b""
            for key, value in message.get("headers") or []:
                if key.lower() == b"content-type":
                    content_type = value
            if self._rewrite and content_type.startswith(b"application/json"):
                self.buffering = True
                self._start = message
                return
        elif message["type"] == "http.response.body" and self.buffering:
            self._body.extend(message.get("body", b""))
            return
        await self._send(message)

    def json(self) -> Any:
        try:
            self.document = json.loads(bytes(self._body))
        except ValueError:
            self.document = None
        return self.document

    async def flush(self, document: Any) -> None:
        """Send the held-back response, re-encoded if ``document`` is not None."""
        assert self._start is not None
        body = bytes(self._body)
        if document is not None:
            body = json.dumps(document, ensure_ascii=False).encode()
        headers = [
            (key, value)
            for key, value in self._start.get("headers") or []
            if key.lower() != b"content-length"
        ]
        headers.append((b"content-length", str(len(body)).encode()))
        await self._send({**self._start, "headers": headers})
        await self._send({"type": "http.response.body", "body": body})


class _HashtagStream:
    """One ``/api/v1/streaming/hashtag`` connection, framed like Mastodon's server.

    Mastodon 4.x (streaming/index.js): a ``:)`` comment first, ``:thump`` comments
    as heartbeats, then ``event:``/``data:`` pairs. Errors are JSON with the
    JavaScript error text, such as ``{"error": "Error: Missing access token"}``.
    """

    def __init__(
        self, state: ServerState, app_state: Any, scope: Any, receive: Any, send: Any
    ) -> None:
        self._state = state
        self._app_state = app_state
        self._scope = scope
        self._receive = receive
        self._send = send

    async def serve(
        self, token: str | None, token_info: TokenInfo | None, *, local: bool
    ) -> None:
        if token is None:
            await _send_json(self._send, 401, {"error": "Error: Missing access token"})
            return
        if token_info is None or token_info.account_id is None:
            await _send_json(self._send, 401, {"error": "Error: Invalid access token"})
            return
        # NOTE: the 4.2-era streaming server (streaming/index.js) checks no scope
        # for hashtag streams, only a valid token. Later releases may differ.
        tag = (_query(self._scope).get("tag") or [""])[0]
        if not tag:
            await _send_json(self._send, 404, {"error": "Not found"})
            return

        channel = hashtag_channel(normalize_stream_hashtag(tag), local=local)
        bus: MastodonEventBus = self._app_state.event_bus
        subscriber = bus.subscribe(channel)
        info = StreamInfo(
            tag=tag,
            channel=channel,
            username=token_info.username,
            local=local,
            opened_at=time.monotonic(),
            loop=asyncio.get_running_loop(),
            stop_event=asyncio.Event(),
        )
        self._state.add_stream(info)
        try:
            await self._send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream"),
                        (b"cache-control", b"no-store"),
                    ],
                }
            )
            await self._write(b":)\n")
            await self._pump(subscriber, info, token_info)
        finally:
            bus.unsubscribe(subscriber)
            self._state.remove_stream(info)

    async def _write(self, data: bytes, *, more_body: bool = True) -> None:
        message = {"type": "http.response.body", "body": data, "more_body": more_body}
        await self._send(message)

    async def _wait_for_disconnect(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                return

    async def _pump(self, subscriber: Any, info: StreamInfo, viewer: TokenInfo) -> None:
        disconnect = asyncio.ensure_future(self._wait_for_disconnect())
        stop = asyncio.ensure_future(info.stop_event.wait())
        next_event: asyncio.Future | None = None
        try:
            while True:
                if next_event is None:
                    next_event = asyncio.ensure_future(subscriber.queue.get())
                done, _ = await asyncio.wait(
                    {next_event, disconnect, stop},
                    timeout=self._state.heartbeat_seconds,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if disconnect in done:
                    return
                if stop in done:
                    # A clean end of the response, as when Mastodon's streaming
                    # server closes the connection.
                    await self._write(b"", more_body=False)
                    return
                if not done:
                    await self._write(b":thump\n")
                    continue
                event = next_event.result()
                next_event = None
                data = self._render(event, viewer)
                if data is not None:
                    await self._write(data)
        except OSError:
            # The client went away while data was being sent.
            return
        finally:
            for task in (disconnect, stop, next_event):
                if task is not None:
                    task.cancel()

    def _render(self, event: Event, viewer: TokenInfo) -> bytes | None:
        payload = event.payload
        if isinstance(payload, RawData):
            return f"event: {event.name}\ndata: {payload}\n\n".encode()
        if self._state.streams_silenced or self._state.hashtag_feeds == "disabled":
            return None

        if event.name in ("update", "status.update") and isinstance(payload, dict):
            with self._app_state.session_factory() as session:
                if is_hidden_from(session, viewer, payload, for_stream=True):
                    return None
                filters = load_filters(session, viewer.account_id)
            payload = copy.deepcopy(payload)
            render_accounts(payload, self._app_state.config.base_url)
            payload["filtered"] = filter_results(
                payload, filters, datetime.now(timezone.utc), for_stream=True
            )

        if isinstance(payload, str):
            data = payload
        else:
            data = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
        return f"event: {event.name}\ndata: {data}\n\n".encode()
