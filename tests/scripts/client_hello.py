#!/usr/bin/env python3
"""Sends a hand-built TLS ClientHello whose SNI is whatever argv[3] says (escapes allowed,
e.g. 'evil\\r\\nX: y'), so tests can offer host names no real TLS library would send.
Prints whatever comes back (or 'closed')."""
import socket, struct, sys, os

host, port = sys.argv[1], int(sys.argv[2])
sni = sys.argv[3].encode().decode("unicode_escape").encode("latin-1")


def vec(n, data):
    return len(data).to_bytes(n, "big") + data


server_name = vec(2, b"\x00" + vec(2, sni))
ext = struct.pack(">H", 0) + vec(2, server_name)
body = (
    b"\x03\x03" + os.urandom(32) + vec(1, b"") + vec(2, b"\x13\x01\x00\x2f")
    + vec(1, b"\x00") + vec(2, ext)
)
hello = b"\x01" + len(body).to_bytes(3, "big") + body
record = b"\x16\x03\x01" + vec(2, hello)
s = socket.create_connection((host, port), timeout=10)
s.sendall(record)
try:
    data = s.recv(100)
    print("reply" if data else "closed")
except (ConnectionResetError, socket.timeout):
    print("closed")
