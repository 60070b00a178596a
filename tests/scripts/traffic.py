"""Traffic for the lifecycle tests, run inside a pod until the stop file appears.

usage: traffic.py HOST PORT LONG STOP_FILE PROGRESS_FILE

- New connections, one after another as fast as they go: connect, read the whoami
  greeting, close. Each is `ok`, `direct` (no route: the connect went past the proxy; pods
  have no route to the internet hosts) or `failed` (anything else, e.g. refused or reset).
- LONG long-lived connections: one echo every 100 ms; a reply that is missing (1 s), short
  or wrong ends that connection, and when and why is recorded.

PROGRESS_FILE is rewritten every 50 ms with {"new": connections so far, "pings": [echoes of
each long-lived connection], "broken": how many of those have ended}, so a test can wait for
traffic to have flowed. At the end one JSON line goes to stdout.
"""
import errno
import json
import os
import socket
import sys
import threading
import time

host, port, n_long, stop_file, progress = (
    sys.argv[1],
    int(sys.argv[2]),
    int(sys.argv[3]),
    sys.argv[4],
    sys.argv[5],
)
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
DIRECT = {errno.ENETUNREACH, errno.EHOSTUNREACH}
stop = threading.Event()
lock = threading.Lock()
new = {"ok": 0, "direct": 0, "failed": 0, "errors": []}
longs = []


def one():
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect((host, port))
        line = s.makefile("rb").readline()
        if not line.startswith(b"local="):
            return "failed", "greeting %r" % line[:40]
        return "ok", None
    except OSError as e:
        return ("direct" if e.errno in DIRECT else "failed"), str(e)
    finally:
        s.close()


def new_loop():
    n = 0
    while not stop.is_set():
        kind, err = one()
        with lock:
            new[kind] += 1
            if err and len(new["errors"]) < 10:
                new["errors"].append(err)
        n += 1


def report():
    state = {
        "new": new["ok"] + new["direct"] + new["failed"],
        "pings": [r["pings"] for r in longs],
        "broken": sum(1 for r in longs if r["end"] == "broken"),
    }
    tmp = progress + ".tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(state))
    os.replace(tmp, progress)


def long_conn(rec, i):
    try:
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect((host, port))
        f = s.makefile("rb")
        f.readline()
        s.settimeout(1.0)
        while not stop.is_set():
            msg = b"ping %d %d\n" % (i, rec["pings"])
            s.sendall(msg)
            got = f.readline()
            if got != msg:
                raise OSError("reply %r" % got[:40])
            rec["pings"] += 1
            time.sleep(0.1)
        rec["end"] = "stopped"
    except OSError as e:
        rec["end"] = "broken"
        rec["error"] = str(e)


longs = [{"pings": 0, "end": None, "error": None} for _ in range(n_long)]
threads = [threading.Thread(target=long_conn, args=(r, i)) for i, r in enumerate(longs)]
threads.append(threading.Thread(target=new_loop))
for t in threads:
    t.start()
while not os.path.exists(stop_file):
    report()
    time.sleep(0.05)
stop.set()
for t in threads:
    t.join()
report()
print(json.dumps({"new": new, "long": longs}))
