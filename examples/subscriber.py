#!/usr/bin/env python3
"""Alert subscriber: replays the `<prefix>:alerts` stream, then follows it for as long as it runs.

    python examples/subscriber.py --redis redis://127.0.0.1:6379/0 [--prefix spade] [--from 0] [--json]

What it guarantees:

- It follows the stream indefinitely. It waits with XREAD BLOCK (`--block-ms`, default 5000) on a
  socket whose timeout is 10 s longer than the block time, so an idle stream (no alerts for hours) is
  just "nothing new", never an error.
- It rides out Redis outages and restarts. On a connection error or a timeout it prints one line to
  stderr, reconnects with jittered exponential backoff (0.5 s to 30 s) and prints one line when Redis
  is back. No traceback.
- Nothing is missed or repeated. It resumes after the last stream id it read (`--from $` is pinned to
  the stream's last id at the first connect, so alerts added during an outage are still read). It
  skips repeats of (alert_id, type, frame_index), which at-least-once delivery can produce. It
  remembers the last 4096 of those keys. Entries the producer trimmed (`MAXLEN`) while the subscriber
  was away cannot be replayed.
- Output: one line per alert message on stdout, flushed at once. With `--json` each line is the message
  itself as strict JSON (no NaN/Infinity), so other programs can consume it.
- Passwords in the URL never appear in its output. A bad URL or option: one `error:` line, exit 2.
  Ctrl-C or SIGTERM: exit 0.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import signal
import sys
import time

import redis
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, AuthorizationError
from redis.retry import Retry

BACKOFF_MIN_S, BACKOFF_MAX_S = 0.5, 30.0
DEDUP_KEYS = 4096
DOWN = (redis.ConnectionError, redis.TimeoutError)


# The rules of the package's stream.avio.redact, copied so this example runs without the package (a test
# checks the two agree): user:password@ (also user-only, password-only, '@' inside the password) and
# credential-looking query parameters (redis://host/0?password=...).
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^\s/?#@]*(?:@[^\s/?#@]*)*@")
_SECRET_QUERY = re.compile(
    r"(?i)([?&;](?:user|username|password|passwd|pwd|pass|token|access_token|auth|key|api_key|"
    r"apikey|secret|signature|sig)=)[^&#\s'\"]*"
)


def redact(url: str) -> str:
    """The URL with its credentials replaced by '***'."""
    return _SECRET_QUERY.sub(r"\1***", _USERINFO.sub(r"\1***@", url))


def log(text: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} subscriber: {text}", file=sys.stderr, flush=True)


def human(msg: dict) -> str:
    regions = ", ".join(f"[{r[0]},{r[1]},{r[2]},{r[3]}]" for r in msg.get("regions") or [])
    peak = msg.get("peak_score")
    peak = f"{peak:.2f}" if isinstance(peak, (int, float)) else "-"
    return (
        f"{msg.get('type', '?'):>6} {msg.get('camera', '?'):<12} {msg.get('alert_id', '?')} peak={peak} "
        f"regions={regions or '-'} snapshot={msg.get('snapshot')}"
    )


def follow(r: redis.Redis, key: str, start: str, as_json: bool, block_ms: int, where: str) -> None:
    last = None if start == "$" else start  # '$' is resolved to a real id once connected
    seen: collections.OrderedDict = collections.OrderedDict()  # LRU of (alert_id, type, frame_index)
    down_since, failures = None, 0
    while True:
        try:
            if last is None:
                tip = r.xrevrange(key, count=1)
                last = tip[0][0] if tip else "0-0"
            reply = r.xread({key: last}, block=block_ms, count=100)
        except (AuthenticationError, AuthorizationError):
            raise  # a ConnectionError subclass, but waiting will not fix a wrong password
        except DOWN as err:
            if down_since is None:
                down_since = time.monotonic()
                log(
                    f"lost Redis at {where} ({type(err).__name__}: {err}); reconnecting with backoff "
                    f"up to {BACKOFF_MAX_S:.0f} s, will resume after id {last or '$'}"
                )
            delay = min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2**failures)
            failures += 1
            time.sleep(random.uniform(delay / 2, delay))
            continue
        if down_since is not None:
            log(f"Redis is back at {where} after {time.monotonic() - down_since:.1f} s; resuming after id {last}")
            down_since, failures = None, 0
        if isinstance(reply, dict):  # RESP3 (`?protocol=3` in the URL) answers with a dict
            reply = reply.items()
        for _, entries in reply or []:
            for entry_id, fields in entries:
                last = entry_id
                try:
                    msg = json.loads(fields["data"], parse_constant=lambda _: None)
                    dedup = (msg["alert_id"], msg["type"], msg.get("frame_index"))
                except (KeyError, TypeError, ValueError):
                    log(f"skipping malformed entry {entry_id}")
                    continue
                if dedup in seen:
                    seen.move_to_end(dedup)
                    continue
                seen[dedup] = None
                if len(seen) > DEDUP_KEYS:
                    seen.popitem(last=False)
                line = json.dumps(msg, separators=(",", ":"), allow_nan=False) if as_json else human(msg)
                print(line, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description="Print spade alerts from Redis; see the module docstring.")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="redis:// or rediss:// URL")
    ap.add_argument("--prefix", default="spade", help="key prefix (sinks.redis.prefix)")
    ap.add_argument(
        "--from",
        dest="start",
        default="0",
        help="stream id to start after: '0' = replay everything (default), '$' = only new",
    )
    ap.add_argument("--json", action="store_true", help="print each message as one strict-JSON line")
    ap.add_argument("--block-ms", type=int, default=5000, help="XREAD block time in ms (default 5000)")
    args = ap.parse_args()
    if not re.fullmatch(r"\$|\d+(-\d+)?", args.start):
        ap.error(f"--from must be '0', '$' or a stream id like 1700000000000-0, not {args.start!r}")
    if args.block_ms < 1:
        ap.error("--block-ms must be >= 1")
    where = redact(args.redis)
    try:
        r = redis.Redis.from_url(
            args.redis,
            decode_responses=True,
            socket_timeout=args.block_ms / 1000 + 10,
            socket_connect_timeout=5,
            retry=Retry(NoBackoff(), 1),
        )
    except ValueError as err:
        print(f"error: bad --redis URL {where}: {str(err).replace(args.redis, where)}", file=sys.stderr)
        return 2

    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        follow(r, f"{args.prefix}:alerts", args.start, args.json, args.block_ms, where)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # `... | head`: the reader is gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except redis.RedisError as err:  # wrong password, no permission, not a stream: retrying won't help
        print(f"error: Redis at {where}: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
