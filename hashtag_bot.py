#!/usr/bin/env python3
"""Boost (or favourite, bookmark, reply to) Mastodon posts that carry a hashtag.

The bot listens to each hashtag in ``HASHTAGS`` through the streaming API and
acts on every public post that passes its rules (see ``config.example.py``).
It never acts on its own posts, boosts, private posts, bots, or authors who
opted out with a tag such as ``#nobot`` in their bio, nor on posts that the
owner's keyword filters hide. Between actions it waits ``ACTION_DELAY_SECONDS``, and
it leaves each author alone for ``USER_COOLDOWN_SECONDS`` after acting on them.

Run it with ``.venv/bin/python hashtag_bot.py`` and stop it with Ctrl+C or
SIGTERM. The instance and the token come from ``.env``
(``MASTODON_API_BASE_URL``, ``MASTODON_ACCESS_TOKEN``), and the behaviour from
``config.py``. Any setting can also be given as an environment variable of the
same name.

Guarantees: the position of each hashtag (the newest post fully handled) is
saved to ``STATE_FILE`` after every post, atomically. On every start and every
reconnect the bot reads the hashtag's REST timeline from that position. So a
post published while the stream was down is still handled, and a post already
acted on is not acted on again, even after a crash. A crash can repeat at most
the one action in flight: a repeated boost, favourite or bookmark changes
nothing, and a repeated reply carries the same ``Idempotency-Key``.

Limits: see the README. In short, Mastodon gives remote posts ids from their
publication time, so a remote post that federates late with an id older than
the saved position is only seen if the stream delivers it; and a catch-up acts
on at most ``CATCH_UP_MAX`` posts, logging how many it skipped.
"""

import argparse
import contextlib
import difflib
import fcntl
import html
import ipaddress
import json
import logging
import os
import random
import re
import runpy
import signal
import sys
import tempfile
import threading
import time
import traceback
import unicodedata
import warnings
from collections import Counter, OrderedDict, deque
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import quote, urlsplit

try:
    import requests
    import urllib3
    from dotenv import dotenv_values
    from mastodon import (
        Mastodon,
        MastodonAPIError,
        MastodonError,
        MastodonIllegalArgumentError,
        MastodonMalformedEventError,
        MastodonNetworkError,
        MastodonNotFoundError,
        MastodonRatelimitError,
        MastodonServerError,
        MastodonUnauthorizedError,
        StreamListener,
    )
    from mastodon.errors import MastodonWarning
except ImportError as missing:  # the dependencies live in the virtual environment
    print(
        f"hashtag_bot: error: the package {missing.name} is not installed for "
        f"{sys.executable}; run the bot with .venv/bin/python hashtag_bot.py "
        "(README, 'Install and run')",
        file=sys.stderr,
    )
    raise SystemExit(2) from None

__version__ = "1.0.0"

log = logging.getLogger("hashtag_bot")

SCRIPT_DIR = Path(__file__).resolve().parent
DEFAULT_CONFIG_PATH = SCRIPT_DIR / "config.py"
DEFAULT_ENV_PATH = SCRIPT_DIR / ".env"
USER_AGENT = f"hashtag_bot/{__version__}"

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_USAGE = 2

# Mastodon.py waits 300 s for a REST response by default, far too long for a
# bot that must notice outages and stop within 5 seconds.
REQUEST_TIMEOUT_SECONDS = 30.0

# Reconnect backoff of a stream: about 1 s, doubling, at most 5 minutes, with
# jitter. A connection that stayed open this long resets the backoff.
STREAM_BACKOFF_INITIAL_SECONDS = 1.0
STREAM_BACKOFF_MAX_SECONDS = 300.0
HEALTHY_CONNECTION_SECONDS = 30.0

# Retries of one action or REST read after a 5xx or a network error.
RETRY_ATTEMPTS = 4
RETRY_BACKOFF_INITIAL_SECONDS = 1.0
RETRY_BACKOFF_MAX_SECONDS = 30.0

# A 429 without a usable X-RateLimit-Reset: pause 1 minute, doubling, at most
# 30 minutes. A reset further away than the longest Mastodon window (new posts,
# 3 hours) is treated as bogus and capped.
RATELIMIT_BACKOFF_INITIAL_SECONDS = 60.0
RATELIMIT_BACKOFF_MAX_SECONDS = 1800.0
RATELIMIT_PAUSE_MAX_SECONDS = 3 * 3600.0

# The hashtag REST timeline returns at most 40 posts a page (Mastodon 4.x).
TIMELINE_PAGE_SIZE = 40
# After CATCH_UP_MAX posts, a catch-up only counts what it skips, up to this.
SKIP_COUNT_MAX_PAGES = 25

# Reconciliation ignores posts younger than this: the stream may still be
# delivering them, and counting them as missed would be a false alarm.
RECONCILE_GRACE_SECONDS = 30.0
# Reconciliations in a row that find missed posts before the bot polls instead.
RECONCILE_MISSES_BEFORE_POLLING = 3
# Stream connects in a row refused with 401, 403 or 404 before the bot polls.
REFUSED_CONNECTS_BEFORE_POLLING = 3
# Empty or malformed events in a row, with no post between, before it polls.
EMPTY_EVENTS_BEFORE_POLLING = 3
# In polling mode, how often the bot tries the stream again.
STREAM_RETRY_SECONDS = 1800.0

ACTION_WINDOW_SECONDS = 3600.0
SUMMARY_INTERVAL_SECONDS = 3600.0
# Blocks, mutes and domain blocks of the bot account are read again this often.
BLOCKLIST_REFRESH_SECONDS = 3600.0
# How many acted-on post ids the state file keeps, and how many handled post ids
# (acted on or skipped) the bot remembers in memory.
ACTED_IDS_MAX = 2000
HANDLED_IDS_MAX = 5000
DELETED_IDS_MAX = 1000
# On Ctrl+C or SIGTERM, how long the bot lets an action in flight finish.
STOP_GRACE_SECONDS = 3.0
# Authors past the cooldown are forgotten at most this often.
PRUNE_INTERVAL_SECONDS = 60.0
# Identical warnings within this window are counted instead of printed.
REPEAT_WINDOW_SECONDS = 60.0

ACTION_NAMES = ("boost", "favourite", "bookmark", "reply")
VISIBILITIES = ("public", "unlisted", "private", "direct")
# OAuth scopes each action needs, and what reading needs (Mastodon 4.x).
ACTION_SCOPES = {
    "boost": "write:statuses",
    "favourite": "write:favourites",
    "bookmark": "write:bookmarks",
    "reply": "write:statuses",
}
READ_SCOPES = (
    "read:statuses",
    "read:accounts",
    "read:filters",
    "read:blocks",
    "read:mutes",
)

# Each setting's kind and default; config.example.py explains them.
SETTINGS_SPEC: dict[str, tuple[str, Any]] = {
    "HASHTAGS": ("list", None),
    "ACTIONS": ("list", ["boost"]),
    "REPLY_TEXT": ("str", ""),
    "REPLY_VISIBILITY": ("str", "unlisted"),
    "ACTION_DELAY_SECONDS": ("float", 5.0),
    "USER_COOLDOWN_SECONDS": ("float", 60.0),
    "STREAM_TIMEOUT_SECONDS": ("float", 60.0),
    "LOCAL_ONLY": ("bool", False),
    "DRY_RUN": ("bool", False),
    "STATE_FILE": ("str", "hashtag_bot_state.json"),
    "CATCH_UP_MAX": ("int", 200),
    "RECONCILE_SECONDS": ("float", 300.0),
    "POLL_SECONDS": ("float", 60.0),
    "MAX_ACTIONS_PER_HOUR": ("int", 60),
    "OPT_OUT_TAGS": ("list", ["nobot", "nobots", "noboost"]),
    "SKIP_BOTS": ("bool", True),
    "SKIP_REPLIES": ("bool", False),
    "SKIP_SENSITIVE": ("bool", False),
    "LANGUAGES": ("list", []),
    "SKIP_UNKNOWN_LANGUAGE": ("bool", False),
    "MAX_HASHTAGS": ("int", 8),
    "DENY_ACCOUNTS": ("list", []),
    "SKIP_FILTER_WARN": ("bool", False),
}
CREDENTIAL_NAMES = ("MASTODON_API_BASE_URL", "MASTODON_ACCESS_TOKEN")
TRUE_WORDS = ("true", "yes", "1")
FALSE_WORDS = ("false", "no", "0")


class ConfigError(Exception):
    """A setting, file or credential the user must fix (exit status 2)."""


class FatalError(Exception):
    """A runtime failure the bot cannot carry on from (exit status 1)."""


class StopRequested(BaseException):
    """Raised in the main thread by the Ctrl+C and SIGTERM handler.

    A BaseException, like KeyboardInterrupt: the handler raises it wherever the
    main thread is, and ``except Exception`` blocks there (logging's emit,
    Thread.start) would swallow it or leave their state broken.
    """


class Paused(Exception):
    """Actions are paused (rate limit or hourly budget) until a deadline."""


class Unreachable(Exception):
    """The instance was unreachable after retries; resume from the position."""


class SkipPost(Exception):
    """The server rejected the action on this post (404, 403, 422)."""


class StreamRestart(Exception):
    """Leaves ``stream_hashtag`` so that its loop reconnects; carries why."""


class Settings:
    """The validated settings, as attributes named like the settings."""

    def __init__(self, values: dict[str, Any]):
        self.__dict__.update(values)


class Credentials:
    """The instance URL and the access token (never logged)."""

    def __init__(self, base_url: str, token: str):
        self.base_url = base_url
        self.token = token

    def __repr__(self) -> str:
        return f"Credentials({self.base_url!r}, token=<hidden>)"


# --- Settings loading --------------------------------------------------------


def parse_setting(name: str, raw: Any, from_environment: bool) -> Any:
    """Convert one raw setting to its kind, or raise ConfigError naming it."""
    kind = SETTINGS_SPEC[name][0]
    where = "environment variable" if from_environment else "setting"
    fix = f"fix {name} in the environment or in config.py"

    if kind == "list":
        if isinstance(raw, str):
            return [item.strip() for item in raw.split(",") if item.strip()]
        if isinstance(raw, (list, tuple, set)) and all(
            isinstance(item, str) for item in raw
        ):
            return [item.strip() for item in raw if item.strip()]
        raise ConfigError(
            f"invalid {where} {name}={raw!r}: expected a list of strings, "
            f'like ["a", "b"] (or a,b in the environment); {fix}'
        )
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in TRUE_WORDS:
            return True
        if isinstance(raw, str) and raw.strip().lower() in FALSE_WORDS:
            return False
        raise ConfigError(
            f"invalid {where} {name}={raw!r}: expected true or false "
            f"(also yes/no/1/0); {fix}"
        )
    if kind in ("float", "int"):
        number: Any = raw
        if isinstance(raw, str):
            try:
                number = float(raw.strip()) if kind == "float" else int(raw.strip())
            except ValueError:
                number = None
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            unit = "a number" if kind == "float" else "a whole number"
            raise ConfigError(f"invalid {where} {name}={raw!r}: expected {unit}; {fix}")
        if kind == "int" and number != int(number):
            raise ConfigError(
                f"invalid {where} {name}={raw!r}: expected a whole number; {fix}"
            )
        if number != number or number in (float("inf"), float("-inf")) or number < 0:
            raise ConfigError(
                f"invalid {where} {name}={raw!r}: expected a number of 0 or more; {fix}"
            )
        return float(number) if kind == "float" else int(number)
    if isinstance(raw, os.PathLike):
        return os.fspath(raw)
    if not isinstance(raw, str):
        raise ConfigError(f"invalid {where} {name}={raw!r}: expected a string; {fix}")
    return raw


def read_config_file(path: Path) -> dict[str, Any]:
    """Run config.py and return its upper-case names, or raise ConfigError."""
    try:
        namespace = runpy.run_path(str(path))
    except FileNotFoundError as err:
        raise ConfigError(
            f"config file not found: {path}; copy config.example.py to config.py "
            "and set HASHTAGS, or pass --config PATH"
        ) from err
    except SyntaxError as err:
        raise ConfigError(
            f"invalid config file {path}, line {err.lineno}: {err.msg}; "
            "fix the Python syntax there"
        ) from err
    except OSError as err:
        raise ConfigError(
            f"cannot read config file {path} ({err.strerror}); the bot must run "
            "as a user who may read it"
        ) from err
    except Exception as err:  # noqa: BLE001 - any error in the user's file
        line = next(
            (
                frame.lineno
                for frame in reversed(traceback.extract_tb(err.__traceback__))
                if Path(frame.filename) == path
            ),
            "?",
        )
        hint = ""
        if isinstance(err, NameError):
            hint = " (write True and False with capitals, and text in quotes)"
        raise ConfigError(
            f"invalid config file {path}, line {line}: {type(err).__name__}: "
            f"{err}{hint}; fix that line"
        ) from err
    values = {}
    for key, value in namespace.items():
        if not key.isupper() or key.startswith("_"):
            continue
        if key not in SETTINGS_SPEC:
            close = difflib.get_close_matches(key, list(SETTINGS_SPEC), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(
                f"unknown setting {key} in {path}{hint} "
                "(config.example.py lists every setting)"
            )
        values[key] = value
    return values


def load_settings(
    config_path: Optional[Path],
    environ: dict[str, str],
    overrides: Optional[dict[str, Any]] = None,
) -> Settings:
    """Merge defaults, config.py and the environment into validated Settings.

    ``config_path`` None means the default file beside the script, which may be
    missing when HASHTAGS is given in the environment (a systemd unit).
    """
    explicit = config_path is not None
    path = Path(config_path) if explicit else DEFAULT_CONFIG_PATH
    file_values: dict[str, Any] = {}
    if path.exists() or explicit or "HASHTAGS" not in environ:
        file_values = read_config_file(path)

    values: dict[str, Any] = {}
    for name, (_kind, default) in SETTINGS_SPEC.items():
        if name in environ:
            values[name] = parse_setting(name, environ[name], from_environment=True)
        elif name in file_values:
            values[name] = parse_setting(name, file_values[name], False)
        else:
            values[name] = default
    values.update(overrides or {})
    validate_settings(values, path)
    return Settings(values)


def validate_settings(values: dict[str, Any], config_path: Path) -> None:
    """Check the settings that depend on each other; normalise the hashtags."""
    if not values["HASHTAGS"]:
        raise ConfigError(
            f"missing setting HASHTAGS: set at least one hashtag in {config_path}, "
            'for example HASHTAGS = ["python"]'
        )
    tags = []
    for raw in values["HASHTAGS"]:
        tag = normalize_tag(raw)
        if not tag or not is_valid_tag(tag) or not is_hashtag_text(raw):
            raise ConfigError(
                f"invalid hashtag {raw!r} in HASHTAGS: a hashtag has letters, "
                "digits and _ only (no spaces, + or -), with or without a leading #"
            )
        if tag not in tags:
            tags.append(tag)
    values["HASHTAGS"] = tags

    actions = [action.strip().lower() for action in values["ACTIONS"]]
    for action in actions:
        if action not in ACTION_NAMES:
            raise ConfigError(
                f"unknown action {action!r} in ACTIONS: use one or more of "
                + ", ".join(ACTION_NAMES)
            )
    if not actions:
        raise ConfigError(
            "missing ACTIONS: set at least one of " + ", ".join(ACTION_NAMES)
        )
    values["ACTIONS"] = list(dict.fromkeys(actions))
    if "reply" in actions and not values["REPLY_TEXT"].strip():
        raise ConfigError(
            "missing setting REPLY_TEXT: ACTIONS contains reply, so set the text "
            "of the reply in REPLY_TEXT (it follows the author's @mention)"
        )
    visibility = values["REPLY_VISIBILITY"].strip().lower()
    if visibility not in VISIBILITIES:
        raise ConfigError(
            f"invalid REPLY_VISIBILITY {values['REPLY_VISIBILITY']!r}: use one of "
            + ", ".join(VISIBILITIES)
        )
    values["REPLY_VISIBILITY"] = visibility
    if values["STREAM_TIMEOUT_SECONDS"] <= 0:
        raise ConfigError(
            "invalid STREAM_TIMEOUT_SECONDS 0: use a number of seconds above 0, "
            "such as 60 (Mastodon sends a heartbeat every 15 s)"
        )
    for name in ("POLL_SECONDS", "RECONCILE_SECONDS"):
        if values[name] <= 0:
            raise ConfigError(f"invalid {name} {values[name]!r}: use seconds above 0")
    if values["MAX_ACTIONS_PER_HOUR"] < 1:
        raise ConfigError(
            "invalid MAX_ACTIONS_PER_HOUR 0: use 1 or more (60 is a safe default)"
        )
    values["OPT_OUT_TAGS"] = [normalize_tag(t) for t in values["OPT_OUT_TAGS"]]
    for tag in tags:
        if tag in values["OPT_OUT_TAGS"]:
            raise ConfigError(
                f"HASHTAGS contains #{tag}, which is also in OPT_OUT_TAGS: every post "
                "with it would be skipped; remove it from one of them"
            )
    values["LANGUAGES"] = [lang.strip().lower() for lang in values["LANGUAGES"]]
    for language in values["LANGUAGES"]:
        if not re.fullmatch(r"[a-z]{2,3}", language):
            raise ConfigError(
                f"invalid language {language!r} in LANGUAGES: use ISO 639-1 codes "
                'such as "en" or "de"'
            )
    values["DENY_ACCOUNTS"] = [parse_deny_entry(e) for e in values["DENY_ACCOUNTS"]]
    state_file = Path(values["STATE_FILE"]).expanduser()
    if not state_file.is_absolute():
        state_file = SCRIPT_DIR / state_file
    values["STATE_FILE"] = state_file


def parse_deny_entry(entry: str) -> str:
    """Lower-case a DENY_ACCOUNTS entry: ``user``, ``user@domain`` or ``@domain``."""
    text = entry.strip().lower()
    if text.startswith("@") and text.count("@") == 1 and len(text) > 1:
        return text
    text = text.lstrip("@")
    if re.fullmatch(r"[a-z0-9_.-]+(@[a-z0-9.-]+)?", text):
        return text
    raise ConfigError(
        f"invalid DENY_ACCOUNTS entry {entry!r}: use user@domain, a local user, "
        "or @domain for a whole domain"
    )


def load_credentials(env_path: Optional[Path], environ: dict[str, str]) -> Credentials:
    """Read the instance URL and token from the environment, then ``.env``."""
    path = Path(env_path) if env_path is not None else DEFAULT_ENV_PATH
    in_environment = all(environ.get(name) for name in CREDENTIAL_NAMES)
    if env_path is not None and not path.exists() and not in_environment:
        raise ConfigError(
            f"env file not found: {path}; check the --env-file path, or run "
            f".venv/bin/python hashtag_bot.py --env-file {path} --login "
            "https://your.instance "
            "to create it"
        )
    try:
        file_values = {k: v for k, v in dotenv_values(path).items() if v is not None}
    except OSError as err:
        raise ConfigError(
            f"cannot read env file {path} ({err.strerror}); run the bot as the user "
            "who owns it, or give that user the file (chown)"
        ) from err
    merged = {**file_values, **{k: v for k, v in environ.items() if v}}
    base_url = merged.get("MASTODON_API_BASE_URL", "").strip()
    token = merged.get("MASTODON_ACCESS_TOKEN", "").strip()
    for name, value in zip(CREDENTIAL_NAMES, (base_url, token)):
        if not value:
            raise ConfigError(
                f"missing {name}: set it in {path} or in the environment "
                "(see the README, 'Get a token by hand'), or run "
                ".venv/bin/python hashtag_bot.py --login https://your.instance"
            )
    if re.search(r"\s", token):
        raise ConfigError(
            "invalid MASTODON_ACCESS_TOKEN: it contains white space; copy the "
            "token again from Preferences > Development"
        )
    return Credentials(check_base_url(base_url), token)


def check_base_url(raw: str) -> str:
    """Return the base URL without a trailing slash, or raise ConfigError.

    The token travels only over https; plain http is allowed for loopback hosts
    (local testing) alone.
    """
    url = raw if "://" in raw else "https://" + raw
    parts = urlsplit(url)
    host = parts.hostname or ""
    problem = ""
    if parts.scheme not in ("http", "https") or not host:
        problem = "expected https://your.instance"
    elif parts.query or parts.fragment or parts.username:
        problem = "expected just https://your.instance, without ?, # or user@"
    elif "/api/" in parts.path + "/":
        problem = "remove the path, expected just https://your.instance"
    elif parts.scheme == "http" and not is_loopback_host(host):
        problem = "the token is only sent over https; use https://" + parts.netloc
    if problem:
        raise ConfigError(f"invalid MASTODON_API_BASE_URL {raw!r}: {problem}")
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as err:
        raise ConfigError(
            f"invalid MASTODON_API_BASE_URL {raw!r}: bad port; "
            "expected https://your.instance"
        ) from err
    return url.rstrip("/")


def is_loopback_host(host: str) -> bool:
    """Return True for localhost, 127.0.0.0/8 and ::1."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- Pure helpers: tags, text, ids, time -------------------------------------

# Letters Mastodon's ASCII folding maps that Unicode decomposition does not.
ASCII_FOLDS = {
    "ß": "ss", "æ": "ae", "ø": "o", "œ": "oe", "đ": "d", "ð": "d",
    "ł": "l", "þ": "th", "ı": "i", "ħ": "h",
}  # fmt: skip
# Characters Mastodon keeps in a tag besides letters, digits and marks.
TAG_SEPARATORS = "_\u00b7\u30fb\u200c"
HASHTAG_IN_TEXT = re.compile(r"#([^\s#.,;:!?()\[\]{}<>\"'/@]+)")
HTML_TAG = re.compile(r"<[^>]*>")
BLOCK_END = re.compile(r"</p>|<br\s*/?>", re.IGNORECASE)


def normalize_tag(name: str) -> str:
    """Normalise a hashtag the way Mastodon 4.x does, without the ``#``.

    NFKC, lower case, accents folded to ASCII on Latin letters, and every
    character other than letters, digits, marks, ``_`` and a few joiners
    removed. ``#Café``, ``cafe`` and ``CAFÉ`` all give ``cafe``.
    NOTE: Mastodon folds with a table of its own (ASCIIFolding); this
    decomposition covers the Latin letters, not every entry of that table.
    """
    text = unicodedata.normalize("NFKC", name.strip().lstrip("#")).lower()
    folded = []
    for char in unicodedata.normalize("NFKD", text):
        if unicodedata.combining(char) and folded and folded[-1].isascii():
            continue
        folded.append(ASCII_FOLDS.get(char, char))
    text = unicodedata.normalize("NFC", "".join(folded))
    return "".join(
        char
        for char in text
        if char.isalnum()
        or char in TAG_SEPARATORS
        or unicodedata.category(char) in ("Mn", "Mc")
    )


def is_hashtag_text(raw: str) -> bool:
    """Return True if ``raw`` is one hashtag as written: no spaces, no ``+-.``.

    Mastodon would read ``#c++`` as ``#c`` and ``#foo-bar`` as ``#foo``, so
    such a setting would watch another tag than the user meant.
    """
    text = unicodedata.normalize("NFKC", raw.strip()).lstrip("#")
    return all(
        char.isalnum()
        or char in TAG_SEPARATORS
        or unicodedata.category(char) in ("Mn", "Mc")
        for char in text
    )


def is_valid_tag(tag: str) -> bool:
    """Return True if ``tag`` is safe to put in a stream or timeline URL."""
    return bool(tag) and not tag.isdigit() and "/" not in tag and "%" not in tag


def html_to_text(markup: str) -> str:
    """Return the text of Mastodon HTML: tags removed, entities decoded."""
    return html.unescape(HTML_TAG.sub("", BLOCK_END.sub("\n", markup or "")))


def hashtags_in_text(text: str) -> list[str]:
    """Return the normalised hashtags written in plain text."""
    return [normalize_tag(match) for match in HASHTAG_IN_TEXT.findall(text)]


def id_key(status_id: Any) -> tuple[int, str]:
    """Return a sort key for ids: numeric strings and ULIDs both sort by it.

    Mastodon ids are growing decimal strings, GoToSocial's are fixed-length
    ULIDs: comparing by length, then text, orders both kinds correctly.
    """
    text = str(status_id)
    return (len(text), text)


def newer_id(first: str, second: str) -> str:
    """Return the newer of two ids; an empty id is older than any."""
    if not first:
        return second
    if not second:
        return first
    return max(first, second, key=id_key)


def to_datetime(value: Any) -> Optional[datetime]:
    """Return an aware datetime from a datetime or an ISO 8601 string."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
    return None


def parse_ratelimit_reset(value: str) -> Optional[float]:
    """Return X-RateLimit-Reset as a Unix time, or None if it is unusable.

    Mastodon sends ISO 8601, GoToSocial a Unix timestamp in seconds.
    """
    text = (value or "").strip()
    if re.fullmatch(r"\d{1,12}(\.\d+)?", text):
        return float(text)
    moment = to_datetime(text)
    if moment is None:
        # Python 3.9 reads only 3 or 6 digits of a fraction of a second.
        moment = to_datetime(re.sub(r"(\.\d+)", "", text))
    return moment.timestamp() if moment else None


def parse_http_date(value: str) -> Optional[float]:
    """Return an HTTP Date header as a Unix time, or None."""
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


class Backoff:
    """Exponential backoff with jitter: each wait is half to all of the step."""

    def __init__(self, initial: float, maximum: float, jitter: bool = True):
        self.initial = initial
        self.maximum = maximum
        self.jitter = jitter
        self.step = initial

    def next_delay(self) -> float:
        """Return the next wait in seconds and double the step."""
        step = self.step
        self.step = min(self.step * 2, self.maximum)
        return random.uniform(step / 2, step) if self.jitter else step

    def reset(self) -> None:
        self.step = self.initial


# --- The rules ---------------------------------------------------------------


def field(obj: Any, name: str, default: Any = None) -> Any:
    """Return ``obj[name]`` for the dicts Mastodon.py returns, else default."""
    if isinstance(obj, dict):
        # dict.get skips the Python-level lookup of Mastodon.py's
        # AttribAccessDict, which made decisions on Status objects 4x slower.
        value = dict.get(obj, name, default)
        return default if value is None else value
    return default


def account_opt_out_tags(account: Any) -> list[str]:
    """Return the normalised hashtags in an account's bio and field values."""
    texts = [html_to_text(field(account, "note", ""))]
    for profile_field in field(account, "fields", []) or []:
        texts.append(html_to_text(field(profile_field, "value", "")))
    return [tag for text in texts for tag in hashtags_in_text(text)]


def status_tags(status: Any) -> list[str]:
    """Return the normalised names of a status's hashtags."""
    return [
        normalize_tag(str(field(tag, "name", "")))
        for tag in field(status, "tags", []) or []
        if field(tag, "name")
    ]


def acct_domain(acct: str, local_domain: str) -> tuple[str, str]:
    """Split ``user@domain`` (a local account has no domain) into both parts."""
    user, _, domain = acct.lower().partition("@")
    return user, domain or local_domain


def skip_reason(status: Any, settings: Settings, me: dict[str, Any]) -> str:
    """Return why a post must not be acted on, or "" if the rules allow it.

    ``me`` holds the bot account's ``id``, its ``domain`` and the sets
    ``blocked_ids`` and ``blocked_domains`` (its blocks, mutes and domain
    blocks). Time-dependent rules (cooldown, already handled) live in the bot.
    """
    account = field(status, "account", {})
    if field(status, "reblog"):
        return "boost of another post"
    if str(field(account, "id", "")) == me["id"]:
        return "own post"
    visibility = field(status, "visibility", "")
    if visibility not in ("public", "unlisted"):
        return f"not public or unlisted ({visibility or 'no visibility'})"
    acct = str(field(account, "acct", ""))
    user, domain = acct_domain(acct, me["domain"])
    if str(field(account, "id", "")) in me["blocked_ids"]:
        return "author blocked or muted by the bot account"
    if domain in me["blocked_domains"]:
        return "domain blocked by the bot account"
    deny = settings.DENY_ACCOUNTS
    if "@" + domain in deny or f"{user}@{domain}" in deny:
        return "author in DENY_ACCOUNTS"
    if domain == me["domain"] and user in deny:
        return "author in DENY_ACCOUNTS"
    if settings.SKIP_BOTS and field(account, "bot", False):
        return "author is a bot (SKIP_BOTS)"
    opt_out = set(settings.OPT_OUT_TAGS)
    if opt_out.intersection(account_opt_out_tags(account)):
        return "author opted out in bio"
    tags = status_tags(status)
    if opt_out.intersection(tags):
        return "post carries an opt-out tag"
    if len(tags) > settings.MAX_HASHTAGS:
        return f"more hashtags than MAX_HASHTAGS ({len(tags)})"
    if settings.SKIP_REPLIES and field(status, "in_reply_to_id"):
        return "reply (SKIP_REPLIES)"
    if settings.SKIP_SENSITIVE and (
        field(status, "sensitive", False) or field(status, "spoiler_text", "")
    ):
        return "sensitive or content warning (SKIP_SENSITIVE)"
    language = str(field(status, "language", "")).lower().split("-")[0]
    if settings.LANGUAGES:
        if not language and settings.SKIP_UNKNOWN_LANGUAGE:
            return "no language (SKIP_UNKNOWN_LANGUAGE)"
        if language and language not in settings.LANGUAGES:
            return f"language not in LANGUAGES ({language})"
    elif not language and settings.SKIP_UNKNOWN_LANGUAGE:
        return "no language (SKIP_UNKNOWN_LANGUAGE)"
    for result in field(status, "filtered", []) or []:
        # Mastodon 4.x annotates a status with every matching filter of the
        # account. A client applies those whose context covers its timeline,
        # which is "public" for hashtag timelines.
        owner_filter = field(result, "filter", {})
        if "public" not in field(owner_filter, "context", ["public"]):
            continue
        action = field(owner_filter, "filter_action", "")
        if action == "hide" or (action == "warn" and settings.SKIP_FILTER_WARN):
            title = field(owner_filter, "title", "")
            return f"hidden by the owner's filter ({action}: {title!r})"
    return ""


def reply_skip_reason(status: Any, me: dict[str, Any]) -> str:
    """Return why the bot must not reply to this post, or "".

    Replies start reply loops: never to a bot, to a post that mentions the bot
    account, or to a post that replies to the bot.
    """
    if field(field(status, "account", {}), "bot", False):
        return "author is a bot"
    if any(str(field(m, "id", "")) == me["id"] for m in field(status, "mentions", [])):
        return "post mentions the bot account"
    if str(field(status, "in_reply_to_account_id", "")) == me["id"]:
        return "post replies to the bot account"
    return ""


def reply_text(settings: Settings, acct: str, tag: str) -> str:
    """Return the reply: the author's mention, then REPLY_TEXT filled in."""
    text = settings.REPLY_TEXT.replace("{acct}", acct).replace("{tag}", tag)
    return f"@{acct} {text}"


# --- State file --------------------------------------------------------------


class State:
    """The saved position: what survives a restart, written atomically.

    ``positions`` maps each tag to the id of the newest post fully handled, or
    "" for a timeline that was empty. ``acted`` keeps the ids acted on
    recently and ``authors`` each author's last action time (Unix seconds).
    ``action_times`` lists the actions of the last hour, and ``pause_until`` is
    the deadline of a rate-limit or hourly-limit pause.
    """

    def __init__(self, path: Path):
        self.path = path
        self.existed = False
        self.positions: dict[str, str] = {}
        self.acted: OrderedDict[str, None] = OrderedDict()
        self.authors: dict[str, float] = {}
        self.action_times: deque = deque()
        self.pause_until = 0.0
        # "ratelimit" or "budget": a budget pause ends early if the limit grew.
        self.pause_kind = ""

    def load(self) -> None:
        """Read the file; move a corrupt one aside and start as on a first run."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as err:
            log.warning(
                "cannot read state file %s (%s); starting fresh", self.path, err
            )
            return
        try:
            data = json.loads(raw.decode("utf-8"))
            positions = {str(k): str(v) for k, v in data["positions"].items()}
            acted = [str(i) for i in data.get("acted", [])]
            authors = {str(k): float(v) for k, v in data.get("authors", {}).items()}
            action_times = sorted(float(t) for t in data.get("action_times", []))
            pause_until = float(data.get("pause_until") or 0.0)
            pause_kind = str(data.get("pause_kind") or "")
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            if isinstance(err, KeyError):
                err = ValueError(f"the field {err.args[0]!r} is missing")
            aside = self.path.with_name(
                f"{self.path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
            )
            try:
                os.replace(self.path, aside)
                moved = f"moved it to {aside}"
            except OSError as move_err:
                moved = f"could not move it aside: {move_err}"
            log.warning(
                "state file %s is corrupt (%s); %s and starting as on a first run",
                self.path,
                err,
                moved,
            )
            return
        self.existed = True
        self.positions = positions
        self.acted = OrderedDict((i, None) for i in acted[-ACTED_IDS_MAX:])
        self.authors = authors
        self.action_times = deque(action_times)
        self.pause_until = pause_until
        self.pause_kind = pause_kind

    def save(self) -> None:
        """Write the file atomically: temporary file, flush, fsync, rename."""
        data = {
            "version": 1,
            "positions": self.positions,
            "acted": list(self.acted),
            "authors": self.authors,
            "action_times": list(self.action_times),
            "pause_until": self.pause_until or None,
            "pause_kind": self.pause_kind or None,
        }
        directory = self.path.parent
        fd, temporary = tempfile.mkstemp(
            prefix=self.path.name + ".", suffix=".tmp", dir=str(directory)
        )
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(data, handle, separators=(",", ":"))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        if hasattr(os, "O_DIRECTORY"):
            # The rename itself survives a power cut only once the directory is
            # on disk too.
            dir_fd = os.open(str(directory), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def remember_action(self, status_id: str, author_id: str, now: float) -> None:
        self.acted[status_id] = None
        while len(self.acted) > ACTED_IDS_MAX:
            self.acted.popitem(last=False)
        self.authors[author_id] = now

    def prune(self, now: float, cooldown: float) -> None:
        """Forget authors past the cooldown and actions older than an hour."""
        self.authors = {a: t for a, t in self.authors.items() if now - t < cooldown}
        while self.action_times and now - self.action_times[0] >= ACTION_WINDOW_SECONDS:
            self.action_times.popleft()


# --- Logging -----------------------------------------------------------------


class RedactingFilter(logging.Filter):
    """Removes the token from every record, and counts repeated warnings."""

    def __init__(self, secret: str = ""):
        super().__init__()
        self.secret = secret
        self.last_seen: dict[str, tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.secret and self.secret in message:
            message = message.replace(self.secret, "<token>")
            record.msg, record.args = message, None
        if record.levelno != logging.WARNING:
            return True
        now = time.monotonic()
        seen_at, suppressed = self.last_seen.get(message, (0.0, 0))
        if now - seen_at < REPEAT_WINDOW_SECONDS:
            self.last_seen[message] = (seen_at, suppressed + 1)
            return False
        if len(self.last_seen) > 1000:
            self.last_seen.clear()
        self.last_seen[message] = (now, 0)
        if suppressed:
            record.msg, record.args = f"{message} (repeated {suppressed} times)", None
        return True


def configure_logging(verbose: bool) -> RedactingFilter:
    """Log to stderr; without timestamps when systemd's journal adds them."""
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter(
                "%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"
            )
        )
    redactor = RedactingFilter()
    handler.addFilter(redactor)
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False
    return redactor


# --- The listener ------------------------------------------------------------


class HashtagListener(StreamListener):
    """Hands each post of one hashtag stream to the bot, in the stream's thread.

    Malformed events are logged and skipped, so that one bad line does not cost
    the connection; the reconciliation finds any post they may have hidden.
    """

    def __init__(self, watcher: "TagWatcher"):
        super().__init__()
        self.watcher = watcher

    def on_update(self, status):
        self.watcher.on_post(status, edited=False)

    def on_status_update(self, status):
        # Mastodon 4.x sends an edit that adds a watched tag only as
        # status.update; Mastodon.py 2.3.3 passes a plain dict here.
        self.watcher.on_post(status, edited=True)

    def on_delete(self, status_id):
        self.watcher.bot.remember_deleted(str(status_id))

    def on_unknown_event(self, name, unknown_event=None):
        log.debug("#%s: ignored stream event %r", self.watcher.tag, name)

    def handle_heartbeat(self):
        self.watcher.on_heartbeat()

    def _dispatch(self, event):
        # Mastodon.py 2.3.3 raises MastodonMalformedEventError from here and so
        # ends the stream; this keeps the connection and logs the event.
        try:
            super()._dispatch(event)
        except MastodonMalformedEventError as err:
            self.watcher.on_malformed(event, err)

    def _parse_line(self, line, event):
        try:
            return super()._parse_line(line, event)
        except MastodonMalformedEventError as err:
            self.watcher.on_malformed({"line": line}, err)
            return event


# --- The bot -----------------------------------------------------------------


class HashtagBot:
    """Watches the hashtags and acts on their posts; ``run()`` until ``stop()``.

    Every post, streamed or read from the REST timeline, goes through
    ``handle_post`` under one lock, so actions of all hashtags are serialised
    and spaced by ACTION_DELAY_SECONDS. ``clock`` (Unix seconds) and ``sleep``
    (returns True once the bot is stopping) can be replaced by tests.
    """

    def __init__(
        self,
        settings: Settings,
        credentials: Credentials,
        clock: Callable[[], float] = time.time,
        sleep: Optional[Callable[[float], bool]] = None,
    ):
        self.settings = settings
        self.credentials = credentials
        self.clock = clock
        self.stop_event = threading.Event()
        self._sleep = sleep or self.stop_event.wait
        self.lock = threading.RLock()
        self.deleted_lock = threading.Lock()
        self.api = self.make_client()
        self.state = State(settings.STATE_FILE)
        self.me: dict[str, Any] = {}
        self.handled: OrderedDict[str, None] = OrderedDict()
        self.deleted: OrderedDict[str, None] = OrderedDict()
        self.stats: Counter = Counter()
        self.skip_reasons: Counter = Counter()
        self.summary_since = clock()
        self.fatal_message = ""
        # The headers of the last 429 seen by this thread's client.
        self.ratelimit_headers = threading.local()
        self.ratelimit_backoff = Backoff(
            RATELIMIT_BACKOFF_INITIAL_SECONDS, RATELIMIT_BACKOFF_MAX_SECONDS, False
        )
        self.blocklists_read_at = 0.0
        self.pruned_at = 0.0
        self.watchers: list[TagWatcher] = []
        self.lock_file: Any = None

    # Clients and calls -------------------------------------------------------

    def make_client(self) -> Mastodon:
        """Return a Mastodon.py client that raises on 429 instead of sleeping."""
        session = requests.Session()
        session.hooks["response"].append(self.inspect_response)
        return Mastodon(
            access_token=self.credentials.token,
            api_base_url=self.credentials.base_url,
            # "wait" would sleep inside a call for up to hours; the bot pauses
            # itself. "none" skips the version check, which in Mastodon.py 2.3.3
            # recurses without end when the instance is unreachable.
            ratelimit_method="throw",
            version_check_mode="none",
            request_timeout=REQUEST_TIMEOUT_SECONDS,
            session=session,
            user_agent=USER_AGENT,
        )

    def inspect_response(self, response, *args, **kwargs):
        """Keep the rate-limit headers of a 429; drop headers that do not parse.

        Mastodon.py 2.3.3 raises MastodonRatelimitError on any response whose
        X-RateLimit-Reset or Date it cannot parse, even a 200.
        """
        headers = response.headers
        reset = headers.get("X-RateLimit-Reset")
        if reset is not None and parse_ratelimit_reset(reset) is None:
            log.warning("ignored an unreadable X-RateLimit-Reset header %r", reset)
            del headers["X-RateLimit-Reset"]
        date = headers.get("Date")
        if date is not None and parse_http_date(date) is None:
            log.warning("ignored an unreadable Date header %r", date)
            del headers["Date"]
        if response.status_code == 429:
            self.ratelimit_headers.last = {
                "reset": headers.get("X-RateLimit-Reset", ""),
                "date": headers.get("Date", ""),
            }
        return response

    def sleep(self, seconds: float) -> bool:
        """Wait, or return True at once if the bot is stopping."""
        if self.stop_event.is_set():
            return True
        return bool(self._sleep(max(0.0, seconds))) or self.stop_event.is_set()

    def call(self, description: str, method: Callable, *args, **kwargs) -> Any:
        """Call the API, mapping every failure class to what the bot does.

        A 401, and a 403 about scopes, stop the bot (FatalError). A 404, any
        other 403 and a 422 raise SkipPost. A 429 pauses all actions (Paused).
        A 5xx (such as a 503 from two racing requests) and a network error are
        retried with backoff. After the last try a 5xx raises SkipPost, and
        the post is skipped with a warning, because the server responded. A network
        error raises Unreachable instead, so the post is caught up once the
        instance is back, and not dropped.
        """
        backoff = Backoff(RETRY_BACKOFF_INITIAL_SECONDS, RETRY_BACKOFF_MAX_SECONDS)
        for attempt in range(1, RETRY_ATTEMPTS + 1):
            self.check_paused()
            try:
                result = method(*args, **kwargs)
            except MastodonRatelimitError as err:
                self.start_ratelimit_pause(description, err)
                raise Paused() from err
            except MastodonUnauthorizedError as err:
                raise FatalError(
                    f"the instance rejected MASTODON_ACCESS_TOKEN (401) while "
                    f"trying to {description}: the token was revoked or is wrong; "
                    "create a new one (README, 'Get a token by hand') and restart"
                ) from err
            except MastodonNotFoundError as err:
                raise SkipPost(f"not found (404): {error_text(err)}") from err
            except MastodonServerError as err:
                failure = describe_error(err)
                unreachable = False
            except MastodonAPIError as err:
                status, text = error_status(err), error_text(err)
                if status == 403 and "scope" in text.lower():
                    scope = ACTION_SCOPES.get(description.split()[0], "read:statuses")
                    raise FatalError(
                        f"the token lacks the scope {scope} needed to {description} "
                        f"({text}); create a token with the scopes "
                        f"{' '.join(needed_scopes(self.settings.ACTIONS))}"
                    ) from err
                raise SkipPost(f"rejected ({status}): {text}") from err
            except (MastodonNetworkError, requests.RequestException) as err:
                failure = f"network error: {describe_error(err)}"
                unreachable = True
            else:
                return result
            if attempt == RETRY_ATTEMPTS:
                break
            delay = backoff.next_delay()
            log.warning(
                "could not %s (%s); retry %d of %d in %.0f s",
                description,
                failure,
                attempt,
                RETRY_ATTEMPTS - 1,
                delay,
            )
            if self.sleep(delay):
                raise Unreachable("stopping")
        if unreachable:
            raise Unreachable(f"could not {description}: {failure}")
        raise SkipPost(f"gave up after {RETRY_ATTEMPTS} attempts: {failure}")

    # Pauses ----------------------------------------------------------------

    def check_paused(self) -> None:
        if self.state.pause_until > self.clock():
            raise Paused()

    def start_ratelimit_pause(self, description: str, err: Exception) -> None:
        """Pause all actions until the server's reset time, or back off."""
        now = self.clock()
        headers = getattr(self.ratelimit_headers, "last", {})
        self.ratelimit_headers.last = {}
        reset = parse_ratelimit_reset(headers.get("reset", ""))
        server_now = parse_http_date(headers.get("date", "")) if reset else None
        if reset is not None:
            # Measure the wait on the server's clock when it sent one: the
            # Raspberry Pi's own clock may be off.
            seconds = reset - (server_now if server_now else now)
            seconds = min(max(seconds, 1.0), RATELIMIT_PAUSE_MAX_SECONDS)
            why = "until the server's X-RateLimit-Reset"
        else:
            seconds = self.ratelimit_backoff.next_delay()
            why = "no usable X-RateLimit-Reset header, backing off"
        self.state.pause_until = max(self.state.pause_until, now + seconds)
        self.state.pause_kind = "ratelimit"
        self.save_state()
        log.warning(
            "rate limited (429) while trying to %s: pausing all actions for %.0f s "
            "(%s), then catching up from the saved position",
            description,
            seconds,
            why,
        )

    def start_budget_pause(self) -> None:
        """Pause actions until the oldest action of the hour leaves the window."""
        resume_at = self.state.action_times[0] + ACTION_WINDOW_SECONDS
        if resume_at > self.state.pause_until:
            self.state.pause_until = resume_at
            self.state.pause_kind = "budget"
        self.save_state()
        log.info(
            "MAX_ACTIONS_PER_HOUR (%d) reached: actions resume at %s; the posts "
            "meanwhile are caught up then, not dropped",
            self.settings.MAX_ACTIONS_PER_HOUR,
            format_time(resume_at),
        )

    def wait_while_paused(self) -> bool:
        """Wait until any pause is over; return True if the bot is stopping."""
        while True:
            remaining = self.state.pause_until - self.clock()
            if remaining <= 0:
                return self.stop_event.is_set()
            if self.sleep(min(remaining, 60.0)):
                return True

    # Start-up ------------------------------------------------------------------

    def start(self) -> None:
        """Verify the token, read the bot account and state; warn about advice."""
        try:
            account = self.call(
                "verify the access token", self.api.account_verify_credentials
            )
        except Unreachable as err:
            raise FatalError(
                f"cannot reach {self.credentials.base_url} ({err}); check "
                "MASTODON_API_BASE_URL and the network"
            ) from err
        except (SkipPost, Paused) as err:
            raise FatalError(
                f"{self.credentials.base_url} did not accept the token check "
                f"({err or 'rate limited'}); is MASTODON_API_BASE_URL a Mastodon "
                "instance?"
            ) from err
        self.me = {
            "id": str(field(account, "id", "")),
            "acct": str(field(account, "acct", "")),
            "domain": self.local_domain(account),
            "blocked_ids": set(),
            "blocked_domains": set(),
        }
        self.state.load()
        self.check_state_file()
        self.check_scopes()
        self.refresh_blocklists()
        log.info(
            "logged in as @%s on %s; watching %s; actions: %s%s",
            self.me["acct"],
            self.credentials.base_url,
            ", ".join("#" + t for t in self.settings.HASHTAGS),
            ", ".join(self.settings.ACTIONS),
            " (DRY RUN: nothing is changed)" if self.settings.DRY_RUN else "",
        )
        self.advise(account)

    def check_state_file(self) -> None:
        """Take the lock of STATE_FILE, make sure it can be written, and log any
        pause saved by the last run.

        Two bots on one state file would overwrite each other's position. A
        budget pause from the last run ends at once if MAX_ACTIONS_PER_HOUR grew.
        """
        state = self.state
        if self.settings.DRY_RUN:
            return
        try:
            self.lock_file = open(f"{state.path}.lock", "a")  # noqa: SIM115
            fcntl.flock(self.lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise FatalError(
                f"another hashtag_bot is running with STATE_FILE {state.path}; "
                "stop it first, or give this one another STATE_FILE"
            ) from err
        except OSError as err:
            raise FatalError(
                f"cannot write STATE_FILE {state.path} ({err.strerror}); create its "
                "folder, fix its permissions, or set STATE_FILE"
            ) from err
        now = self.clock()
        state.prune(now, self.settings.USER_COOLDOWN_SECONDS)
        within_budget = len(state.action_times) < self.settings.MAX_ACTIONS_PER_HOUR
        if state.pause_kind == "budget" and within_budget:
            state.pause_until = 0.0
        if state.pause_until > now:
            log.warning(
                "actions are paused until %s (%s, saved by the last run); the bot "
                "catches up then",
                format_time(state.pause_until),
                "rate limited by the server"
                if state.pause_kind != "budget"
                else "MAX_ACTIONS_PER_HOUR reached",
            )
        try:
            state.save()
        except OSError as err:
            raise FatalError(
                f"cannot write STATE_FILE {state.path} ({err.strerror}); fix its "
                "permissions or set STATE_FILE"
            ) from err

    def local_domain(self, account: Any) -> str:
        """Return the domain in the handles of local accounts.

        An instance may serve its web pages on another host than the domain in
        its handles (Mastodon's WEB_DOMAIN); /api/v2/instance names the latter.
        """
        try:
            instance = read_instance(self.api)
            # v2 names it "domain"; v1, before Mastodon 4.0, "uri".
            domain = str(field(instance, "domain", "") or field(instance, "uri", ""))
        except (MastodonError, requests.RequestException):
            domain = ""
        url = str(field(account, "url", "")) or self.credentials.base_url
        return (domain or urlsplit(url).hostname or "").lower()

    def check_scopes(self) -> None:
        """Stop now if the token's scopes cannot cover ACTIONS.

        /api/v1/apps/verify_credentials lists them (Mastodon 4.x). When a server
        does not serve that endpoint, the bot assumes the scopes are enough.
        """
        try:
            app = self.api.app_verify_credentials()
        except (MastodonError, requests.RequestException):
            return
        scopes = field(app, "scopes", None)
        if not isinstance(scopes, list):
            return
        missing = missing_scopes(scopes, needed_scopes(self.settings.ACTIONS))
        if missing:
            raise FatalError(
                f"the token lacks the scopes {' '.join(missing)} needed for ACTIONS "
                f"{', '.join(self.settings.ACTIONS)}; create a token with them "
                "(Preferences > Development > New application)"
            )

    def refresh_blocklists(self) -> None:
        """Read the bot account's blocks, mutes and domain blocks.

        The streaming server drops their posts, the REST timeline may not, so the
        catch-up applies them itself.
        """
        blocked_ids, blocked_domains = set(), set()
        try:
            for method in (self.api.blocks, self.api.mutes):
                accounts = self.api.fetch_remaining(method(limit=80))
                blocked_ids.update(str(field(a, "id", "")) for a in accounts)
            domains = self.api.fetch_remaining(self.api.domain_blocks(limit=200))
            blocked_domains.update(str(d).lower() for d in domains)
        except (MastodonError, requests.RequestException) as err:
            log.warning(
                "could not read the bot account's blocks and mutes (%s); trying "
                "again in an hour",
                describe_error(err),
            )
            return
        finally:
            self.blocklists_read_at = self.clock()
        self.me["blocked_ids"] = blocked_ids
        self.me["blocked_domains"] = blocked_domains

    def advise(self, account: Any) -> None:
        """Warn when the account is not marked as a bot or has no opt-out hint."""
        if not field(account, "bot", False):
            log.warning(
                "the account @%s is not marked as a bot: tick Preferences > "
                "Profile > 'This is an automated account'",
                self.me["acct"],
            )
        opt_out = set(self.settings.OPT_OUT_TAGS)
        if opt_out and not opt_out.intersection(account_opt_out_tags(account)):
            log.warning(
                "the bio of @%s does not say how to opt out: add a line such as "
                "'Add #%s to your bio and I will leave your posts alone' in "
                "Preferences > Profile > Bio",
                self.me["acct"],
                self.settings.OPT_OUT_TAGS[0],
            )

    # Handling one post ----------------------------------------------------------

    def remember_deleted(self, status_id: str) -> None:
        with self.deleted_lock:
            self.deleted[status_id] = None
            while len(self.deleted) > DELETED_IDS_MAX:
                self.deleted.popitem(last=False)

    def handle_post(self, status: Any, tag: str, source: str) -> bool:
        """Decide on one post, act on it, and save the position of ``tag``.

        Returns True if the post was new (not handled before). Raises Paused,
        Unreachable or FatalError with the position left before the post, so
        that a catch-up comes back to it.
        """
        with self.lock:
            status_id = str(field(status, "id", ""))
            account = field(status, "account", None)
            if not status_id or not isinstance(account, dict):
                log.warning("#%s: ignored a %s post without id or account", tag, source)
                self.stats["malformed"] += 1
                return False
            url = str(field(status, "url", "") or field(status, "uri", "")) or status_id
            if status_id in self.handled or status_id in self.state.acted:
                log.debug("skip %s: already handled", url)
                self.advance(tag, status_id)
                return False

            reason = self.time_skip_reason(status, tag) or skip_reason(
                status, self.settings, self.me
            )
            # A post is counted once it is decided: act() may raise Paused, and
            # the catch-up after the pause handles the same post again.
            if reason:
                self.stats["seen"] += 1
                self.stats["skipped"] += 1
                self.skip_reasons[reason.split(" (")[0]] += 1
                log.debug("skip %s (#%s, %s): %s", url, tag, source, reason)
                self.finish(tag, status_id)
                return True

            outcome = self.act(status, tag, url)
            self.stats["seen"] += 1
            if outcome == "acted":
                self.stats["acted"] += 1
                now = self.clock()
                self.state.remember_action(
                    status_id, str(field(account, "id", "")), now
                )
                if now - self.pruned_at >= PRUNE_INTERVAL_SECONDS:
                    # Keeps memory flat over months, dry runs included.
                    self.state.prune(now, self.settings.USER_COOLDOWN_SECONDS)
                    self.pruned_at = now
            elif outcome == "failed":
                self.stats["failed"] += 1
            else:
                self.stats["skipped"] += 1
                self.skip_reasons[outcome] += 1
            self.finish(tag, status_id)
            return True

    def time_skip_reason(self, status: Any, tag: str) -> str:
        """Return a skip reason that depends on time or on earlier posts."""
        if tag not in status_tags(status):
            return f"does not carry #{tag}"
        if str(field(status, "id", "")) in self.deleted:
            return "deleted"
        author = str(field(field(status, "account", {}), "id", ""))
        last = self.state.authors.get(author)
        now = self.clock()
        if last is not None and now - last < self.settings.USER_COOLDOWN_SECONDS:
            return f"USER_COOLDOWN_SECONDS (author acted on {now - last:.0f} s ago)"
        return ""

    def act(self, status: Any, tag: str, url: str) -> str:
        """Carry out each action in ACTIONS.

        Returns "acted" if any action was done, "failed" if the server rejected
        one, or else the reason no action applied.
        """
        acct = str(field(field(status, "account", {}), "acct", ""))
        outcome = "no action applies"
        for action in self.settings.ACTIONS:
            if action == "reply":
                reason = reply_skip_reason(status, self.me)
                if reason:
                    log.debug("no reply to %s: %s", url, reason)
                    outcome = "acted" if outcome == "acted" else f"no reply: {reason}"
                    continue
            if self.settings.DRY_RUN:
                log.info("dry run: would %s %s by @%s (#%s)", action, url, acct, tag)
                outcome = "acted"
                continue
            self.wait_for_budget()
            if self.sleep(self.settings.ACTION_DELAY_SECONDS):
                raise Unreachable("stopping")
            if str(field(status, "id")) in self.deleted:
                log.info("skip %s: deleted during the delay", url)
                return "acted" if outcome == "acted" else "deleted"
            method, args, kwargs = self.action_call(action, status, tag)
            try:
                self.call(f"{action} {url}", method, *args, **kwargs)
            except SkipPost as err:
                # A post deleted before the action is part of normal life.
                level = logging.INFO if "(404)" in str(err) else logging.WARNING
                log.log(level, "skip %s by @%s: %s %s", url, acct, action, err)
                return "acted" if outcome == "acted" else "failed"
            self.ratelimit_backoff.reset()
            self.state.action_times.append(self.clock())
            log.info("%s %s by @%s (#%s)", past_tense(action), url, acct, tag)
            outcome = "acted"
        return outcome

    def action_call(
        self, action: str, status: Any, tag: str
    ) -> tuple[Callable, tuple[Any, ...], dict[str, Any]]:
        """Return the client method and arguments that carry out ``action``."""
        status_id = str(field(status, "id"))
        if action == "boost":
            return self.api.status_reblog, (status_id,), {}
        if action == "favourite":
            return self.api.status_favourite, (status_id,), {}
        if action == "bookmark":
            return self.api.status_bookmark, (status_id,), {}
        acct = str(field(field(status, "account", {}), "acct", ""))
        # Mastodon keeps an Idempotency-Key for an hour: a reply repeated after a
        # crash between the post and the state write is not posted twice.
        return (
            self.api.status_post,
            (reply_text(self.settings, acct, tag),),
            {
                "in_reply_to_id": status_id,
                "visibility": self.settings.REPLY_VISIBILITY,
                "idempotency_key": f"hashtag-bot-reply-{self.me['id']}-{status_id}",
            },
        )

    def wait_for_budget(self) -> None:
        """Raise Paused when MAX_ACTIONS_PER_HOUR actions are in the window."""
        self.state.prune(self.clock(), self.settings.USER_COOLDOWN_SECONDS)
        if len(self.state.action_times) >= self.settings.MAX_ACTIONS_PER_HOUR:
            self.start_budget_pause()
            raise Paused()
        self.check_paused()

    def finish(self, tag: str, status_id: str) -> None:
        """Mark a post handled, advance the position and save it."""
        self.handled[status_id] = None
        while len(self.handled) > HANDLED_IDS_MAX:
            self.handled.popitem(last=False)
        self.advance(tag, status_id)

    def advance(self, tag: str, status_id: str) -> None:
        old = self.state.positions.get(tag, "")
        self.state.positions[tag] = newer_id(old, status_id)
        if not self.settings.DRY_RUN:
            self.save_state()

    def save_state(self) -> None:
        """Save the state file; a failure to write is logged, not fatal."""
        if self.settings.DRY_RUN:
            return
        try:
            self.state.save()
        except OSError as err:
            log.error("could not save the state file %s: %s", self.state.path, err)

    # Catch-up ---------------------------------------------------------------------

    def read_timeline(self, tag: str, **params: Any) -> list:
        """Read one page of the tag's REST timeline through ``call``."""
        page = self.call(
            f"read the #{tag} timeline",
            self.api.timeline_hashtag,
            quote(tag, safe=""),
            local=self.settings.LOCAL_ONLY,
            **params,
        )
        return list(page or [])

    def newest_post_id(self, tag: str) -> str:
        """Return the id of the newest post of the tag, or "" if it has none."""
        page = self.read_timeline(tag, limit=1)
        return str(field(page[0], "id", "")) if page else ""

    def record_first_position(self, tag: str) -> None:
        """On a first run, take the newest post of the tag as the position."""
        with self.lock:
            newest = self.newest_post_id(tag)
            self.state.positions[tag] = newest
            self.save_state()
        log.info(
            "#%s: first run, starting after %s; older posts are not acted on",
            tag,
            f"post {newest}" if newest else "an empty timeline",
        )

    def catch_up(self, tag: str, why: str, grace_seconds: float = 0.0) -> int:
        """Handle the posts of ``tag`` after its saved position, oldest first.

        Reads ``min_id`` pages of 40 and handles up to CATCH_UP_MAX new posts;
        beyond that it counts what it skips and moves the position past them.
        Posts younger than ``grace_seconds`` are left for the stream. Returns the
        number of new posts handled.
        """
        if tag not in self.state.positions:
            self.record_first_position(tag)
            return 0
        handled = 0
        skipped = 0
        counted = ""
        while True:
            with self.lock:
                cursor = self.state.positions.get(tag) or "0"
                page = self.read_timeline(tag, min_id=cursor, limit=TIMELINE_PAGE_SIZE)
                statuses = sorted(
                    (s for s in page if field(s, "id")),
                    key=lambda s: id_key(field(s, "id")),
                )
                statuses = [
                    s for s in statuses if id_key(field(s, "id")) > id_key(cursor)
                ]
                if grace_seconds:
                    statuses = self.older_than(statuses, grace_seconds)
                for status in statuses:
                    if handled >= self.settings.CATCH_UP_MAX:
                        skipped += 1
                        self.advance(tag, str(field(status, "id")))
                        continue
                    if self.handle_post(status, tag, why):
                        handled += 1
                if len(page) < TIMELINE_PAGE_SIZE or not statuses:
                    break
                if skipped >= SKIP_COUNT_MAX_PAGES * TIMELINE_PAGE_SIZE:
                    newest = self.newest_post_id(tag)
                    if newest:
                        self.advance(tag, newest)
                    counted = "at least "
                    break
        if skipped:
            log.warning(
                "#%s: catch-up stopped after CATCH_UP_MAX=%d posts and skipped "
                "%s%d newer ones",
                tag,
                self.settings.CATCH_UP_MAX,
                counted,
                skipped,
            )
        return handled

    def older_than(self, statuses: list[Any], seconds: float) -> list[Any]:
        """Return the leading posts created more than ``seconds`` ago."""
        kept = []
        for status in statuses:
            created = to_datetime(field(status, "created_at"))
            if created and self.clock() - created.timestamp() < seconds:
                break
            kept.append(status)
        return kept

    # Running ------------------------------------------------------------------------

    def run(self, once: bool = False) -> int:
        """Start, watch every hashtag until stopped, and return the exit status."""
        try:
            self.start()
            if once:
                return self.run_once()
            for tag in self.settings.HASHTAGS:
                watcher = TagWatcher(self, tag)
                self.watchers.append(watcher)
                watcher.thread.start()
            while not self.sleep(1.0):
                now = self.clock()
                if now - self.summary_since >= SUMMARY_INTERVAL_SECONDS:
                    self.log_summary()
                if now - self.blocklists_read_at >= BLOCKLIST_REFRESH_SECONDS:
                    with self.lock:
                        self.refresh_blocklists()
        except FatalError as err:
            self.fatal(str(err))
        except StopRequested:
            pass
        return self.shutdown()

    def run_once(self) -> int:
        """Catch up every hashtag from its saved position, then return."""
        for tag in self.settings.HASHTAGS:
            try:
                self.catch_up(tag, "catch-up")
            except Paused:
                log.warning(
                    "#%s: actions are paused until %s; run again later",
                    tag,
                    format_time(self.state.pause_until),
                )
            except (Unreachable, SkipPost) as err:
                self.fatal_message = f"#{tag}: {err}; run again later"
                break
        return self.shutdown()

    def fatal(self, message: str) -> None:
        """Record a fatal error and stop the bot (exit status 1)."""
        if not self.fatal_message:
            self.fatal_message = message
        self.stop_event.set()

    def stop(self) -> None:
        self.stop_event.set()

    def shutdown(self) -> int:
        """Let an action in flight finish, save, log the summary, and return."""
        self.stop_event.set()
        # A watcher may hold the lock in a request that takes up to
        # REQUEST_TIMEOUT_SECONDS: wait for it briefly, never longer.
        locked = self.lock.acquire(timeout=STOP_GRACE_SECONDS)
        try:
            if self.me and locked:
                self.save_state()
            if self.me:
                self.log_summary(final=True)
                log.info("stopped")
        finally:
            if locked:
                self.lock.release()
        if self.fatal_message:
            # The last line on stderr names what went wrong and how to fix it.
            log.error("%s", self.fatal_message)
            return EXIT_FATAL
        return EXIT_OK

    def log_summary(self, final: bool = False) -> None:
        """Log one line: posts seen, acted on, skipped (by rule), failed.

        The final summary reads the counters without the lock: shutdown holds
        it already, or gave up waiting for a watcher stuck in a request.
        """
        with contextlib.nullcontext() if final else self.lock:
            stats, reasons = self.stats, self.skip_reasons
            self.stats, self.skip_reasons = Counter(), Counter()
            since = self.summary_since
            self.summary_since = self.clock()
        by_rule = ", ".join(f"{r}: {n}" for r, n in reasons.most_common()) or "none"
        log.info(
            "%s: %d posts seen, %d acted on, %d skipped (%s), %d failed",
            f"since {format_time(since)}" if final else "last hour",
            stats["seen"],
            stats["acted"],
            stats["skipped"],
            by_rule,
            stats["failed"],
        )


class TagWatcher:
    """Streams one hashtag in its own thread, with its own reconnect loop.

    Before each connect it catches up from the saved position. Once the stream
    is open it catches up again, so that a post published while connecting is
    not lost. Every RECONCILE_SECONDS it compares the REST timeline with what
    the stream delivered. When the stream cannot be used it polls instead.
    """

    def __init__(self, bot: HashtagBot, tag: str):
        self.bot = bot
        self.tag = tag
        self.client: Optional[Mastodon] = None
        self.thread = threading.Thread(
            target=self.run, name=f"stream-{tag}", daemon=True
        )
        self.backoff = Backoff(
            STREAM_BACKOFF_INITIAL_SECONDS, STREAM_BACKOFF_MAX_SECONDS
        )
        self.polling_reason = ""
        self.stream_retry_at = 0.0
        self.refused_connects = 0
        self.reconcile_misses = 0
        self.empty_events = 0
        self.opened = False
        self.last_reconcile = 0.0

    def run(self) -> None:
        bot = self.bot
        while not bot.stop_event.is_set():
            try:
                if bot.wait_while_paused():
                    return
                bot.catch_up(self.tag, "catch-up")
                if self.polling_reason:
                    self.poll()
                    continue
                self.stream()
            except Paused:
                continue
            except (Unreachable, SkipPost) as err:
                self.wait_after_failure(str(err))
            except FatalError as err:
                bot.fatal(str(err))
                return
            except Exception as err:  # noqa: BLE001 - the watcher must survive
                log.error(
                    "#%s: unexpected error: %r",
                    self.tag,
                    err,
                    exc_info=log.isEnabledFor(logging.DEBUG),
                )
                self.wait_after_failure(repr(err))

    def wait_after_failure(self, reason: str) -> None:
        if self.bot.stop_event.is_set():
            return
        delay = self.backoff.next_delay()
        log.warning("#%s: %s; trying again in %.0f s", self.tag, reason, delay)
        self.bot.sleep(delay)

    def poll(self) -> None:
        """Wait POLL_SECONDS between catch-ups; try the stream again later."""
        if self.bot.clock() >= self.stream_retry_at:
            log.info("#%s: trying the stream again", self.tag)
            self.polling_reason = ""
            self.client = None  # read the instance's feed settings anew
            return
        self.bot.sleep(self.bot.settings.POLL_SECONDS)

    def start_polling(self, reason: str) -> None:
        if not self.polling_reason:
            log.warning(
                "#%s: %s; polling the timeline every %.0f s instead and trying "
                "the stream again in %.0f minutes",
                self.tag,
                reason,
                self.bot.settings.POLL_SECONDS,
                STREAM_RETRY_SECONDS / 60,
            )
        self.polling_reason = reason
        self.stream_retry_at = self.bot.clock() + STREAM_RETRY_SECONDS
        self.refused_connects = self.reconcile_misses = self.empty_events = 0

    def stream(self) -> None:
        """Run one connection of the stream, and decide what its end means."""
        bot = self.bot
        if self.client is None:
            self.client = bot.make_client()
            if not self.client.timeline_is_available(
                "hashtag", local=bot.settings.LOCAL_ONLY, with_auth=True
            ):
                # Mastodon 4.5+ reports this in /api/v2/instance; the stream
                # of a disabled feed then sends nothing or only empty events.
                self.start_polling("the instance has turned hashtag feeds off")
                return
        self.opened = False
        self.empty_events = 0
        reason = ""
        started = time.monotonic()
        try:
            self.client.stream_hashtag(
                quote(self.tag, safe=""),
                HashtagListener(self),
                local=bot.settings.LOCAL_ONLY,
                timeout=bot.settings.STREAM_TIMEOUT_SECONDS,
            )
            reason = "the server closed the stream"
        except StreamRestart as err:
            if bot.stop_event.is_set():
                return
            log.info("#%s: stream closed: %s", self.tag, err)
            if str(err).startswith("reconcile"):
                return
        except (Paused, Unreachable, FatalError):
            raise
        except MastodonIllegalArgumentError as err:
            raise FatalError(f"invalid hashtag #{self.tag}: {err}") from err
        except (MastodonError, requests.RequestException) as err:
            reason = describe_stream_error(err)
        if bot.stop_event.is_set():
            return
        if self.opened:
            self.refused_connects = 0
            if time.monotonic() - started >= HEALTHY_CONNECTION_SECONDS:
                self.backoff.reset()
        elif reason and re.search(r"Unauthorized|Forbidden|Not Found", reason):
            self.refused_connects += 1
            if self.refused_connects >= REFUSED_CONNECTS_BEFORE_POLLING:
                self.start_polling(
                    f"the streaming server refused {self.refused_connects} connects "
                    f"in a row ({reason}) while the REST API works"
                )
                return
        if reason:
            delay = self.backoff.next_delay()
            log.warning(
                "#%s: stream disconnected (%s); reconnecting in %.1f s",
                self.tag,
                reason,
                delay,
            )
            self.wait_catching_up(delay)

    def wait_catching_up(self, seconds: float) -> None:
        """Wait out a reconnect backoff, catching up every POLL_SECONDS.

        The backoff grows to minutes when the stream keeps failing while the
        REST API works; the timeline still delivers the posts meanwhile.
        """
        bot = self.bot
        deadline = bot.clock() + seconds
        while deadline - bot.clock() > 0:
            step = min(deadline - bot.clock(), bot.settings.POLL_SECONDS)
            if bot.sleep(step):
                return
            if deadline - bot.clock() > 0:
                bot.catch_up(self.tag, "catch-up")

    # Called from the listener, in this watcher's thread.

    def on_heartbeat(self) -> None:
        bot = self.bot
        if bot.stop_event.is_set():
            raise StreamRestart("stopping")
        if bot.state.pause_until > bot.clock():
            raise StreamRestart("actions are paused")
        if not self.opened:
            self.on_open()
        elif bot.clock() - self.last_reconcile >= bot.settings.RECONCILE_SECONDS:
            self.last_reconcile = bot.clock()
            self.reconcile()

    def on_open(self) -> None:
        """Catch up once more now that the stream is open.

        A post published while the stream was opening is on the timeline only.
        This runs before the first streamed post is handled, because handling
        it moves the position past any such post.
        """
        self.opened = True
        self.last_reconcile = self.bot.clock()
        log.info("#%s: stream connected", self.tag)
        self.guarded(lambda: self.bot.catch_up(self.tag, "catch-up"))

    def reconcile(self) -> None:
        """Handle what the timeline has and the stream did not deliver."""
        grace = min(RECONCILE_GRACE_SECONDS, self.bot.settings.RECONCILE_SECONDS / 2)
        missed = self.guarded(
            lambda: self.bot.catch_up(self.tag, "reconciliation", grace_seconds=grace)
        )
        if not missed:
            self.reconcile_misses = 0
            return
        self.reconcile_misses += 1
        log.warning(
            "#%s: the stream missed %d posts that the timeline has; handled them",
            self.tag,
            missed,
        )
        if self.reconcile_misses >= RECONCILE_MISSES_BEFORE_POLLING:
            self.start_polling(
                f"the stream missed posts {self.reconcile_misses} times in a row"
            )
            raise StreamRestart("reconcile: switching to polling")

    def on_post(self, status: Any, edited: bool) -> None:
        bot = self.bot
        if bot.stop_event.is_set():
            raise StreamRestart("stopping")
        if not isinstance(status, dict) or not status.get("id"):
            self.on_malformed({"data": status}, ValueError("empty event"))
            return
        self.empty_events = 0
        if not self.opened:
            self.on_open()
        source = "edit" if edited else "stream"
        self.guarded(lambda: bot.handle_post(status, self.tag, source))
        # Heartbeats start reconciliations; a busy stream starts them too.
        if bot.clock() - self.last_reconcile >= bot.settings.RECONCILE_SECONDS:
            self.last_reconcile = bot.clock()
            self.reconcile()

    def on_malformed(self, event: Any, err: Exception) -> None:
        self.empty_events += 1
        log.warning("#%s: ignored a malformed stream event (%s)", self.tag, err)
        log.debug("#%s: the malformed event was %.300r", self.tag, event)
        if self.empty_events >= EMPTY_EVENTS_BEFORE_POLLING:
            self.start_polling("the stream sends only empty or malformed events")
            raise StreamRestart("switching to polling")

    def guarded(self, work: Callable[[], Any]) -> Any:
        """Run handler work; turn pauses into a stream restart, survive bugs."""
        try:
            return work()
        except Paused as err:
            raise StreamRestart("actions are paused") from err
        except (Unreachable, SkipPost) as err:
            raise StreamRestart(str(err)) from err
        except FatalError as err:
            self.bot.fatal(str(err))
            raise StreamRestart("stopping") from err
        except Exception as err:  # noqa: BLE001 - a handler must never kill the bot
            log.error(
                "#%s: error while handling a post: %r",
                self.tag,
                err,
                exc_info=log.isEnabledFor(logging.DEBUG),
            )
            return 0


# --- Guided setup ------------------------------------------------------------

OOB_REDIRECT = "urn:ietf:wg:oauth:2.0:oob"
SETUP_ATTEMPTS = 3


class SetupAborted(Exception):
    """The user gave up the guided setup (three failed tries, or Ctrl+D)."""


def ask(prompt: str) -> str:
    """Read one line from the user; Ctrl+D ends the setup."""
    try:
        return input(prompt).strip()
    except EOFError as err:
        raise SetupAborted("input ended") from err


def guided_setup(
    env_path: Path, config_path: Path, instance: str, actions: list[str]
) -> Credentials:
    """Register an application, get a token, write .env (and config.py).

    Prompts for the instance URL unless ``instance`` is given, prints the
    authorisation URL, reads the code the user pastes, and prompts for the
    hashtags when there is no config.py yet. Only the instance URL is logged.
    """
    print("Set up hashtag_bot: this connects it to your Mastodon account.")
    scopes = needed_scopes(actions)
    for attempt in range(1, SETUP_ATTEMPTS + 1):
        raw = instance or ask("Your instance (for example https://mastodon.social): ")
        instance = ""
        try:
            base_url = check_base_url(raw)
            client_id, client_secret = Mastodon.create_app(
                "hashtag_bot",
                scopes=scopes,
                redirect_uris=OOB_REDIRECT,
                api_base_url=base_url,
                request_timeout=REQUEST_TIMEOUT_SECONDS,
                user_agent=USER_AGENT,
            )
            break
        except ConfigError as err:
            print(f"{err}. Try again.")
        except (MastodonError, requests.RequestException) as err:
            print(
                f"could not register the bot on {raw} ({describe_error(err)}). "
                "Check the address."
            )
        if attempt == SETUP_ATTEMPTS:
            raise SetupAborted("no instance could be reached")
    log.info("registered the application on %s", base_url)

    allow_http = base_url.startswith("http://")
    client = Mastodon(
        client_id=client_id,
        client_secret=client_secret,
        api_base_url=base_url,
        request_timeout=REQUEST_TIMEOUT_SECONDS,
        user_agent=USER_AGENT,
    )
    url = client.auth_request_url(
        redirect_uris=OOB_REDIRECT,
        scopes=scopes,
        allow_http=allow_http,
        force_login=True,
    )
    print("\nOpen this address in a browser, logged in as the bot's account,")
    print("and allow access:\n")
    print(f"    {url}\n")
    for attempt in range(1, SETUP_ATTEMPTS + 1):
        code = ask("Then paste the authorization code here: ")
        try:
            token = client.log_in(
                code=code,
                redirect_uri=OOB_REDIRECT,
                scopes=scopes,
                allow_http=allow_http,
            )
            break
        except (MastodonError, requests.RequestException):
            print("That code was not accepted. Copy it again, without spaces.")
        if attempt == SETUP_ATTEMPTS:
            raise SetupAborted("no valid authorization code")

    try:
        acct = client.account_verify_credentials()["acct"]
        print(f"Logged in as @{acct}. If that is not the bot's account, run --login")
        print("again and log in as the bot in the browser first.")
    except (MastodonError, requests.RequestException, KeyError):
        pass
    write_private_file(
        env_path,
        f"MASTODON_API_BASE_URL={base_url}\nMASTODON_ACCESS_TOKEN={token}\n",
    )
    print(f"Saved the token in {env_path} (readable by you only).")
    if not config_path.exists():
        write_config_from_example(config_path)
    return Credentials(base_url, token)


def write_private_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable by the owner only."""
    fd, temporary = tempfile.mkstemp(prefix=path.name + ".", dir=str(path.parent))
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def write_config_from_example(config_path: Path) -> None:
    """Ask for the hashtags and write config.py from config.example.py."""
    example = SCRIPT_DIR / "config.example.py"
    while True:
        answer = ask("Hashtags to watch, separated by commas (for example python): ")
        raw_tags = [t.strip() for t in answer.split(",") if t.strip()]
        tags = [normalize_tag(t) for t in raw_tags]
        if tags and all(
            is_valid_tag(t) and is_hashtag_text(r) for t, r in zip(tags, raw_tags)
        ):
            break
        print("Give at least one hashtag of letters, digits and _.")
    text = example.read_text(encoding="utf-8")
    line = f"HASHTAGS = {json.dumps(tags, ensure_ascii=False)}"
    # A function, not a string: a replacement string would read \u as an escape.
    text, count = re.subn(r"^HASHTAGS = .*$", lambda _: line, text, flags=re.M)
    if not count:
        text += f"\n{line}\n"
    config_path.write_text(text, encoding="utf-8")
    print(f"Saved the settings in {config_path}; edit it to change what the bot does.")


# --- Checks ------------------------------------------------------------------


class Checker:
    """Runs ``--check``: one line per check, PASS, WARN or FAIL with the fix."""

    def __init__(self, out=None):
        self.out = out or sys.stdout
        self.failed = 0

    def report(self, outcome: str, name: str, detail: str) -> None:
        if outcome == "FAIL":
            self.failed += 1
        print(f"{outcome} {name}: {detail}", file=self.out, flush=True)

    def run(self, config_path: Optional[Path], env_path: Optional[Path]) -> int:
        """Check everything the bot needs; return 0 if it can run, else 1."""
        environ = dict(os.environ)
        try:
            settings = load_settings(config_path, environ)
        except ConfigError as err:
            self.report("FAIL", "config", str(err))
            return 1
        tags = ", ".join("#" + t for t in settings.HASHTAGS)
        actions = ", ".join(settings.ACTIONS)
        self.report("PASS", "config", f"watching {tags}; actions: {actions}")

        try:
            credentials = load_credentials(env_path, environ)
        except ConfigError as err:
            self.report("FAIL", "credentials", str(err))
            return 1
        self.report("PASS", "credentials", credentials.base_url)

        bot = HashtagBot(settings, credentials)
        api = bot.api
        if not self.check_instance(api, credentials.base_url):
            return 1
        account = self.check_token(api, credentials.base_url)
        if account is None:
            return 1
        self.check_scopes(api, settings)
        self.check_stream(bot, settings)
        self.check_account(bot, account, settings)
        self.check_state_file(settings.STATE_FILE)
        return 1 if self.failed else 0

    def check_instance(self, api: Mastodon, base_url: str) -> bool:
        try:
            instance = read_instance(api)
        except (MastodonError, requests.RequestException) as err:
            self.report(
                "FAIL", "instance",
                f"cannot reach {base_url} ({describe_error(err)}); check "
                "MASTODON_API_BASE_URL "
                "and the network",
            )  # fmt: skip
            return False
        version = field(instance, "version", "unknown version")
        self.report("PASS", "instance", f"{base_url} answers, Mastodon {version}")
        return True

    def check_token(self, api: Mastodon, base_url: str) -> Any:
        try:
            account = api.account_verify_credentials()
        except MastodonUnauthorizedError:
            self.report(
                "FAIL", "token",
                f"{base_url} rejected MASTODON_ACCESS_TOKEN (401); create a new "
                "token (README, 'Get a token by hand') or run --login",
            )  # fmt: skip
            return None
        except (MastodonError, requests.RequestException) as err:
            self.report(
                "FAIL", "token", f"could not verify the token ({describe_error(err)})"
            )
            return None
        self.report("PASS", "token", f"accepted, logged in as @{account['acct']}")
        return account

    def check_scopes(self, api: Mastodon, settings: Settings) -> None:
        needed = needed_scopes(settings.ACTIONS)
        try:
            scopes = field(api.app_verify_credentials(), "scopes", None)
        except (MastodonError, requests.RequestException) as err:
            self.report(
                "WARN",
                "scopes",
                f"could not read the token's scopes ({describe_error(err)})",
            )
            return
        if not isinstance(scopes, list):
            self.report("WARN", "scopes", "the instance does not list the scopes")
            return
        missing = missing_scopes(scopes, needed)
        if missing:
            self.report(
                "FAIL", "scopes",
                f"the token lacks {' '.join(missing)} for ACTIONS "
                f"{', '.join(settings.ACTIONS)}; create a token with "
                f"{' '.join(needed)} or run --login",
            )  # fmt: skip
        else:
            self.report("PASS", "scopes", " ".join(scopes))

    def check_stream(self, bot: HashtagBot, settings: Settings) -> None:
        tag = settings.HASHTAGS[0]
        client = bot.make_client()
        try:
            instance = read_instance(client)
            urls = field(instance, "urls", {}) or field(
                field(instance, "configuration", {}), "urls", {}
            )
            streaming_url = field(urls, "streaming_api", "") or field(
                urls, "streaming", ""
            )
            if not client.timeline_is_available(
                "hashtag", local=settings.LOCAL_ONLY, with_auth=True
            ):
                self.report(
                    "WARN", "hashtag feeds",
                    "the instance has turned hashtag feeds off for this account, so "
                    "the stream connects but delivers no posts; the bot will poll "
                    "the timeline every POLL_SECONDS instead",
                )  # fmt: skip
            client.stream_hashtag(
                quote(tag, safe=""),
                ProbeListener(),
                local=settings.LOCAL_ONLY,
                timeout=min(settings.STREAM_TIMEOUT_SECONDS, 20.0),
            )
            self.report("FAIL", "stream", "the server closed the stream at once")
        except StreamRestart:
            self.report(
                "PASS", "stream",
                f"connected to #{tag} at {streaming_url or bot.credentials.base_url}",
            )  # fmt: skip
        except (MastodonError, requests.RequestException) as err:
            self.report(
                "FAIL", "stream",
                f"could not open the #{tag} stream ({describe_stream_error(err)}); "
                "the bot would poll the timeline instead",
            )  # fmt: skip

    def check_account(self, bot: HashtagBot, account: Any, settings: Settings) -> None:
        if field(account, "bot", False):
            self.report("PASS", "bot flag", "the account is marked as a bot")
        else:
            self.report(
                "WARN", "bot flag",
                "tick Preferences > Profile > 'This is an automated account'",
            )  # fmt: skip
        opt_out = set(settings.OPT_OUT_TAGS)
        if opt_out and not opt_out.intersection(account_opt_out_tags(account)):
            self.report(
                "WARN", "opt-out hint",
                f"say in the bio that #{settings.OPT_OUT_TAGS[0]} keeps the bot "
                "away (Preferences > Profile > Bio)",
            )  # fmt: skip
        else:
            self.report("PASS", "opt-out hint", "the bio names an opt-out tag")

    def check_state_file(self, path: Path) -> None:
        try:
            with tempfile.NamedTemporaryFile(dir=str(path.parent)):
                pass
            saved = json.loads(path.read_bytes()) if path.exists() else {}
        except OSError as err:
            self.report(
                "FAIL", "state file",
                f"{path} is not readable and writable ({err.strerror}); fix its "
                "folder or set STATE_FILE",
            )  # fmt: skip
            return
        except ValueError:
            self.report(
                "WARN", "state file",
                f"{path} is corrupt; the bot will move it aside and start as on "
                "a first run",
            )  # fmt: skip
            return
        pause_until = saved.get("pause_until") if isinstance(saved, dict) else None
        if isinstance(pause_until, (int, float)) and pause_until > time.time():
            self.report(
                "WARN", "state file",
                f"actions are paused until {format_time(pause_until)} (saved by "
                "the last run: a rate limit or MAX_ACTIONS_PER_HOUR)",
            )  # fmt: skip
            return
        self.report("PASS", "state file", f"{path} is readable and writable")


class ProbeListener(StreamListener):
    """Ends the ``--check`` test connection at the first byte from the server."""

    def handle_heartbeat(self):
        raise StreamRestart("connected")

    def on_any_event(self, name, data=None):
        raise StreamRestart("connected")


# --- Small formatting helpers ------------------------------------------------


def past_tense(action: str) -> str:
    return {"boost": "boosted", "favourite": "favourited", "bookmark": "bookmarked",
            "reply": "replied to"}[action]  # fmt: skip


def format_time(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def error_status(err: Exception) -> Any:
    """Return the HTTP status of a Mastodon.py API error, if it has one."""
    return err.args[1] if len(err.args) > 1 else "?"


def error_text(err: Exception) -> str:
    """Return the server's error message of a Mastodon.py API error."""
    if len(err.args) > 3 and err.args[3]:
        return str(err.args[3])
    return str(err.args[-1]) if err.args else type(err).__name__


# Short names for the network failures buried in requests' long messages.
NETWORK_FAILURES = (
    ("Connection refused", "connection refused"),
    ("NameResolutionError", "host name not found"),
    ("Name or service not known", "host name not found"),
    ("SSLError", "TLS certificate or handshake failed"),
    ("timed out", "timed out"),
    ("RemoteDisconnected", "connection closed by the server"),
    ("Connection reset", "connection reset"),
    ("Connection aborted", "connection closed by the server"),
)


def describe_error(err: Exception) -> str:
    """Return a Mastodon.py or requests error as one short phrase."""
    if isinstance(err, MastodonAPIError) and len(err.args) >= 3:
        text = f" {err.args[3]}" if len(err.args) > 3 and err.args[3] else ""
        return f"HTTP {err.args[1]} {err.args[2]}:{text}".rstrip(":")
    text = str(err) or type(err).__name__
    for marker, phrase in NETWORK_FAILURES:
        if marker in text:
            return phrase
    return text if len(text) <= 160 else text[:157] + "..."


def describe_stream_error(err: Exception) -> str:
    """Return a short reason for a stream failure, for the log."""
    if isinstance(err, requests.ConnectionError):
        return "connection failed"
    if isinstance(err, requests.Timeout):
        return "no answer from the streaming server"
    text = str(err.args[0]) if err.args else type(err).__name__
    # requests 2.x raises ConnectionError(ReadTimeoutError) for a read timeout
    # inside iter_content, and Mastodon.py 2.3.3 reports that as "Requests
    # reports connection error.", so the timeout shows only in the cause.
    cause = err.__cause__
    timed_out = isinstance(cause, requests.ConnectionError) and any(
        isinstance(arg, urllib3.exceptions.ReadTimeoutError) for arg in cause.args
    )
    if "Timed out" in text or timed_out:
        return "no data, not even a heartbeat, within STREAM_TIMEOUT_SECONDS"
    return text


def read_instance(api: Mastodon) -> Any:
    """Return /api/v2/instance, or /api/v1/instance from a server before 4.0.

    Mastodon.py 2.3.3's instance() recurses until RecursionError when the
    instance cannot be reached, so the bot calls the versioned methods.
    """
    try:
        return api.instance_v2()
    except MastodonNotFoundError:
        return api.instance_v1()


def needed_scopes(actions: list[str]) -> list[str]:
    return list(READ_SCOPES) + sorted({ACTION_SCOPES[a] for a in actions})


def missing_scopes(granted: list[str], needed: list[str]) -> list[str]:
    """Return the needed scopes the granted ones do not cover."""
    have = set(granted)
    return [
        scope
        for scope in needed
        if scope not in have and scope.split(":")[0] not in have
    ]


# --- Command line ------------------------------------------------------------


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="hashtag_bot.py",
        description="Boost (or favourite, bookmark, reply to) Mastodon posts "
        "with the hashtags in HASHTAGS, in real time.",
        epilog="Settings live in config.py (see config.example.py) and can be "
        "overridden by environment variables of the same name. Exit status: 0 "
        "after Ctrl+C or SIGTERM, 1 on a fatal error, 2 on a usage or "
        "configuration error.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        help=f"settings file to read (default: {DEFAULT_CONFIG_PATH.name} beside "
        "the script)",
    )
    parser.add_argument(
        "--env-file",
        type=Path,
        metavar="PATH",
        help="file with MASTODON_API_BASE_URL and MASTODON_ACCESS_TOKEN "
        f"(default: {DEFAULT_ENV_PATH.name} beside the script)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="log what would be done and change nothing (sets DRY_RUN)",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="catch up from the saved position, act, save and exit (for cron)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="check the settings, the instance, the token, its scopes and the "
        "stream, one line each, and exit (0 if the bot can run)",
    )
    parser.add_argument(
        "--login",
        metavar="URL",
        help="register the bot on the instance at URL, get a token through your "
        "browser, and save it in the env file",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also log the decision on every post (debug level)",
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}"
    )
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    redactor = configure_logging(args.verbose)
    # The bot checks hashtag feed availability itself and logs what it does.
    warnings.filterwarnings("ignore", category=MastodonWarning)
    if args.check:
        return Checker().run(args.config, args.env_file)
    environ = dict(os.environ)
    try:
        overrides = {"DRY_RUN": True} if args.dry_run else {}
        credentials = obtain_credentials(args, environ)
        settings = load_settings(args.config, environ, overrides)
    except ConfigError as err:
        print(f"hashtag_bot: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except SetupAborted as err:
        print(f"hashtag_bot: setup stopped ({err}); run it again", file=sys.stderr)
        return EXIT_FATAL
    except KeyboardInterrupt:
        print("\nhashtag_bot: setup stopped", file=sys.stderr)
        return EXIT_OK
    redactor.secret = credentials.token

    bot = HashtagBot(settings, credentials)

    def request_stop(signum, frame):
        if bot.stop_event.is_set():
            return
        log.info("stopping (%s)", signal.Signals(signum).name)
        bot.stop()
        if threading.current_thread() is threading.main_thread():
            raise StopRequested()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        return bot.run(once=args.once)
    except StopRequested:
        return bot.shutdown()


def obtain_credentials(args: argparse.Namespace, environ: dict) -> Credentials:
    """Load the credentials, or run the guided setup to create them.

    The setup runs for ``--login``, or when no credentials exist anywhere and
    a person is at the terminal. Under systemd or cron it never prompts.
    """
    env_path = args.env_file or DEFAULT_ENV_PATH
    config_path = args.config or DEFAULT_CONFIG_PATH
    have_credentials = env_path.exists() or (
        environ.get("MASTODON_API_BASE_URL") and environ.get("MASTODON_ACCESS_TOKEN")
    )
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    if args.login and not interactive:
        raise ConfigError(
            "--login needs a terminal: run it where you can answer its questions"
        )
    if args.login or (not have_credentials and interactive):
        try:
            actions = load_settings(args.config, environ).ACTIONS
        except ConfigError:
            actions = list(SETTINGS_SPEC["ACTIONS"][1])
        return guided_setup(env_path, config_path, args.login or "", actions)
    if interactive and not config_path.exists() and "HASHTAGS" not in environ:
        # A setup stopped before the hashtags question goes on from there.
        write_config_from_example(config_path)
    return load_credentials(args.env_file, environ)


if __name__ == "__main__":
    sys.exit(main())
