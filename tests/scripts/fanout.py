#!/usr/bin/env python3
"""Opens many TCP connections in parallel and checks each reached its *own* destination.

The targets run `rdr-testsrv whoami`, which first sends `local=<ip:port> peer=<ip:port>`.
For every connection we compare `local` with the address we asked for, then send a unique
token and expect it echoed back. Prints one JSON summary line; exit status 0 only if every
connection reached the right destination with the right bytes.

--reuse-port N: additionally, N times in a row, bind the same source port, connect, and
abort with RST (SO_LINGER 0) to a rotating destination: a stale record for that port must
never be handed to the next connection.
"""
import argparse, ipaddress, json, socket, struct, sys, threading, uuid
from concurrent.futures import ThreadPoolExecutor


def norm(host):
    ip = ipaddress.ip_address(host.strip("[]"))
    if ip.version == 6 and ip.ipv4_mapped:
        return str(ip.ipv4_mapped)
    return str(ip)


def parse_target(t):
    host, port = t.rsplit(":", 1)
    return host.strip("[]"), int(port)


def one(target, bind_port=None, abort=False):
    host, port = target
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(20)
    try:
        if bind_port:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", bind_port))
        s.connect((host, port))
        f = s.makefile("rb")
        line = f.readline().decode().strip()
        fields = dict(kv.split("=", 1) for kv in line.split())
        got_host, got_port = fields["local"].rsplit(":", 1)
        if norm(got_host) != norm(host) or int(got_port) != port:
            return ("mismatch", f"asked {host}:{port} reached {fields['local']}")
        token = uuid.uuid4().hex.encode() + b"\n"
        s.sendall(token)
        echoed = f.readline()
        if echoed != token:
            return ("bad_echo", f"{host}:{port} echoed {echoed!r}")
        if abort:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return ("ok", "")
    except Exception as e:  # noqa: BLE001 - every failure is reported, none hidden
        return ("error", f"{host}:{port}: {e!r}")
    finally:
        s.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", required=True, help="comma-separated host:port")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=100)
    ap.add_argument("--reuse-port", type=int, default=0)
    ap.add_argument("--source-port", type=int, default=40999)
    a = ap.parse_args()
    targets = [parse_target(t) for t in a.targets.split(",")]
    results = {"ok": 0, "mismatch": 0, "bad_echo": 0, "error": 0}
    samples = []
    lock = threading.Lock()

    def record(r):
        with lock:
            results[r[0]] += 1
            if r[0] != "ok" and len(samples) < 10:
                samples.append(r[1])

    with ThreadPoolExecutor(max_workers=a.concurrency) as ex:
        for r in ex.map(lambda i: one(targets[i % len(targets)]), range(a.n)):
            record(r)
    for i in range(a.reuse_port):
        record(one(targets[i % len(targets)], bind_port=a.source_port, abort=True))
    print(json.dumps({"results": results, "samples": samples}))
    sys.exit(0 if results["ok"] == a.n + a.reuse_port else 1)


if __name__ == "__main__":
    main()
