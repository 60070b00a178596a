#!/usr/bin/env python3
"""Sends N MiB to an echo target while reading the echo back; prints both SHA-256 digests.

The target (`rdr-testsrv whoami`) first sends one greeting line, then echoes every byte.
Usage: bulk.py HOST PORT MIB
"""
import hashlib, os, socket, sys, threading

host, port, mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
total = mib * 1024 * 1024
s = socket.create_connection((host, port), timeout=60)
f = s.makefile("rb")
greeting = f.readline()
sent = hashlib.sha256()


def writer():
    left = total
    while left:
        chunk = os.urandom(min(left, 256 * 1024))
        sent.update(chunk)
        s.sendall(chunk)
        left -= len(chunk)
    s.shutdown(socket.SHUT_WR)


t = threading.Thread(target=writer)
t.start()
got = hashlib.sha256()
n = 0
while True:
    b = f.read1(256 * 1024)
    if not b:
        break
    got.update(b)
    n += len(b)
t.join()
print(f"greeting={greeting.decode().strip()!r}")
print(f"sent={sent.hexdigest()} bytes={total}")
print(f"recv={got.hexdigest()} bytes={n}")
