#!/usr/bin/env python3
"""A dispatcher on hexmatch's HTTP API, in standard-library Python.

It follows the event feed (server-sent events, resumed with
Last-Event-ID after a dropped connection), reserves a driver for each
order with POST /v1/matches, and confirms each reservation when the
feed announces it: the flow of a dispatch service that learns what
happened from events instead of polling.

    python3 examples/dispatch.py --url http://127.0.0.1:8080 \
        --orders data/chicago_trips.csv --count 20 [--token TOKEN]

The orders are the first COUNT trips of the CSV (trip_id, ..., pickup
latitude and longitude in columns 3 and 4). It prints one line per
order and a summary, and exits 1 if an order was not reserved and
confirmed, or if the feed missed an event it should have carried (each
order's match.reserved and match.confirmed, and its driver's two status
changes).
"""

import argparse
import csv
import json
import queue
import sys
import threading
import time
import urllib.error
import urllib.request


class Api:
    """JSON over HTTP with an optional bearer token."""

    def __init__(self, url, token):
        self.url = url.rstrip("/")
        self.token = token

    def request(self, method, path, body=None, headers=None):
        req = urllib.request.Request(self.url + path, method=method)
        if self.token:
            req.add_header("Authorization", "Bearer " + self.token)
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            req.add_header("Content-Type", "application/json")
        return urllib.request.urlopen(req, data=data, timeout=30)

    def call(self, method, path, body=None):
        """The decoded answer, or (status, error body) for an HTTP error."""
        try:
            with self.request(method, path, body) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")


class Feed(threading.Thread):
    """Follows GET /v1/events into a queue, reconnecting with
    Last-Event-ID; a `gap` event (events lost beyond the server's backlog)
    is put on the queue like any other."""

    def __init__(self, api, types):
        super().__init__(daemon=True)
        self.api = api
        self.types = types
        self.events = queue.Queue()
        self.last_id = None
        self.connected = threading.Event()
        self.reconnects = 0

    def run(self):
        while True:
            headers = {"Accept": "text/event-stream"}
            if self.last_id is not None:
                headers["Last-Event-ID"] = str(self.last_id)
            try:
                with self.api.request("GET", "/v1/events?types=" + self.types,
                                      headers=headers) as resp:
                    self.connected.set()
                    self.read(resp)
            except (OSError, urllib.error.URLError):
                pass
            self.reconnects += 1
            time.sleep(0.2)

    def read(self, resp):
        kind, data, ident = None, [], None
        for raw in resp:
            line = raw.decode().rstrip("\r\n")
            if line == "":
                if data:
                    if ident is not None:
                        self.last_id = int(ident)
                    self.events.put((kind or "message", json.loads("\n".join(data))))
                kind, data, ident = None, [], None
            elif line.startswith(":"):
                continue  # keep-alive comment
            else:
                field, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if field == "event":
                    kind = value
                elif field == "data":
                    data.append(value)
                elif field == "id":
                    ident = value


def orders_from(path, count):
    with open(path, newline="") as f:
        rows = csv.reader(f)
        next(rows)
        for i, row in zip(range(count), rows):
            yield f"py-{i:04d}", float(row[2]), float(row[3])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--token")
    ap.add_argument("--orders", default="data/chicago_trips.csv")
    ap.add_argument("--count", type=int, default=20)
    ap.add_argument("--timeout-s", type=float, default=20.0)
    args = ap.parse_args()

    api = Api(args.url, args.token)
    feed = Feed(api, "match.*,driver.status")
    feed.start()
    if not feed.connected.wait(10):
        sys.exit("the event feed did not open")

    orders = list(orders_from(args.orders, args.count))
    mine = {order for order, _, _ in orders}
    for order, lat, lon in orders:
        status, body = api.call("POST", "/v1/matches",
                                {"order_id": order, "pickup": {"lat": lat, "lon": lon}})
        if status not in (200, 201):
            print(f"{order}: not reserved: {status} {body}")

    # Confirm each reservation as the feed announces it.
    seen = {}
    confirmed = set()
    statuses = 0
    deadline = time.monotonic() + args.timeout_s
    while confirmed != mine and time.monotonic() < deadline:
        try:
            kind, event = feed.events.get(timeout=0.5)
        except queue.Empty:
            continue
        if kind == "gap":
            print(f"gap in the feed: {event}")
            continue
        if kind == "driver.status":
            if event["data"].get("order_id") in mine:
                statuses += 1
            continue
        match = event["data"]
        order = match.get("order_id")
        if order not in mine:
            continue
        seen.setdefault(order, []).append(kind)
        if kind == "match.reserved":
            status, body = api.call("POST", f"/v1/matches/{order}/confirm")
            print(f"{order}: driver {match['driver_id']} at {match['distance_m']:.0f} m, "
                  f"confirm {status}")
        elif kind == "match.confirmed":
            confirmed.add(order)

    missing = sorted(mine - confirmed)
    print(f"orders {len(mine)}, reserved {sum('match.reserved' in k for k in seen.values())}, "
          f"confirmed {len(confirmed)}, driver.status events {statuses}, "
          f"reconnects {feed.reconnects}")
    if missing:
        print(f"not confirmed: {missing}")
        sys.exit(1)
    # Each order moved its driver twice: available -> reserved -> busy.
    if statuses != 2 * len(mine):
        print(f"expected {2 * len(mine)} driver.status events of these orders")
        sys.exit(1)


if __name__ == "__main__":
    main()
