"""The pure parts of hashtag_bot: settings, tags, rules, time and state.

These feed status dictionaries shaped like Mastodon's and check the decision
and its reason; no server is involved.
"""

import io
import json
from pathlib import Path

import pytest

import hashtag_bot as bot

ME = {
    "id": "1",
    "acct": "hashbot",
    "domain": "example.social",
    "blocked_ids": {"66"},
    "blocked_domains": {"blocked.example"},
}


def make_settings(tmp_path: Path, text: str = "", **environ: str) -> bot.Settings:
    config = tmp_path / "config.py"
    config.write_text('HASHTAGS = ["python"]\n' + text, encoding="utf-8")
    return bot.load_settings(config, dict(environ))


def make_status(**fields) -> dict:
    status = {
        "id": "100",
        "url": "https://example.social/@alice/100",
        "visibility": "public",
        "language": "en",
        "content": "<p>hello #python</p>",
        "tags": [{"name": "python"}],
        "mentions": [],
        "filtered": [],
        "sensitive": False,
        "spoiler_text": "",
        "in_reply_to_id": None,
        "in_reply_to_account_id": None,
        "reblog": None,
        "account": {
            "id": "2",
            "acct": "alice",
            "bot": False,
            "note": "<p>I write Python.</p>",
            "fields": [],
        },
    }
    status.update(fields)
    return status


def with_account(**fields) -> dict:
    status = make_status()
    status["account"].update(fields)
    return status


# --- Tags --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("#Python", "python"),
        ("PYTHON", "python"),
        ("#Café", "cafe"),
        ("ＰＹＴＨＯＮ", "python"),
        ("Straße", "strasse"),
        ("#NöBot", "nobot"),
        ("hello_world", "hello_world"),
        ("hash-tag", "hashtag"),
    ],
)
def test_normalize_tag_folds_like_mastodon(raw, expected):
    assert bot.normalize_tag(raw) == expected


def test_normalize_tag_keeps_devanagari_vowel_signs():
    assert bot.normalize_tag("#हिन्दी") == "हिन्दी"


def test_hashtags_in_bio_html_link():
    note = (
        '<p>Please <a href="https://example.social/tags/nobot" class="mention '
        'hashtag" rel="tag">#<span>NoBot</span></a> thanks</p>'
    )
    assert "nobot" in bot.hashtags_in_text(bot.html_to_text(note))


# --- Settings ----------------------------------------------------------------


def test_settings_defaults(tmp_path):
    settings = make_settings(tmp_path)
    assert settings.ACTIONS == ["boost"]
    assert settings.ACTION_DELAY_SECONDS == 5.0
    assert settings.USER_COOLDOWN_SECONDS == 60.0
    assert settings.STREAM_TIMEOUT_SECONDS == 60.0
    assert settings.LOCAL_ONLY is False
    assert settings.DRY_RUN is False
    assert settings.MAX_ACTIONS_PER_HOUR == 60
    assert settings.OPT_OUT_TAGS == ["nobot", "nobots", "noboost"]


def test_settings_example_file_loads():
    example = Path(bot.__file__).with_name("config.example.py")
    settings = bot.load_settings(example, {})
    assert settings.HASHTAGS == ["python"]


def test_settings_environment_wins(tmp_path):
    settings = make_settings(
        tmp_path,
        "ACTION_DELAY_SECONDS = 9\n",
        ACTION_DELAY_SECONDS="1.5",
        HASHTAGS="#Rust, Go",
        LOCAL_ONLY="YES",
        ACTIONS="boost,favourite",
    )
    assert settings.ACTION_DELAY_SECONDS == 1.5
    assert settings.HASHTAGS == ["rust", "go"]
    assert settings.LOCAL_ONLY is True
    assert settings.ACTIONS == ["boost", "favourite"]


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"LOCAL_ONLY": "maybe"}, "LOCAL_ONLY"),
        ({"ACTION_DELAY_SECONDS": "five"}, "ACTION_DELAY_SECONDS"),
        ({"ACTION_DELAY_SECONDS": "-1"}, "ACTION_DELAY_SECONDS"),
        ({"CATCH_UP_MAX": "2.5"}, "CATCH_UP_MAX"),
        ({"ACTIONS": "boost,shout"}, "shout"),
        ({"ACTIONS": "reply"}, "REPLY_TEXT"),
        ({"HASHTAGS": ""}, "HASHTAGS"),
        ({"HASHTAGS": "#"}, "HASHTAGS"),
        ({"STREAM_TIMEOUT_SECONDS": "0"}, "STREAM_TIMEOUT_SECONDS"),
        ({"REPLY_VISIBILITY": "everyone"}, "REPLY_VISIBILITY"),
        ({"DENY_ACCOUNTS": "bad entry!"}, "DENY_ACCOUNTS"),
    ],
)
def test_settings_invalid_value_named(tmp_path, environ, named):
    with pytest.raises(bot.ConfigError, match=named):
        make_settings(tmp_path, **environ)


def test_settings_unknown_name_suggests(tmp_path):
    with pytest.raises(bot.ConfigError, match="did you mean HASHTAGS"):
        make_settings(tmp_path, "HASHTAG = ['x']\n")


def test_settings_syntax_error_names_line(tmp_path):
    with pytest.raises(bot.ConfigError, match="line 2"):
        make_settings(tmp_path, "ACTIONS = [\n")


@pytest.mark.parametrize(
    "url",
    ["https://example.social", "example.social", "http://127.0.0.1:3000",
     "http://localhost:8080/", "http://[::1]:3000"],
)  # fmt: skip
def test_base_url_accepted(url):
    assert bot.check_base_url(url).rstrip("/") == bot.check_base_url(url)


@pytest.mark.parametrize(
    "url",
    ["http://example.social", "ftp://example.social", "https://", "https://a?b=c",
     "http://10.0.0.1"],
)  # fmt: skip
def test_base_url_rejected(url):
    with pytest.raises(bot.ConfigError, match="MASTODON_API_BASE_URL"):
        bot.check_base_url(url)


def test_credentials_environment_wins_over_env_file(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text(
        "MASTODON_API_BASE_URL=https://file.example\n"
        "MASTODON_ACCESS_TOKEN=file_token\n",
        encoding="utf-8",
    )
    credentials = bot.load_credentials(
        env_file, {"MASTODON_ACCESS_TOKEN": "environment_token"}
    )
    assert credentials.base_url == "https://file.example"
    assert credentials.token == "environment_token"
    assert "environment_token" not in repr(credentials)


def test_credentials_missing_token_named(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("MASTODON_API_BASE_URL=https://a.example\n", encoding="utf-8")
    with pytest.raises(bot.ConfigError, match="missing MASTODON_ACCESS_TOKEN"):
        bot.load_credentials(env_file, {})


# --- Rules -------------------------------------------------------------------


def test_rules_allow_plain_post(tmp_path):
    assert bot.skip_reason(make_status(), make_settings(tmp_path), ME) == ""


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (make_status(reblog={"id": "5"}), "boost of another post"),
        (make_status(visibility="private"), "not public or unlisted"),
        (make_status(visibility="direct"), "not public or unlisted"),
        (with_account(id="1", acct="hashbot"), "own post"),
        (with_account(bot=True), "author is a bot"),
        (with_account(id="66"), "blocked or muted"),
        (with_account(acct="eve@blocked.example"), "domain blocked"),
        (with_account(note="<p>#NoBots please</p>"), "opted out"),
        (make_status(tags=[{"name": "python"}, {"name": "NoBoost"}]), "opt-out tag"),
        (make_status(tags=[{"name": f"t{i}"} for i in range(9)]), "MAX_HASHTAGS"),
        (
            make_status(
                filtered=[{"filter": {"title": "ads", "filter_action": "hide"}}]
            ),
            "owner's filter",
        ),
    ],
)
def test_rules_skip_with_reason(tmp_path, status, reason):
    assert reason in bot.skip_reason(status, make_settings(tmp_path), ME)


def test_rules_opt_out_in_profile_field(tmp_path):
    status = with_account(
        fields=[
            {"name": "bots", "value": '<a href="x" rel="tag">#<span>NÖBOT</span></a>'}
        ]
    )
    assert "opted out" in bot.skip_reason(status, make_settings(tmp_path), ME)


def test_rules_filter_of_other_context_ignored(tmp_path):
    home_only = {"title": "x", "filter_action": "hide", "context": ["home"]}
    status = make_status(filtered=[{"filter": home_only}])
    assert bot.skip_reason(status, make_settings(tmp_path), ME) == ""


def test_rules_filter_warn_only_with_setting(tmp_path):
    status = make_status(filtered=[{"filter": {"title": "x", "filter_action": "warn"}}])
    assert bot.skip_reason(status, make_settings(tmp_path), ME) == ""
    strict = make_settings(tmp_path, "SKIP_FILTER_WARN = True\n")
    assert "owner's filter" in bot.skip_reason(status, strict, ME)


def test_rules_bots_allowed_when_setting_off(tmp_path):
    settings = make_settings(tmp_path, "SKIP_BOTS = False\n")
    assert bot.skip_reason(with_account(bot=True), settings, ME) == ""


def test_rules_replies_and_sensitive(tmp_path):
    settings = make_settings(tmp_path, "SKIP_REPLIES = True\nSKIP_SENSITIVE = True\n")
    reply = make_status(in_reply_to_id="7")
    warned = make_status(spoiler_text="cw")
    sensitive = make_status(sensitive=True)
    assert "SKIP_REPLIES" in bot.skip_reason(reply, settings, ME)
    assert "SKIP_SENSITIVE" in bot.skip_reason(warned, settings, ME)
    assert "SKIP_SENSITIVE" in bot.skip_reason(sensitive, settings, ME)
    assert bot.skip_reason(reply, make_settings(tmp_path), ME) == ""


def test_rules_languages(tmp_path):
    settings = make_settings(tmp_path, 'LANGUAGES = ["de", "EN"]\n')
    french = make_status(language="fr")
    unknown = make_status(language=None)
    regional = make_status(language="en-GB")
    assert "LANGUAGES" in bot.skip_reason(french, settings, ME)
    assert bot.skip_reason(unknown, settings, ME) == ""
    assert bot.skip_reason(regional, settings, ME) == ""
    strict = make_settings(tmp_path, "SKIP_UNKNOWN_LANGUAGE = True\n")
    assert "SKIP_UNKNOWN_LANGUAGE" in bot.skip_reason(unknown, strict, ME)


@pytest.mark.parametrize(
    ("acct", "denied"),
    [
        ("spammer@spam.example", True),
        ("anyone@bad.example", True),
        ("localspam", True),
        ("localspam@example.social", True),
        ("localspam@other.example", False),
        ("alice", False),
    ],
)
def test_rules_deny_accounts(tmp_path, acct, denied):
    settings = make_settings(
        tmp_path,
        'DENY_ACCOUNTS = ["Spammer@spam.example", "@bad.example", "localspam"]\n',
    )
    reason = bot.skip_reason(with_account(acct=acct), settings, ME)
    assert ("DENY_ACCOUNTS" in reason) is denied


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (with_account(bot=True), "bot"),
        (make_status(mentions=[{"id": "1", "acct": "hashbot"}]), "mentions"),
        (make_status(in_reply_to_account_id="1"), "replies to the bot"),
    ],
)
def test_reply_rules(status, reason):
    assert reason in bot.reply_skip_reason(status, ME)


def test_reply_text_fills_in(tmp_path):
    settings = make_settings(
        tmp_path, 'ACTIONS = ["reply"]\nREPLY_TEXT = "thanks {acct} for #{tag} {x}"\n'
    )
    text = bot.reply_text(settings, "bob@remote.example", "python")
    assert text == "@bob@remote.example thanks bob@remote.example for #python {x}"


# --- Ids and time --------------------------------------------------------------


def test_id_key_orders_numeric_and_ulid():
    assert bot.newer_id("99", "100") == "100"
    assert bot.newer_id("", "5") == "5"
    ulids = ["01HZX0AAAAAAAAAAAAAAAAAAAA", "01HZX0AAAAAAAAAAAAAAAAAAAB"]
    assert bot.newer_id(*ulids) == ulids[1]


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("1700000000", 1700000000.0),
        ("2023-11-14T22:13:20.000000Z", 1700000000.0),
        ("2023-11-14T22:13:20.123Z", 1700000000.123),
        ("2023-11-14T22:13:20+00:00", 1700000000.0),
    ],
)
def test_ratelimit_reset_forms(header, expected):
    assert bot.parse_ratelimit_reset(header) == pytest.approx(expected, abs=0.01)


@pytest.mark.parametrize("header", ["", "soon", "2023-13-45T99:00:00Z"])
def test_ratelimit_reset_unusable(header):
    assert bot.parse_ratelimit_reset(header) is None


def test_backoff_doubles_to_maximum():
    backoff = bot.Backoff(1.0, 5.0, jitter=False)
    assert [backoff.next_delay() for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    backoff.reset()
    assert backoff.next_delay() == 1.0


def test_backoff_jitter_within_step():
    backoff = bot.Backoff(8.0, 300.0)
    delay = backoff.next_delay()
    assert 4.0 <= delay <= 8.0


# --- State file ------------------------------------------------------------------


def test_state_round_trip(tmp_path):
    state = bot.State(tmp_path / "state.json")
    state.positions = {"python": "123", "rust": ""}
    state.remember_action("123", "2", 1000.0)
    state.action_times.append(1000.0)
    state.pause_until = 2000.0
    state.save()
    loaded = bot.State(tmp_path / "state.json")
    loaded.load()
    assert loaded.existed
    assert loaded.positions == {"python": "123", "rust": ""}
    assert list(loaded.acted) == ["123"]
    assert loaded.authors == {"2": 1000.0}
    assert list(loaded.action_times) == [1000.0]
    assert loaded.pause_until == 2000.0


def test_state_write_leaves_no_temporary_files(tmp_path):
    state = bot.State(tmp_path / "state.json")
    state.save()
    state.save()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


@pytest.mark.parametrize("text", ["{not json", "[]", '{"positions": 5}', ""])
def test_state_corrupt_moved_aside(tmp_path, text):
    path = tmp_path / "state.json"
    path.write_text(text, encoding="utf-8")
    state = bot.State(path)
    state.load()
    assert not state.existed
    assert state.positions == {}
    assert not path.exists()
    assert len(list(tmp_path.glob("state.json.corrupt-*"))) == 1


def test_state_prune_bounds_memory(tmp_path):
    state = bot.State(tmp_path / "state.json")
    count = bot.ACTED_IDS_MAX + 10
    for number in range(count):
        state.remember_action(str(number), str(number), float(number))
        state.action_times.append(float(number))
    state.prune(now=float(count), cooldown=5.0)
    assert len(state.acted) == bot.ACTED_IDS_MAX
    assert sorted(state.authors) == [str(n) for n in range(count - 4, count)]
    state.prune(now=count - 1 + bot.ACTION_WINDOW_SECONDS - 0.5, cooldown=5.0)
    assert list(state.action_times) == [float(count - 1)]


# --- Logging -----------------------------------------------------------------------


def test_redacting_filter_hides_token():
    redactor = bot.RedactingFilter("s3cret-token")
    record = bot.logging.LogRecord(
        "hashtag_bot", bot.logging.INFO, __file__, 1, "sent %s", ("s3cret-token",), None
    )
    assert redactor.filter(record)
    assert "s3cret-token" not in record.getMessage()


def test_redacting_filter_counts_repeated_warnings():
    redactor = bot.RedactingFilter()

    def warning(text):
        return bot.logging.LogRecord(
            "hashtag_bot", bot.logging.WARNING, __file__, 1, text, None, None
        )

    assert redactor.filter(warning("stream disconnected"))
    assert not redactor.filter(warning("stream disconnected"))
    assert redactor.filter(warning("another warning"))


@pytest.mark.parametrize("raw", ["c++", "foo-bar", "rust lang", "#a.b"])
def test_settings_hashtag_with_punctuation_rejected(tmp_path, raw):
    with pytest.raises(bot.ConfigError, match="invalid hashtag"):
        make_settings(tmp_path, HASHTAGS=raw.replace(",", ""))


def test_settings_non_latin_hashtag_accepted(tmp_path):
    assert make_settings(tmp_path, HASHTAGS="日本語,#Ærø").HASHTAGS == [
        "日本語",
        "aero",
    ]


def test_settings_watched_opt_out_tag_rejected(tmp_path):
    with pytest.raises(bot.ConfigError, match="OPT_OUT_TAGS"):
        make_settings(tmp_path, HASHTAGS="NoBot")


def test_settings_language_name_rejected(tmp_path):
    with pytest.raises(bot.ConfigError, match="LANGUAGES"):
        make_settings(tmp_path, LANGUAGES="english")


def test_settings_name_error_names_line_and_hint(tmp_path):
    with pytest.raises(bot.ConfigError, match=r"line 2: NameError.*capitals"):
        make_settings(tmp_path, "DRY_RUN = false\n")


def test_base_url_with_api_path_rejected():
    with pytest.raises(bot.ConfigError, match="remove the path"):
        bot.check_base_url("https://example.social/api/v1")


def test_network_error_described_briefly():
    err = bot.requests.ConnectionError(
        "HTTPConnectionPool(host='127.0.0.1', port=1): Max retries exceeded "
        "(Caused by NewConnectionError(... [Errno 111] Connection refused))"
    )
    assert bot.describe_error(err) == "connection refused"


def test_config_from_example_keeps_non_latin_tags(tmp_path, monkeypatch):
    answers = iter(["日本語, #Ærø"])
    monkeypatch.setattr("builtins.input", lambda prompt: next(answers))
    config = tmp_path / "config.py"
    bot.write_config_from_example(config)
    assert bot.load_settings(config, {}).HASHTAGS == ["日本語", "aero"]


def check_state_file_line(path: Path) -> str:
    output = io.StringIO()
    bot.Checker(out=output).check_state_file(path)
    return output.getvalue().strip()


def test_check_state_file_saved_pause_warns(tmp_path):
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"positions": {}, "pause_until": 4e9}), "utf-8")
    assert check_state_file_line(path).startswith("WARN state file: actions are paused")


def test_check_state_file_corrupt_warns(tmp_path):
    path = tmp_path / "state.json"
    path.write_bytes(b"\x89PNG\x00")
    assert check_state_file_line(path).startswith("WARN state file:")


def test_check_state_file_missing_folder_fails(tmp_path):
    line = check_state_file_line(tmp_path / "missing" / "state.json")
    assert line.startswith("FAIL state file:")
