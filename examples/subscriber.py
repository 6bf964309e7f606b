#!/usr/bin/env python3
"""A minimal alert subscriber: replays what it missed from the `spade:alerts` stream, then follows it.

    python examples/subscriber.py --redis redis://127.0.0.1:6379/0 [--prefix spade] [--from 0]

Reading the stream (not only pub/sub) means a subscriber that was offline misses nothing. Redelivery
after an outage is idempotent on the producer side; a consumer that must be strict skips repeats of
(alert_id, type, frame_index).
"""
from __future__ import annotations

import argparse
import json

import redis


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--prefix", default="spade")
    ap.add_argument("--from", dest="start", default="0", help="stream id to start after ('$' = only new)")
    args = ap.parse_args()
    r = redis.Redis.from_url(args.redis, decode_responses=True)
    key, last, seen = f"{args.prefix}:alerts", args.start, set()
    while True:
        for _, entries in r.xread({key: last}, block=5000, count=100) or []:
            for entry_id, fields in entries:
                last = entry_id
                msg = json.loads(fields["data"])
                dedup = (msg["alert_id"], msg["type"], msg.get("frame_index"))
                if dedup in seen:
                    continue
                seen.add(dedup)
                regions = ", ".join(f"[{x1},{y1},{x2},{y2}]" for x1, y1, x2, y2, *_ in msg["regions"])
                print(f"{msg['type']:>6} {msg['camera']:<12} {msg['alert_id']} peak={msg['peak_score']:.2f} "
                      f"regions={regions or '-'} snapshot={msg['snapshot']}", flush=True)


if __name__ == "__main__":
    main()
