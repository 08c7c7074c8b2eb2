"""End-to-end tests of the bot's fediverse rules against the local test server.

Each test runs hashtag_bot.py as a subprocess with ``-v`` on a hashtag of its
own. It publishes the posts that a rule must skip first and a post that the bot
must act on last (the sentinel). A hashtag stream delivers posts in order and
the bot handles them one at a time, so once the sentinel has its action, the
bot has decided on every earlier post. The test then checks that those posts
got no action and that the log gives each one's reason with the post's URL.

The pure rules (``skip_reason``, ``reply_skip_reason``) have unit tests in
test_rules.py. These tests check the same rules on what a Mastodon-like server
really sends: bios rendered as HTML, ``filtered`` results, blocks and mutes.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable

import pytest
from mastodon_server import MastodonServer

if TYPE_CHECKING:
    from conftest import BotFiles, BotProcess

# No delay and no cooldown, so the bot acts at once on every author. No
# reconciliation runs during a test, so only the stream and the catch-up
# deliver posts.
QUICK_SETTINGS: dict[str, Any] = {
    "ACTION_DELAY_SECONDS": 0,
    "USER_COOLDOWN_SECONDS": 0,
    "RECONCILE_SECONDS": 3600,
}
# How long a test waits for the bot. On an idle machine a wait takes well under
# a second, plus the 1 s rate-limit pause in one test, but a loaded one is slower.
WAIT_TIMEOUT_SECONDS = 10.0
# watch(tag, **settings), the fixture below.
Watch = Callable[..., "BotProcess"]
# The bot's summary line. Under systemd the timestamp before INFO is missing.
SUMMARY_LINE = re.compile(
    r"\bINFO since .*?: (?P<seen>\d+) posts seen, (?P<acted>\d+) acted on, "
    r"(?P<skipped>\d+) skipped \((?P<rules>.*)\), (?P<failed>\d+) failed$",
    re.MULTILINE,
)


@pytest.fixture
def server(reused_server: MastodonServer) -> MastodonServer:
    """The session's server, reset to its seed (overrides conftest's fresh one)."""
    return reused_server


@pytest.fixture
def watch(
    server: MastodonServer,
    bot_files: Callable[..., BotFiles],
    start_bot: Callable[..., BotProcess],
) -> Watch:
    """Return ``watch(tag, **settings)``, which starts the bot on ``tag``.

    The settings add to (or replace) QUICK_SETTINGS. It returns once the bot's
    stream for ``tag`` is open, so every post published afterwards reaches it.
    """

    def start(tag: str, **settings: Any) -> BotProcess:
        files = bot_files(HASHTAGS=[tag], **{**QUICK_SETTINGS, **settings})
        bot = start_bot(files)
        server.wait_for_stream(tag, username="hashbot", timeout=WAIT_TIMEOUT_SECONDS)
        return bot

    return start


def actions_on(server: MastodonServer, post: dict[str, Any]) -> list[str]:
    """Return the successful actions on ``post`` ("reblog", "reply", ...), in order."""
    return [
        record.action
        for record in server.action_log()
        if record.post_id == post["id"] and 200 <= record.status_code < 300
    ]


def wait_for_action(
    bot: BotProcess, server: MastodonServer, post: dict[str, Any], action: str
) -> None:
    """Wait until the server has recorded ``action`` ("reblog", "reply") on ``post``."""
    bot.wait_until(
        lambda: action in actions_on(server, post),
        WAIT_TIMEOUT_SECONDS,
        message=f"{action} of {post['url']}",
    )


def skip_line(bot: BotProcess, post: dict[str, Any]) -> str:
    """Return the -v log line that skips ``post``, or "" if there is none."""
    prefix = f"skip {post['url']} ("
    for line in bot.log_text().splitlines():
        if prefix in line:
            return line
    return ""


def log_lines(bot: BotProcess, text: str) -> list[str]:
    """Return the log lines that contain ``text``."""
    return [line for line in bot.log_text().splitlines() if text in line]


def one_log_line(bot: BotProcess, text: str) -> str:
    """Return the log line that contains ``text``, and fail unless there is one."""
    lines = log_lines(bot, text)
    assert len(lines) == 1, f"expected 1 log line with {text!r}, found {len(lines)}"
    return lines[0]


def stop_and_read_summary(bot: BotProcess) -> re.Match[str]:
    """Stop the bot with SIGTERM and return its one summary line."""
    assert bot.stop() == 0, "the bot did not exit with status 0 after SIGTERM"
    summaries = list(SUMMARY_LINE.finditer(bot.log_text()))
    assert len(summaries) == 1, f"expected 1 summary line, found {len(summaries)}"
    return summaries[0]


# --- opt-out -----------------------------------------------------------------


def test_opt_out_in_bio_field_and_post(server: MastodonServer, watch: Watch) -> None:
    server.set_profile("alice", fields=[("Bots", "#NoBot please")])
    bot = watch("optout")
    bio_mixed_case = server.post("optout", "Mine #optout")
    bio_accent = server.post("optoutaccent", "Meins #optout")
    profile_field = server.post("alice", "Field #optout")
    tagged_post = server.post("bob", "Just this one #optout #nobot")
    sentinel = server.post("carol", "Boost me #optout")
    wait_for_action(bot, server, sentinel, "reblog")

    assert actions_on(server, bio_mixed_case) == []
    assert actions_on(server, bio_accent) == []
    assert actions_on(server, profile_field) == []
    assert actions_on(server, tagged_post) == []
    assert actions_on(server, sentinel) == ["reblog"]
    assert "author opted out in bio" in skip_line(bot, bio_mixed_case)
    assert "author opted out in bio" in skip_line(bot, bio_accent)
    assert "author opted out in bio" in skip_line(bot, profile_field)
    assert "post carries an opt-out tag" in skip_line(bot, tagged_post)


# --- default rules and bots --------------------------------------------------


def test_defaults_skip_bots_boost_replies(server: MastodonServer, watch: Watch) -> None:
    parent = server.post("alice", "A question, no tag")
    bot = watch("defaults")
    automated = server.post("robo", "Beep #defaults")
    reply = server.post("bob", "An answer #defaults", in_reply_to_id=parent["id"])
    wait_for_action(bot, server, reply, "reblog")

    assert actions_on(server, automated) == []
    assert "author is a bot (SKIP_BOTS)" in skip_line(bot, automated)
    assert actions_on(server, reply) == ["reblog"]


def test_bot_author_allowed_never_replied(server: MastodonServer, watch: Watch) -> None:
    bot = watch(
        "botallowed",
        SKIP_BOTS=False,
        ACTIONS=["boost", "reply"],
        REPLY_TEXT="Thanks {acct}",
    )
    automated = server.post("robo", "Beep #botallowed")
    sentinel = server.post("alice", "Human #botallowed")
    wait_for_action(bot, server, sentinel, "reply")

    assert actions_on(server, automated) == ["reblog"]
    assert actions_on(server, sentinel) == ["reblog", "reply"]
    assert log_lines(bot, f"no reply to {automated['url']}: author is a bot")


# --- reply posts, content warnings, languages, hashtag count -----------------


def test_skip_replies_skips_reply(server: MastodonServer, watch: Watch) -> None:
    parent = server.post("alice", "A question, no tag")
    bot = watch("skipreplies", SKIP_REPLIES=True)
    reply = server.post("bob", "An answer #skipreplies", in_reply_to_id=parent["id"])
    sentinel = server.post("carol", "Not a reply #skipreplies")
    wait_for_action(bot, server, sentinel, "reblog")

    assert actions_on(server, reply) == []
    assert "reply (SKIP_REPLIES)" in skip_line(bot, reply)


def test_skip_sensitive_skips_content_warning(
    server: MastodonServer, watch: Watch
) -> None:
    bot = watch("sensitive", SKIP_SENSITIVE=True)
    warned = server.post("alice", "Spoilers #sensitive", spoiler_text="film ending")
    sentinel = server.post("bob", "No warning #sensitive")
    wait_for_action(bot, server, sentinel, "reblog")

    assert actions_on(server, warned) == []
    assert "sensitive or content warning (SKIP_SENSITIVE)" in skip_line(bot, warned)


def test_languages_skip_other_language(server: MastodonServer, watch: Watch) -> None:
    bot = watch("languages", LANGUAGES=["en"])
    german = server.post("alice", "Hallo #languages", language="de")
    unknown = server.post("bob", "No language set #languages")
    sentinel = server.post("carol", "Hello #languages", language="en")
    wait_for_action(bot, server, sentinel, "reblog")

    assert actions_on(server, german) == []
    assert actions_on(server, unknown) == ["reblog"]
    assert "language not in LANGUAGES (de)" in skip_line(bot, german)


def test_skip_unknown_language_skips_unset(
    server: MastodonServer, watch: Watch
) -> None:
    bot = watch("unknownlang", LANGUAGES=["en"], SKIP_UNKNOWN_LANGUAGE=True)
    unknown = server.post("alice", "No language set #unknownlang")
    sentinel = server.post("bob", "Hello #unknownlang", language="en")
    wait_for_action(bot, server, sentinel, "reblog")

    assert actions_on(server, unknown) == []
    assert "no language (SKIP_UNKNOWN_LANGUAGE)" in skip_line(bot, unknown)


def test_max_hashtags_skips_tag_spam(server: MastodonServer, watch: Watch) -> None:
    bot = watch("spamtags", MAX_HASHTAGS=3)
    four_tags = server.post("alice", "#spamtags #buy #now #cheap")
    three_tags = server.post("bob", "#spamtags #python #rust")
    wait_for_action(bot, server, three_tags, "reblog")

    assert actions_on(server, four_tags) == []
    assert "more hashtags than MAX_HASHTAGS (4)" in skip_line(bot, four_tags)


# --- DENY_ACCOUNTS -----------------------------------------------------------


def test_deny_accounts_local_and_remote_user(
    server: MastodonServer, watch: Watch
) -> None:
    bot = watch("denyuser", DENY_ACCOUNTS=["bob", "dave@remote.example"])
    local = server.post("bob", "Local #denyuser")
    remote = server.post("dave", "Remote #denyuser")
    sentinel = server.post("alice", "Allowed #denyuser")
    wait_for_action(bot, server, sentinel, "reblog")

    assert actions_on(server, local) == []
    assert actions_on(server, remote) == []
    assert "author in DENY_ACCOUNTS" in skip_line(bot, local)
    assert "author in DENY_ACCOUNTS" in skip_line(bot, remote)


def test_deny_accounts_whole_domain(server: MastodonServer, watch: Watch) -> None:
    bot = watch("denydomain", DENY_ACCOUNTS=["@remote.example"])
    remote = server.post("dave", "Remote #denydomain")
    sentinel = server.post("alice", "Local #denydomain")
    wait_for_action(bot, server, sentinel, "reblog")

    assert actions_on(server, remote) == []
    assert "author in DENY_ACCOUNTS" in skip_line(bot, remote)


# --- the owner's keyword filters ---------------------------------------------


def test_filter_hide_skips_and_warn_boosts(
    server: MastodonServer, watch: Watch
) -> None:
    server.add_filter("hashbot", "Giveaways", ["giveaway"], "hide")
    server.add_filter("hashbot", "Politics", ["election"], "warn")
    bot = watch("filters")
    hidden = server.post("alice", "Big giveaway #filters")
    warned = server.post("bob", "The election #filters")
    wait_for_action(bot, server, warned, "reblog")

    assert actions_on(server, hidden) == []
    assert actions_on(server, warned) == ["reblog"]
    assert "hidden by the owner's filter (hide: 'Giveaways')" in skip_line(bot, hidden)


def test_filter_warn_skipped_with_setting(server: MastodonServer, watch: Watch) -> None:
    server.add_filter("hashbot", "Politics", ["election"], "warn")
    bot = watch("filterwarn", SKIP_FILTER_WARN=True)
    warned = server.post("alice", "The election #filterwarn")
    sentinel = server.post("bob", "Something else #filterwarn")
    wait_for_action(bot, server, sentinel, "reblog")

    assert actions_on(server, warned) == []
    assert "hidden by the owner's filter (warn: 'Politics')" in skip_line(bot, warned)


# --- blocks and mutes of the bot account -------------------------------------


def test_blocked_and_muted_never_boosted(
    server: MastodonServer,
    bot_files: Callable[..., BotFiles],
    start_bot: Callable[..., BotProcess],
) -> None:
    for username, relation in (("bob", "block"), ("carol", "mute")):
        path = f"/api/v1/accounts/{server.account_id(username)}/{relation}"
        server.request("POST", path, username="hashbot").raise_for_status()
    server.request(
        "POST",
        "/api/v1/domain_blocks",
        username="hashbot",
        data={"domain": "remote.example"},
    ).raise_for_status()
    files = bot_files(HASHTAGS=["blocks"], **QUICK_SETTINGS)
    bot = start_bot(files)
    server.wait_for_stream("blocks", username="hashbot", timeout=WAIT_TIMEOUT_SECONDS)
    blocked = server.post("bob", "Blocked #blocks")
    muted = server.post("carol", "Muted #blocks")
    domain_blocked = server.post("dave", "Domain blocked #blocks")
    # The server's stream drops these posts for the bot account. The bot must
    # skip them even when a stream lets them through, so send them anyway.
    for post in (blocked, muted, domain_blocked):
        server.publish_raw("blocks", "update", json.dumps(post))
    sentinel = server.post("alice", "Allowed #blocks")
    wait_for_action(bot, server, sentinel, "reblog")
    bot.stop()

    blocked_later = server.post("bob", "Blocked, while the bot is stopped #blocks")
    muted_later = server.post("carol", "Muted, while the bot is stopped #blocks")
    domain_later = server.post("dave", "Domain, while the bot is stopped #blocks")
    caught_up = server.post("alice", "Allowed, while the bot is stopped #blocks")
    restarted = start_bot(files)
    wait_for_action(restarted, server, caught_up, "reblog")

    assert actions_on(server, blocked) == []
    assert actions_on(server, muted) == []
    assert actions_on(server, domain_blocked) == []
    assert "author blocked or muted by the bot account" in skip_line(bot, blocked)
    assert "author blocked or muted by the bot account" in skip_line(bot, muted)
    assert "domain blocked by the bot account" in skip_line(bot, domain_blocked)
    assert actions_on(server, blocked_later) == []
    assert actions_on(server, muted_later) == []
    assert actions_on(server, domain_later) == []


# --- the bot's replies -------------------------------------------------------


def test_reply_once_per_post(server: MastodonServer, watch: Watch) -> None:
    bot = watch("thanks", ACTIONS=["reply"], REPLY_TEXT="Thanks {acct} for #{tag}")
    post = server.post("alice", "Hello #thanks")
    wait_for_action(bot, server, post, "reply")
    # The same status a second time, as a stream may deliver it after a glitch.
    server.publish_raw("thanks", "update", json.dumps(post))
    sentinel = server.post("dave", "Hello from afar #thanks")
    wait_for_action(bot, server, sentinel, "reply")

    replies = server.replies("hashbot")
    assert [r.in_reply_to_id for r in replies] == [post["id"], sentinel["id"]]
    assert log_lines(bot, f"skip {post['url']}: already handled")
    reply, sentinel_reply = replies
    assert reply.params["status"] == "@alice Thanks alice for #thanks"
    assert reply.status["visibility"] == "unlisted"
    assert sentinel_reply.params["status"].startswith("@dave@remote.example ")


def test_reply_once_per_author_cooldown(server: MastodonServer, watch: Watch) -> None:
    bot = watch(
        "cooldown", ACTIONS=["reply"], REPLY_TEXT="Thanks", USER_COOLDOWN_SECONDS=600
    )
    first = server.post("alice", "First #cooldown")
    second = server.post("alice", "Second #cooldown")
    sentinel = server.post("bob", "Someone else #cooldown")
    wait_for_action(bot, server, sentinel, "reply")

    assert actions_on(server, first) == ["reply"]
    assert actions_on(server, second) == []
    assert "USER_COOLDOWN_SECONDS" in skip_line(bot, second)


def test_reply_visibility_public(server: MastodonServer, watch: Watch) -> None:
    bot = watch(
        "publicreply", ACTIONS=["reply"], REPLY_TEXT="Hi", REPLY_VISIBILITY="public"
    )
    post = server.post("alice", "Hello #publicreply")
    wait_for_action(bot, server, post, "reply")

    replies = server.replies("hashbot")
    assert len(replies) == 1
    assert replies[0].status["visibility"] == "public"


def test_reply_never_to_mention_or_answer(server: MastodonServer, watch: Watch) -> None:
    own_post = server.post("hashbot", "I boost posts, reply if you like")
    bot = watch("loops", ACTIONS=["reply"], REPLY_TEXT="Thanks {acct}")
    mention = server.post("bob", "@hashbot look #loops")
    answer = server.post("carol", "Nice #loops", in_reply_to_id=own_post["id"])
    sentinel = server.post("alice", "Hello #loops")
    wait_for_action(bot, server, sentinel, "reply")

    assert actions_on(server, mention) == []
    assert actions_on(server, answer) == []
    assert log_lines(
        bot, f"no reply to {mention['url']}: post mentions the bot account"
    )
    assert log_lines(bot, f"no reply to {answer['url']}: post replies to the bot")


# --- start-up advice ---------------------------------------------------------


def test_advice_warns_on_bare_profile(server: MastodonServer, watch: Watch) -> None:
    server.set_profile("hashbot", bot=False, note="I boost posts tagged #python.")
    bot = watch("advice")
    bot.wait_for_log(r"#advice: stream connected")

    bot_flag = one_log_line(bot, "is not marked as a bot")
    bio = one_log_line(bot, "does not say how to opt out")
    assert "WARNING" in bot_flag
    assert "Preferences > Profile" in bot_flag
    assert "automated account" in bot_flag
    assert "WARNING" in bio
    assert "#nobot" in bio


def test_advice_silent_on_complete_profile(
    server: MastodonServer, watch: Watch
) -> None:
    bot = watch("noadvice")
    bot.wait_for_log(r"#noadvice: stream connected")

    assert log_lines(bot, "is not marked as a bot") == []
    assert log_lines(bot, "does not say how to opt out") == []


# --- the summary -------------------------------------------------------------


def test_summary_on_sigterm_adds_up(server: MastodonServer, watch: Watch) -> None:
    bot = watch("summary")
    # The first boost fails with 404, as for a post deleted meanwhile.
    server.fault(
        path="/api/v1/statuses/*/reblog", methods=["POST"], status=404, count=1
    )
    boost_rejected = server.post("alice", "Gone soon #summary")
    server.post("robo", "Beep #summary")
    server.post("optout", "Leave me alone #summary")
    server.post("bob", "Boost me #summary")
    sentinel = server.post("carol", "Boost me too #summary")
    wait_for_action(bot, server, sentinel, "reblog")

    summary = stop_and_read_summary(bot)
    seen = int(summary["seen"])
    acted = int(summary["acted"])
    skipped = int(summary["skipped"])
    failures = int(summary["failed"])
    assert actions_on(server, boost_rejected) == []
    assert seen == 5
    assert acted == 2
    assert skipped == 2
    assert failures == 1
    assert seen == acted + skipped + failures
    assert "author is a bot: 1" in summary["rules"]
    assert "author opted out in bio: 1" in summary["rules"]


def test_summary_adds_up_after_429_pause(server: MastodonServer, watch: Watch) -> None:
    bot = watch("ratelimited")
    # One 429 on the first boost, with a reset time already reached: the bot
    # pauses for its minimum of 1 s, then catches up and boosts the same post,
    # which must still count once.
    reset = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    server.fault(
        path="/api/v1/statuses/*/reblog",
        methods=["POST"],
        type="ratelimit",
        headers={"X-RateLimit-Reset": reset},
        count=1,
    )
    post = server.post("alice", "Boosted after the pause #ratelimited")
    wait_for_action(bot, server, post, "reblog")

    summary = stop_and_read_summary(bot)
    seen = int(summary["seen"])
    acted = int(summary["acted"])
    skipped = int(summary["skipped"])
    failures = int(summary["failed"])
    assert log_lines(bot, "rate limited (429)")
    assert acted == 1
    assert seen == 1
    assert seen == acted + skipped + failures


# --- the whole scenario ------------------------------------------------------


def test_scenario_only_allowed_posts_boosted(
    server: MastodonServer, watch: Watch
) -> None:
    """A bio with #NoBot, a bot author and a hide filter: only the rest is boosted."""
    server.add_filter("hashbot", "Crypto", ["airdrop"], "hide")
    bot = watch("scenario")
    opted_out = server.post("optout", "From the opted-out #scenario")
    automated = server.post("robo", "From a bot #scenario")
    filtered = server.post("alice", "Free airdrop #scenario")
    allowed = [
        server.post("alice", "A good post #scenario"),
        server.post("bob", "Another one #Scenario"),
        server.post("dave", "From afar #SCENARIO"),
    ]
    wait_for_action(bot, server, allowed[-1], "reblog")
    summary = stop_and_read_summary(bot)

    assert actions_on(server, opted_out) == []
    assert actions_on(server, automated) == []
    assert actions_on(server, filtered) == []
    for post in allowed:
        assert actions_on(server, post) == ["reblog"], post["url"]
    assert "author opted out in bio" in skip_line(bot, opted_out)
    assert "author is a bot (SKIP_BOTS)" in skip_line(bot, automated)
    assert "hidden by the owner's filter (hide: 'Crypto')" in skip_line(bot, filtered)
    assert int(summary["seen"]) == 6
    assert int(summary["acted"]) == 3
    assert int(summary["skipped"]) == 3
    assert int(summary["failed"]) == 0
    assert "author opted out in bio: 1" in summary["rules"]
    assert "author is a bot: 1" in summary["rules"]
    assert "hidden by the owner's filter: 1" in summary["rules"]
