"""Rules that real Mastodon applies and mastodon-mock 0.6.1 does not, as pure functions.

The test server (``mastodon_server.py``) uses these to make the mock behave like
Mastodon 4.x. Each rule names the Mastodon source it follows. They do no I/O, so
they are easy to read and to check against the source.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import quote

# --- hashtags ---------------------------------------------------------------

# Tag::HASHTAG_SEPARATORS (Mastodon 4.3+, app/models/concerns/tag/naming.rb).
HASHTAG_SEPARATORS = "_\u00b7\u30fb\u200c"

# The character table of Mastodon's ASCIIFolding (app/lib/ascii_folding.rb); the
# streaming server (streaming/index.js, foldToASCII) uses the same table. Only these
# Latin letters are folded: other accented letters, such as Vietnamese ones, stay.
_FOLD_FROM = (
    "ÀÁÂÃÄÅàáâãäåĀāĂăĄąÇçĆćĈĉĊċČčÐðĎďĐđÈÉÊËèéêëĒēĔĕĖėĘęĚěĜĝĞğĠġĢģĤĥĦħ"
    "ÌÍÎÏìíîïĨĩĪīĬĭĮįİıĴĵĶķĸĹĺĻļĽľĿŀŁłÑñŃńŅņŇňŉŊŋÒÓÔÕÖØòóôõöøŌōŎŏŐőŔŕŖŗŘř"
    "ŚśŜŝŞşŠšſŢţŤťŦŧÙÚÛÜùúûüŨũŪūŬŭŮůŰűŲųŴŵÝýÿŶŷŸŹźŻżŽž"
)
_FOLD_TO = (
    "AAAAAAaaaaaaAaAaAaCcCcCcCcCcDdDdDdEEEEeeeeEeEeEeEeEeGgGgGgGgHhHh"
    "IIIIiiiiIiIiIiIiIiJjKkkLlLlLlLlLlNnNnNnNnnNnOOOOOOooooooOoOoOoRrRrRr"
    "SsSsSsSssTtTtTtUUUUuuuuUuUuUuUuUuUuWwYyyYyYZzZzZz"
)
_ASCII_FOLDING = str.maketrans(_FOLD_FROM, _FOLD_TO)

# Thai characters that Tag::HASHTAG_INVALID_CHARS_RE keeps although they are not
# letters (U+0E47 to U+0E4E).
_THAI_MARKS = {chr(code) for code in range(0x0E47, 0x0E4F)}


def _is_alpha(char: str) -> bool:
    """Return whether ``char`` is in Ruby's ``[[:alpha:]]``: a letter or a mark."""
    return unicodedata.category(char)[0] in "LM"


def _is_alnum(char: str) -> bool:
    """Return whether ``char`` is in Ruby's ``[[:alnum:]]``: letter, mark or digit."""
    return _is_alpha(char) or unicodedata.category(char) == "Nd"


def _is_word(char: str) -> bool:
    """Return whether ``char`` is in Ruby's ``[[:word:]]`` (alnum or connector)."""
    return _is_alnum(char) or unicodedata.category(char) == "Pc"


def hashtag_spans(text: str) -> list[tuple[int, int, str]]:
    """Find the hashtags in plain ``text`` as ``(start, end, name)`` tuples.

    ``start`` is the index of the ``#`` and ``name`` is the tag as written. This
    follows Tag::HASHTAG_RE of Mastodon 4.3+: a ``#`` (or full-width ``＃``) at the
    start of the text or after whitespace, then word characters and separators
    that do not start or end with a separator, with at least one letter.
    """
    spans = []
    index = 0
    while index < len(text):
        char = text[index]
        at_boundary = index == 0 or text[index - 1].isspace()
        if char not in "#＃" or not at_boundary:
            index += 1
            continue

        end = index + 1
        while end < len(text) and (
            _is_word(text[end]) or text[end] in HASHTAG_SEPARATORS
        ):
            end += 1
        # Trailing separators (other than "_", which is a word character) are
        # not part of the name.
        while end > index + 1 and not _is_word(text[end - 1]):
            end -= 1

        name = text[index + 1 : end]
        if name and _is_word(name[0]) and any(_is_alpha(c) for c in name):
            spans.append((index, end, name))
        index = max(end, index + 1)
    return spans


def extract_hashtags(text: str) -> list[str]:
    """Return the normalised names of the hashtags in ``text``, first use first."""
    names: list[str] = []
    for _start, _end, name in hashtag_spans(text):
        normalised = normalize_hashtag(name)
        if normalised and normalised not in names:
            names.append(normalised)
    return names


def _fold_and_lower(name: str) -> str:
    return unicodedata.normalize("NFKC", name).lower().translate(_ASCII_FOLDING)


def normalize_hashtag(name: str) -> str:
    """Normalise a tag name the way Mastodon stores and looks it up.

    Mastodon 4.x HashtagNormalizer: NFKC, lower case, ASCII folding, then every
    character outside ``[[:alnum:]]``, U+0E47 to U+0E4E and the separators is
    removed. The REST API (``/api/v1/timelines/tag/NAME``) and the name that posts
    are published under both use this form.
    """
    folded = _fold_and_lower(name)
    kept = [
        c for c in folded if _is_alnum(c) or c in _THAI_MARKS or c in HASHTAG_SEPARATORS
    ]
    return "".join(kept)


def normalize_stream_hashtag(name: str) -> str:
    """Normalise a tag name the way Mastodon's streaming server subscribes to it.

    streaming/index.js (Mastodon 4.2+, normalizeHashtag) keeps only ``\\p{L}``,
    ``\\p{N}``, ``_``, U+00B7 and U+200C. Unlike :func:`normalize_hashtag` it drops
    marks (Devanagari and Thai vowel signs) and U+30FB, so for such tags the stream
    subscribes to a channel that posts are never published on.
    """
    folded = _fold_and_lower(name)
    kept = [
        c for c in folded if unicodedata.category(c)[0] in "LN" or c in "_\u00b7\u200c"
    ]
    return "".join(kept)


# --- profile HTML -------------------------------------------------------------


def hashtag_link(name: str, base_url: str) -> str:
    """Return Mastodon's HTML for one hashtag, written as ``name`` (without ``#``).

    The shape comes from TextFormatter#link_to_hashtag (Mastodon 4.x); the link
    keeps the tag as written, percent-encoded.
    """
    url = f"{base_url}/tags/{quote(name, safe='')}"
    return (
        f'<a href="{html.escape(url)}" class="mention hashtag" rel="tag">'
        f"#<span>{html.escape(name, quote=False)}</span></a>"
    )


def _linkify_line(line: str, base_url: str) -> str:
    parts = []
    position = 0
    for start, end, name in hashtag_spans(line):
        parts.append(html.escape(line[position:start], quote=False))
        parts.append(hashtag_link(name, base_url))
        position = end
    parts.append(html.escape(line[position:], quote=False))
    return "".join(parts)


def render_profile_html(text: str, base_url: str, *, paragraphs: bool = True) -> str:
    """Render plain profile text as Mastodon HTML with hashtag links.

    With ``paragraphs`` (the bio), blank lines separate ``<p>`` paragraphs and
    single newlines become ``<br />``, as Rails' simple_format does for Mastodon.
    Without it (profile field values) only the links are added.
    NOTE: URLs and @mentions stay plain text; Mastodon would link them too.
    """
    if not paragraphs:
        return _linkify_line(text, base_url)
    if not text.strip():
        return ""
    blocks = re.split(r"\n\s*\n", text.strip())
    rendered = []
    for block in blocks:
        lines = [_linkify_line(line, base_url) for line in block.split("\n")]
        rendered.append("<p>" + "<br />".join(lines) + "</p>")
    return "".join(rendered)


# --- keyword filters ----------------------------------------------------------


@dataclass
class FilterSpec:
    """One v2 filter of an account, with what a FilterResult needs."""

    id: str
    title: str
    context: list[str]
    filter_action: str
    expires_at: datetime | None
    keywords: list[tuple[str, bool]]
    status_ids: list[str] = field(default_factory=list)
    # The full v2 Filter entity, as the REST API embeds it in a FilterResult.
    rest_entity: dict[str, Any] = field(default_factory=dict)

    def stream_entity(self) -> dict[str, Any]:
        """Return the smaller filter object that the streaming server embeds."""
        expires = self.expires_at.isoformat() if self.expires_at else None
        return {
            "id": self.id,
            "title": self.title,
            "context": list(self.context),
            "expires_at": expires,
            "filter_action": self.filter_action,
        }


_WORD_START = re.compile(r"[A-Za-z0-9_]")


def keyword_pattern(keywords: Sequence[tuple[str, bool]]) -> re.Pattern[str] | None:
    """Compile one case-insensitive pattern for all ``(keyword, whole_word)`` pairs.

    Same as CustomFilterKeyword#to_regex and streaming/index.js (Mastodon 4.x): a
    whole-word keyword gets a word boundary only on a side where it starts or ends
    with a word character. The boundary uses ASCII word characters, like the
    ``\\b`` of the streaming server's JavaScript regex.
    """
    parts = []
    for keyword, whole_word in keywords:
        if not keyword:
            continue
        expression = re.escape(keyword)
        if whole_word and _WORD_START.match(keyword[0]):
            expression = r"(?<![A-Za-z0-9_])" + expression
        if whole_word and _WORD_START.match(keyword[-1]):
            expression = expression + r"(?![A-Za-z0-9_])"
        parts.append(expression)
    if not parts:
        return None
    return re.compile("|".join(parts), re.IGNORECASE)


def _html_to_text(markup: str) -> str:
    markup = re.sub(r"<br\s*/?>", "\n", markup)
    markup = markup.replace("</p><p>", "\n\n")
    return html.unescape(re.sub(r"<[^>]*>", "", markup))


def searchable_text(status: dict[str, Any]) -> str:
    """Return the text that keyword filters are matched against.

    Mastodon 4.x (Status#searchable_text and streaming/index.js): content warning,
    content without HTML, poll options and media descriptions, joined by blank
    lines. For a boost it is the boosted post's text.
    """
    if isinstance(status.get("reblog"), dict):
        status = status["reblog"]
    pieces = [str(status.get("spoiler_text") or ""), str(status.get("content") or "")]
    poll = status.get("poll")
    if isinstance(poll, dict):
        pieces.extend(str(option.get("title") or "") for option in poll["options"])
    for attachment in status.get("media_attachments") or []:
        pieces.append(str(attachment.get("description") or ""))
    return _html_to_text("\n\n".join(pieces))


def filter_results(
    status: dict[str, Any],
    filters: Sequence[FilterSpec],
    now: datetime,
    *,
    for_stream: bool,
) -> list[dict[str, Any]]:
    """Return the ``filtered`` list (FilterResult entities) for ``status``.

    Mastodon 4.x matches every unexpired filter of the account, whatever its
    ``context``, because the client decides where a result applies (see
    CustomFilter.apply_cached_filters and the streaming server). Each
    ``keyword_matches`` contains the first matched text as it appears in the post.
    The streaming server checks keywords only, so ``status_matches`` is always
    null there.
    """
    text = searchable_text(status)
    proper = status["reblog"] if isinstance(status.get("reblog"), dict) else status
    candidate_ids = {str(status.get("id")), str(proper.get("id"))}
    results = []
    for spec in filters:
        if spec.expires_at is not None and spec.expires_at <= now:
            continue

        pattern = keyword_pattern(spec.keywords)
        match = pattern.search(text) if pattern and text else None
        keyword_matches = [match.group(0)] if match else None

        status_matches = None
        if not for_stream:
            hits = [sid for sid in spec.status_ids if sid in candidate_ids]
            status_matches = hits or None

        if keyword_matches is None and status_matches is None:
            continue
        entity = spec.stream_entity() if for_stream else spec.rest_entity
        results.append(
            {
                "filter": entity,
                "keyword_matches": keyword_matches,
                "status_matches": status_matches,
            }
        )
    return results


# --- OAuth scopes -------------------------------------------------------------

READ_STATUSES = ("read", "read:statuses")
WRITE_STATUSES = ("write", "write:statuses")

# (method, path pattern, scopes of which the token needs one), first match wins.
# A GET that is not listed needs "read" and any other method "write".
# NOTE: that default is a simplification: Mastodon 4.x accepts a narrower scope
# (such as "read:accounts") on many more endpoints than are listed here.
_SCOPE_RULES: list[tuple[str, re.Pattern[str], tuple[str, ...]]] = [
    (m, re.compile(p), s)
    for m, p, s in [
        ("POST", r"^/api/v1/statuses/[^/]+/(un)?reblog$", WRITE_STATUSES),
        (
            "POST",
            r"^/api/v1/statuses/[^/]+/(un)?favourite$",
            ("write", "write:favourites"),
        ),
        (
            "POST",
            r"^/api/v1/statuses/[^/]+/(un)?bookmark$",
            ("write", "write:bookmarks"),
        ),
        ("POST", r"^/api/v1/statuses$", WRITE_STATUSES),
        ("PUT", r"^/api/v1/statuses/[^/]+$", WRITE_STATUSES),
        ("DELETE", r"^/api/v1/statuses/[^/]+$", WRITE_STATUSES),
        ("GET", r"^/api/v1/accounts/", ("read", "read:accounts")),
        ("GET", r"^/api/v1/statuses", READ_STATUSES),
        ("GET", r"^/api/v1/timelines/", READ_STATUSES),
        ("GET", r"^/api/v[12]/filters", ("read", "read:filters")),
        ("POST", r"^/api/v[12]/filters", ("write", "write:filters")),
        ("PUT", r"^/api/v[12]/filters", ("write", "write:filters")),
        ("DELETE", r"^/api/v[12]/filters", ("write", "write:filters")),
        ("GET", r"^/api/v1/notifications", ("read", "read:notifications")),
        # Mastodon 4.x: the blocks, mutes and domain blocks controllers.
        ("GET", r"^/api/v1/blocks$", ("read", "read:blocks", "follow")),
        ("GET", r"^/api/v1/mutes$", ("read", "read:mutes", "follow")),
        ("GET", r"^/api/v1/domain_blocks$", ("read", "read:blocks", "follow")),
    ]
]

# Paths that need no scope: app and token handling, instance metadata, the mock's
# own control endpoints, and the streaming API (checked where streams are served).
_SCOPE_FREE_PREFIXES = (
    "/oauth",
    "/api/v1/apps",
    "/api/v1/_mock",
    "/api/v1/instance",
    "/api/v2/instance",
    "/api/v1/streaming",
    "/api/v1/custom_emojis",
    "/.well-known",
    "/nodeinfo",
    "/health",
)


def required_scopes(method: str, path: str) -> tuple[str, ...] | None:
    """Return the scopes of which a token needs one, or None if none is needed."""
    if path.startswith(_SCOPE_FREE_PREFIXES) or not path.startswith("/api/"):
        return None
    method = method.upper()
    for rule_method, pattern, scopes in _SCOPE_RULES:
        if rule_method == method and pattern.search(path):
            return scopes
    return ("read",) if method in ("GET", "HEAD") else ("write",)


def has_scope(granted: Sequence[str], required: Sequence[str]) -> bool:
    """Return whether ``granted`` covers one of ``required``.

    A top-level scope covers its parts: ``write`` covers ``write:statuses``.
    """
    for scope in required:
        if scope in granted or scope.split(":", 1)[0] in granted:
            return True
    return False
