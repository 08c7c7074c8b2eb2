"""Tests of the test tools: each Mastodon behaviour that mastodon_server.py adds to
mastodon-mock, and the TCP proxy.

The tests share one server that is reset before each test (``reused_server``),
which keeps this file fast; each test uses its own hashtags anyway.
"""

from __future__ import annotations

import codecs
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from mastodon import Mastodon, StreamListener
from mastodon.errors import MastodonMalformedEventError, MastodonNetworkError
from mastodon_rules import extract_hashtags, normalize_hashtag, normalize_stream_hashtag
from mastodon_server import MastodonServer, wait_until
from tcp_proxy import TcpProxy

NOBOT_LINK = (
    '<a href="https://mock.local/tags/NoBot" class="mention hashtag" rel="tag">'
    "#<span>NoBot</span></a>"
)


@pytest.fixture
def server(reused_server: MastodonServer) -> MastodonServer:
    """The session's server, reset to its seed (overrides conftest's fresh one)."""
    return reused_server


class SseReader:
    """Reads one hashtag stream's raw lines, to check what goes over the wire."""

    def __init__(
        self,
        base_url: str,
        tag: str | None,
        token: str | None = "hashbot_token",
        *,
        read_timeout: float = 2.0,
        local: bool = False,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        params = {"tag": tag} if tag is not None else {}
        path = (
            "/api/v1/streaming/hashtag/local" if local else "/api/v1/streaming/hashtag"
        )
        self.response = requests.get(
            base_url + path,
            params=params,
            headers=headers,
            stream=True,
            timeout=(2.0, read_timeout),
        )
        self._lines = self._split_lines()

    def _split_lines(self) -> Iterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8")()
        buffer = ""
        for chunk in self.response.iter_content(chunk_size=None):
            buffer += decoder.decode(chunk)
            while "\n" in buffer:
                line, buffer = buffer.split("\n", 1)
                yield line

    def next_line(self) -> str:
        return next(self._lines)

    def next_event(self) -> tuple[str, str]:
        """Return the next (event name, data text), skipping comment lines."""
        name = None
        data: list[str] = []
        for line in self._lines:
            if line.startswith(":"):
                continue
            if line == "" and name is not None:
                return name, "\n".join(data)
            key, _, value = line.partition(": ")
            if key == "event":
                name = value
            elif key == "data":
                data.append(value)
        raise AssertionError("the stream ended before an event arrived")

    def next_status(self) -> tuple[str, dict[str, Any]]:
        name, data = self.next_event()
        return name, json.loads(data)

    def close(self) -> None:
        self.response.close()


@pytest.fixture
def open_sse(server: MastodonServer) -> Iterator[Any]:
    """Return ``open(tag, **options)``, which opens an SseReader on ``server``."""
    readers: list[SseReader] = []

    def open_reader(tag: str | None, **options: Any) -> SseReader:
        reader = SseReader(options.pop("base_url", server.base_url), tag, **options)
        readers.append(reader)
        return reader

    yield open_reader
    for reader in readers:
        reader.close()


class _Recorder(StreamListener):
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def on_any_event(self, name: str, data: Any = None, for_stream: Any = None) -> None:
        self.events.append((name, data))


class MastodonPyStream:
    """Runs Mastodon.py's blocking ``stream_hashtag`` in a thread and records it."""

    def __init__(self, client: Mastodon, tag: str, timeout: float = 5.0) -> None:
        self.listener = _Recorder()
        self.error: BaseException | None = None
        self.returned = False
        self._thread = threading.Thread(
            target=self._run, args=(client, tag, timeout), daemon=True
        )
        self._thread.start()

    def _run(self, client: Mastodon, tag: str, timeout: float) -> None:
        try:
            client.stream_hashtag(tag, self.listener, timeout=timeout)
            self.returned = True
        except Exception as error:  # the test inspects what the stream raised
            self.error = error

    def join(self, timeout: float = 5.0) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "stream_hashtag did not return"


def account_json(server: MastodonServer, username: str, viewer: str = "hashbot") -> Any:
    path = f"/api/v1/accounts/{server.account_id(username)}"
    return server.request("GET", path, username=viewer).json()


def tag_timeline(server: MastodonServer, tag: str, viewer: str = "hashbot") -> Any:
    return server.request("GET", f"/api/v1/timelines/tag/{tag}", username=viewer).json()


# --- hashtag rules --------------------------------------------------------------


def test_normalize_hashtag_folds_accents_and_width() -> None:
    assert normalize_hashtag("NöBot") == "nobot"
    assert normalize_hashtag("Café") == "cafe"
    assert normalize_hashtag("ＰＹＴＨＯＮ") == "python"


def test_normalize_stream_hashtag_drops_marks() -> None:
    # Devanagari vowel signs: kept for posts, dropped by the streaming server.
    assert normalize_hashtag("नमस्ते") == "नमस्ते"
    assert normalize_stream_hashtag("नमस्ते") == "नमसत"


def test_extract_hashtags_follows_mastodon_pattern() -> None:
    text = "#Python rocks, a#b no, (#paren) no, #2024 no, #Café· yes"
    assert extract_hashtags(text) == ["python", "cafe"]


# --- profile HTML ---------------------------------------------------------------


def test_bio_verify_credentials_renders_tag_link(server: MastodonServer) -> None:
    me = server.request(
        "GET", "/api/v1/accounts/verify_credentials", username="optout"
    ).json()
    assert NOBOT_LINK in me["note"]
    assert me["note"].startswith("<p>")
    assert me["source"]["note"] == "Writes about #python. Please no boosts: #NoBot"


def test_bio_account_lookup_renders_accented_tag(server: MastodonServer) -> None:
    note = account_json(server, "optoutaccent")["note"]
    assert 'href="https://mock.local/tags/N%C3%B6Bot"' in note
    assert "#<span>NöBot</span></a>" in note


def test_bio_multiline_uses_paragraphs(server: MastodonServer) -> None:
    note = account_json(server, "hashbot")["note"]
    assert note.count("<p>") == 2


def test_bio_status_account_on_timeline(server: MastodonServer) -> None:
    server.post("optout", "Hello #biotimeline")
    [status] = tag_timeline(server, "biotimeline")
    assert NOBOT_LINK in status["account"]["note"]


def test_bio_status_account_on_stream(server: MastodonServer, open_sse: Any) -> None:
    reader = open_sse("biostream")
    server.post("optout", "Hello #biostream")
    _, status = reader.next_status()
    assert NOBOT_LINK in status["account"]["note"]


def test_profile_field_value_renders_tag_link(server: MastodonServer) -> None:
    server.set_profile("alice", fields=[("Bots", "#NoBot please")])
    [profile_field] = account_json(server, "alice")["fields"]
    assert profile_field["value"] == f"{NOBOT_LINK} please"


# --- filtered -------------------------------------------------------------------


def test_filtered_timeline_lists_keyword_match(server: MastodonServer) -> None:
    server.add_filter("hashbot", "Spoilers", ["spoiler"], "hide")
    server.post("alice", "Huge SPOILER #filterrest")
    [status] = tag_timeline(server, "filterrest")
    [result] = status["filtered"]
    assert result["filter"]["title"] == "Spoilers"
    assert result["filter"]["filter_action"] == "hide"
    assert result["keyword_matches"] == ["SPOILER"]
    assert result["status_matches"] is None


def test_filtered_whole_word_keyword_needs_word(server: MastodonServer) -> None:
    server.add_filter("hashbot", "whole", ["spoiler"], whole_word=True)
    server.add_filter("hashbot", "part", ["spoiler"], whole_word=False)
    server.post("alice", "spoilers ahead #filterword")
    [status] = tag_timeline(server, "filterword")
    titles = [result["filter"]["title"] for result in status["filtered"]]
    assert titles == ["part"]


def test_filtered_ignores_filter_context(server: MastodonServer) -> None:
    # Mastodon annotates with every filter; the client checks the context.
    server.add_filter("hashbot", "home only", ["cats"], context=["home"])
    server.post("alice", "cats #filtercontext")
    [status] = tag_timeline(server, "filtercontext")
    [result] = status["filtered"]
    assert result["filter"]["context"] == ["home"]


def test_filtered_uses_token_account_filters(server: MastodonServer) -> None:
    server.add_filter("alice", "alice's", ["dogs"])
    server.post("bob", "dogs #filterowner")
    [status] = tag_timeline(server, "filterowner")
    assert status["filtered"] == []


def test_filtered_stream_update_has_match(
    server: MastodonServer, open_sse: Any
) -> None:
    server.add_filter("hashbot", "Spoilers", ["spoiler"], "warn")
    reader = open_sse("filterstream")
    server.post("alice", "Spoiler alert #filterstream")
    _, status = reader.next_status()
    [result] = status["filtered"]
    assert set(result["filter"]) == {
        "id",
        "title",
        "context",
        "expires_at",
        "filter_action",
    }
    assert result["keyword_matches"] == ["Spoiler"]
    assert result["status_matches"] is None


# --- instance metadata ------------------------------------------------------------


def test_instance_v2_reports_timelines_access(server: MastodonServer) -> None:
    configuration = server.request("GET", "/api/v2/instance").json()["configuration"]
    access = configuration["timelines_access"]
    assert access["hashtag_feeds"] == {"local": "public", "remote": "public"}
    assert access["live_feeds"] == {"local": "public", "remote": "public"}
    assert access["trending_link_feeds"] == {"local": "public", "remote": "public"}


def test_hashtag_feeds_disabled_hides_posts(
    server: MastodonServer, open_sse: Any
) -> None:
    server.hashtag_feeds = "disabled"
    reader = open_sse("disabledfeed")
    server.post("alice", "Hello #disabledfeed")
    server.publish_raw("disabledfeed", "marker", "{}")
    configuration = server.request("GET", "/api/v2/instance").json()["configuration"]
    assert configuration["timelines_access"]["hashtag_feeds"]["local"] == "disabled"
    assert tag_timeline(server, "disabledfeed") == []
    assert reader.next_event() == ("marker", "{}")


def test_hashtag_feeds_authenticated_needs_token(server: MastodonServer) -> None:
    server.hashtag_feeds = "authenticated"
    anonymous = server.request("GET", "/api/v1/timelines/tag/python")
    logged_in = server.request("GET", "/api/v1/timelines/tag/python", username="bob")
    assert anonymous.status_code == 401
    assert logged_in.status_code == 200


def test_streaming_url_override_advertised(server: MastodonServer) -> None:
    server.streaming_url = "http://127.0.0.1:9"
    v1 = server.request("GET", "/api/v1/instance").json()
    v2 = server.request("GET", "/api/v2/instance").json()
    assert v1["urls"]["streaming_api"] == "ws://127.0.0.1:9"
    assert v2["configuration"]["urls"]["streaming"] == "ws://127.0.0.1:9"


# --- application credentials and scopes -------------------------------------------


def test_app_credentials_default_scopes(server: MastodonServer) -> None:
    app = server.client("hashbot").app_verify_credentials()
    assert app["name"] == "hashtag bot tests"
    assert app["scopes"] == ["read", "write"]


def test_app_credentials_report_set_scopes(server: MastodonServer) -> None:
    server.set_scopes("hashbot", ["read", "write:favourites"])
    app = server.client("hashbot").app_verify_credentials()
    assert app["scopes"] == ["read", "write:favourites"]


def test_app_credentials_reject_unknown_token(server: MastodonServer) -> None:
    response = server.request(
        "GET",
        "/api/v1/apps/verify_credentials",
        headers={"Authorization": "Bearer not_a_token"},
    )
    assert response.status_code == 401


def test_scopes_read_only_token_cannot_boost(server: MastodonServer) -> None:
    status = server.post("alice", "Hello #scopes")
    server.set_scopes("hashbot", ["read"])
    path = f"/api/v1/statuses/{status['id']}/reblog"
    response = server.request("POST", path, username="hashbot")
    assert response.status_code == 403
    assert response.json() == {"error": "This action is outside the authorized scopes"}
    assert server.action_counts("reblog") == {}


def test_scopes_granular_write_allows_own_action(server: MastodonServer) -> None:
    status = server.post("alice", "Hello #granular")
    server.set_scopes("hashbot", ["read", "write:favourites"])
    base = f"/api/v1/statuses/{status['id']}"
    favourite = server.request("POST", f"{base}/favourite", username="hashbot")
    reblog = server.request("POST", f"{base}/reblog", username="hashbot")
    bookmark = server.request("POST", f"{base}/bookmark", username="hashbot")
    assert favourite.status_code == 200
    assert reblog.status_code == 403
    assert bookmark.status_code == 403


def test_scopes_write_token_cannot_read_account(server: MastodonServer) -> None:
    server.set_scopes("hashbot", ["write"])
    path = "/api/v1/accounts/verify_credentials"
    assert server.request("GET", path, username="hashbot").status_code == 403


# --- edits, visibility and tag folding on streams and timelines -------------------


def test_edit_adding_tag_streams_status_update(
    server: MastodonServer, open_sse: Any
) -> None:
    reader = open_sse("editadd")
    status = server.post("alice", "No tag yet")
    server.edit("alice", status["id"], "Now with #EditAdd")
    name, streamed = reader.next_status()
    assert name == "status.update"
    assert streamed["id"] == status["id"]
    assert [tag["name"] for tag in streamed["tags"]] == ["editadd"]


def test_edit_retags_tag_timeline(server: MastodonServer) -> None:
    status = server.post("alice", "First #editold")
    server.edit("alice", status["id"], "Then #editnew")
    assert tag_timeline(server, "editold") == []
    assert [s["id"] for s in tag_timeline(server, "editnew")] == [status["id"]]


def test_edit_reaches_client_as_plain_dict(server: MastodonServer) -> None:
    stream = MastodonPyStream(server.client("hashbot"), "editpy")
    server.wait_for_stream("editpy")
    status = server.post("alice", "Plain")
    server.edit("alice", status["id"], "Plain #editpy")
    wait_until(lambda: stream.listener.events, 5.0, message="the edit event")
    server.close_streams()
    stream.join()
    [(name, payload)] = stream.listener.events
    assert name == "status.update"
    assert isinstance(payload["created_at"], str)
    assert stream.returned


def test_unlisted_post_skips_hashtag_stream(
    server: MastodonServer, open_sse: Any
) -> None:
    reader = open_sse("unlisted")
    server.post("alice", "Quiet #unlisted", visibility="unlisted")
    public = server.post("alice", "Loud #unlisted")
    _, status = reader.next_status()
    assert status["id"] == public["id"]


def test_unlisted_post_skips_tag_timeline(server: MastodonServer) -> None:
    server.post("alice", "Quiet #unlistedrest", visibility="unlisted")
    assert tag_timeline(server, "unlistedrest") == []


def test_accented_post_reaches_folded_stream(
    server: MastodonServer, open_sse: Any
) -> None:
    reader = open_sse("cafe")
    server.post("alice", "Coffee #Café")
    _, status = reader.next_status()
    assert status["tags"][0]["name"] == "cafe"


def test_accented_stream_name_subscribes_folded(
    server: MastodonServer, open_sse: Any
) -> None:
    reader = open_sse("CAFÉ")
    server.post("alice", "Coffee #cafe")
    name, _ = reader.next_status()
    assert name == "update"


def test_accented_post_on_folded_timeline(server: MastodonServer) -> None:
    status = server.post("alice", "Coffee #Crème")
    assert [s["id"] for s in tag_timeline(server, "creme")] == [status["id"]]
    assert [s["id"] for s in tag_timeline(server, "CRÈME")] == [status["id"]]


def test_blocked_author_skips_stream(server: MastodonServer, open_sse: Any) -> None:
    server.client("hashbot").account_block(server.account_id("bob"))
    reader = open_sse("blocked")
    server.post("bob", "Blocked #blocked")
    allowed = server.post("alice", "Allowed #blocked")
    _, status = reader.next_status()
    assert status["id"] == allowed["id"]


def test_blocked_author_skips_tag_timeline(server: MastodonServer) -> None:
    server.client("hashbot").account_block(server.account_id("bob"))
    server.post("bob", "Blocked #blockedrest")
    allowed = server.post("alice", "Allowed #blockedrest")
    assert [s["id"] for s in tag_timeline(server, "blockedrest")] == [allowed["id"]]


def test_local_stream_skips_remote_posts(server: MastodonServer, open_sse: Any) -> None:
    reader = open_sse("localonly", local=True)
    server.post("dave", "Remote #localonly")
    local = server.post("alice", "Local #localonly")
    _, status = reader.next_status()
    assert status["id"] == local["id"]


def test_delete_reaches_hashtag_stream(server: MastodonServer, open_sse: Any) -> None:
    status = server.post("alice", "Soon gone #deleted")
    reader = open_sse("deleted")
    server.delete("alice", status["id"])
    assert reader.next_event() == ("delete", status["id"])


def test_silenced_stream_keeps_heartbeats_only(
    server: MastodonServer, open_sse: Any
) -> None:
    server.silence_streams()
    reader = open_sse("silenced")
    server.post("alice", "Lost #silenced")
    server.publish_raw("silenced", "marker", "{}")
    assert reader.next_event() == ("marker", "{}")


# --- stream framing and access ------------------------------------------------------


def test_stream_starts_with_smiley_then_thumps(open_sse: Any) -> None:
    reader = open_sse("framing")
    assert reader.next_line() == ":)"
    assert reader.next_line() == ":thump"


def test_stream_without_heartbeat_sends_nothing(
    server: MastodonServer, open_sse: Any
) -> None:
    server.heartbeat_seconds = None
    reader = open_sse("quiet", read_timeout=0.5)
    assert reader.next_line() == ":)"
    with pytest.raises(requests.exceptions.ConnectionError):
        reader.next_line()


def test_stream_without_token_is_401(open_sse: Any) -> None:
    reader = open_sse("notoken", token=None)
    assert reader.response.status_code == 401
    assert reader.response.json() == {"error": "Error: Missing access token"}


def test_stream_without_tag_is_404(open_sse: Any) -> None:
    assert open_sse(None).response.status_code == 404


# --- action records ---------------------------------------------------------------


def test_action_counts_repeated_boost_counted_twice(server: MastodonServer) -> None:
    status = server.post("alice", "Boost me #counts")
    client = server.client("hashbot")
    first = client.status_reblog(status["id"])
    second = client.status_reblog(status["id"])
    assert first["id"] == second["id"]
    assert server.action_counts("reblog") == {status["id"]: 2}
    assert server.action_counts("reblog", username="alice") == {}


def test_action_counts_favourite_and_bookmark(server: MastodonServer) -> None:
    status = server.post("alice", "Like me #counts")
    client = server.client("hashbot")
    client.status_favourite(status["id"])
    client.status_bookmark(status["id"])
    assert server.action_counts("favourite") == {status["id"]: 1}
    assert server.action_counts("bookmark") == {status["id"]: 1}


def test_action_counts_reply_marks_replay(server: MastodonServer) -> None:
    parent = server.post("alice", "Reply to me #counts")
    client = server.client("hashbot")
    for _ in range(2):
        client.status_post("Thanks!", in_reply_to_id=parent["id"], idempotency_key="k1")
    replies = server.replies("hashbot")
    assert server.action_counts("reply") == {parent["id"]: 2}
    assert server.action_counts("reply", include_replays=False) == {parent["id"]: 1}
    assert [reply.replayed for reply in replies] == [False, True]
    assert replies[0].params["status"] == "Thanks!"


def test_action_counts_skip_faulted_requests(server: MastodonServer) -> None:
    status = server.post("alice", "Flaky #counts")
    path = f"/api/v1/statuses/{status['id']}/reblog"
    server.fault(path=path, methods=["POST"], status=503, count=1)
    failed = server.request("POST", path, username="hashbot")
    retried = server.request("POST", path, username="hashbot")
    assert failed.status_code == 503
    assert retried.status_code == 200
    assert server.action_counts("reblog") == {status["id"]: 1}


# --- injected events ------------------------------------------------------------------


def test_publish_raw_sends_text_verbatim(server: MastodonServer, open_sse: Any) -> None:
    reader = open_sse("raw")
    assert server.publish_raw("raw", "update", "{not json") == 1
    server.publish_raw("raw", "update", "")
    assert reader.next_event() == ("update", "{not json")
    assert reader.next_event() == ("update", "")


def test_publish_raw_bad_json_fails_client(
    server: MastodonServer,
) -> None:
    stream = MastodonPyStream(server.client("hashbot"), "rawpy")
    server.wait_for_stream("rawpy")
    server.publish_raw("rawpy", "update", "{not json")
    stream.join()
    assert isinstance(stream.error, MastodonMalformedEventError)


def test_publish_raw_without_listener_is_lost(server: MastodonServer) -> None:
    assert server.publish_raw("nobody", "update", "{}") == 0


# --- TCP proxy --------------------------------------------------------------------


def test_proxy_forwards_requests(server: MastodonServer, proxy_factory: Any) -> None:
    proxy = proxy_factory(server.port)
    response = requests.get(f"{proxy.url}/health", timeout=2)
    assert response.text == "OK"


def test_proxy_cut_breaks_open_stream(
    server: MastodonServer, proxy_factory: Any, open_sse: Any
) -> None:
    proxy = proxy_factory(server.port)
    reader = open_sse("cut", base_url=proxy.url)
    assert reader.next_line() == ":)"
    assert proxy.cut() == 1
    with pytest.raises(requests.exceptions.RequestException):
        reader.next_event()


def test_proxy_refuse_rejects_then_accepts(
    server: MastodonServer, proxy_factory: Any
) -> None:
    proxy = proxy_factory(server.port)
    proxy.refuse(True)
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"{proxy.url}/health", timeout=2)
    proxy.refuse(False)
    assert requests.get(f"{proxy.url}/health", timeout=2).text == "OK"


def test_proxy_stall_holds_bytes_until_resumed(
    server: MastodonServer, proxy_factory: Any
) -> None:
    proxy = proxy_factory(server.port)
    proxy.stall(True)
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.get(f"{proxy.url}/health", timeout=(2, 0.3))
    proxy.stall(False)
    assert requests.get(f"{proxy.url}/health", timeout=2).text == "OK"


def test_proxy_stop_closes_connections() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    proxy = TcpProxy(listener.getsockname()[1]).start()
    client = socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
    wait_until(lambda: proxy.open_connections == 1, 2.0, message="the connection")
    proxy.stop()
    assert client.recv(1) == b""
    client.close()
    listener.close()


def test_stream_proxy_carries_only_stream(
    server: MastodonServer, stream_proxy: TcpProxy
) -> None:
    stream = MastodonPyStream(server.client("hashbot"), "proxied")
    server.wait_for_stream("proxied")
    # The server opens the stream before its headers reach the client: wait
    # until an event arrives, so that the cut comes in the middle of the stream.
    server.publish_raw("proxied", "marker", "{}")
    wait_until(lambda: stream.listener.events, 5.0, message="the marker event")
    assert stream_proxy.open_connections == 1
    started = time.monotonic()
    stream_proxy.cut()
    stream.join()
    assert isinstance(stream.error, MastodonNetworkError)
    assert time.monotonic() - started < 2.0


# --- a server of its own --------------------------------------------------------------


def test_server_extra_accounts_and_remote_posts() -> None:
    from mastodon_mock.config import SeedAccount

    extra = SeedAccount(username="erin", note="#nobot", access_token="erin_token")
    with MastodonServer(extra_accounts=[extra], heartbeat_seconds=None) as own:
        remote = own.post("dave", "From afar #remote")
        assert remote["account"]["acct"] == "dave@remote.example"
        assert "#<span>nobot</span>" in account_json(own, "erin")["note"]
