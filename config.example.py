# Settings of hashtag_bot.py. Copy this file to config.py and edit the copy:
#
#     cp config.example.py config.py
#
# Every setting below shows its default. Any of them can also be set as an
# environment variable of the same name, which wins over this file: lists are
# comma-separated (HASHTAGS=python,rust), booleans are true/false, yes/no or
# 1/0, numbers are decimal. The instance and the token do not belong here:
# they go into .env (see the README).

# --- What to watch and what to do ------------------------------------------

# The hashtags to watch, with or without "#". Case and accents do not matter:
# "#Café" and "cafe" are the same tag on Mastodon. Required.
HASHTAGS = ["python"]

# The actions taken on each matching post, in this order: any of "boost",
# "favourite", "bookmark", "reply". Default: ["boost"].
ACTIONS = ["boost"]

# The text of a reply, required when ACTIONS contains "reply". The reply starts
# with the author's mention (@user, or @user@instance for other instances) and
# this text follows it. {acct} is replaced by that account name without "@",
# and {tag} by the matched hashtag without "#". Default: "" (empty).
REPLY_TEXT = ""

# The visibility of the replies: "public", "unlisted", "private" or "direct".
# "unlisted" keeps them out of public timelines. Default: "unlisted".
REPLY_VISIBILITY = "unlisted"

# --- Pace ----------------------------------------------------------------

# Seconds the bot waits before each action, so that two actions are at least
# this far apart. Default: 5.
ACTION_DELAY_SECONDS = 5

# Seconds during which an author the bot just acted on is left alone: their
# next posts are skipped until then. Default: 60.
USER_COOLDOWN_SECONDS = 60

# At most this many actions in any hour. When it is reached the bot waits for
# the hour to pass and then catches up; no post is dropped. Mastodon allows 300
# requests per 5 minutes and 300 new posts (replies too) per 3 hours.
# Default: 60.
MAX_ACTIONS_PER_HOUR = 60

# --- Connection ------------------------------------------------------------

# Seconds without any data from the stream, heartbeats included, after which
# the stream counts as dead and the bot reconnects. Mastodon sends a heartbeat
# every 15 seconds. Default: 60.
STREAM_TIMEOUT_SECONDS = 60

# Watch only the posts of your own instance (True), or every post your
# instance has received from the whole fediverse (False). Default: False.
LOCAL_ONLY = False

# Seconds between two checks of the hashtag timeline against what the stream
# delivered; posts the stream missed are handled then. Default: 300.
RECONCILE_SECONDS = 300

# Seconds between two reads of the timeline when the stream cannot be used,
# because the instance turned hashtag feeds off or the stream keeps failing.
# The bot tries the stream again every 30 minutes. Default: 60.
POLL_SECONDS = 60

# --- Memory between runs --------------------------------------------------

# The file where the bot saves, for each hashtag, the newest post it has
# handled, so that after a restart or an outage it catches up from there. A
# relative path is relative to hashtag_bot.py. Default: "hashtag_bot_state.json".
STATE_FILE = "hashtag_bot_state.json"

# At most this many missed posts are handled per hashtag when the bot catches
# up after a restart or an outage. Newer ones beyond that are skipped and
# counted in the log. Default: 200.
CATCH_UP_MAX = 200

# Log what would be done, and change nothing: no boosts, no replies, no state
# file. The same as --dry-run. Default: False.
DRY_RUN = False

# --- Being welcome on the fediverse ----------------------------------------

# Authors with one of these hashtags in their bio or profile fields, and posts
# that carry one, are left alone. Case and accents do not matter.
# Default: ["nobot", "nobots", "noboost"].
OPT_OUT_TAGS = ["nobot", "nobots", "noboost"]

# Skip accounts marked as bots, which keeps bots from boosting each other in
# loops. The bot never replies to a bot, whatever this is set to. Default: True.
SKIP_BOTS = True

# Skip posts that are replies. Default: False.
SKIP_REPLIES = False

# Skip posts marked sensitive or with a content warning. Default: False.
SKIP_SENSITIVE = False

# Act only on posts in these languages (ISO 639-1 codes such as "en", "de");
# an empty list means every language. Default: [] (all).
LANGUAGES = []

# Skip posts that have no language set. Default: False.
SKIP_UNKNOWN_LANGUAGE = False

# Skip posts with more hashtags than this, a common sign of spam. Default: 8.
MAX_HASHTAGS = 8

# Accounts never acted on: "user@domain", "user" for an account of your own
# instance, or "@domain" for every account of a domain.
# Default: [] (none). Example: ["spammer@example.com", "@spam.example"]
DENY_ACCOUNTS = []

# The bot always skips posts that your account's keyword filters hide
# (Preferences > Filters, action "Hide completely"). With True it also skips
# posts that a filter only warns about. Default: False.
SKIP_FILTER_WARN = False
