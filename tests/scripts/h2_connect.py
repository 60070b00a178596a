#!/usr/bin/env python3
"""A standard HTTP/2 CONNECT client (RFC 9113 section 8.5) on hyper-h2 (Debian python3-h2),
independent of our Rust code, for the gateway simulator tests.

Usage: h2_connect.py HOST PORT SNI CA_PEM PLAN_JSON

Opens ONE TLS connection to HOST:PORT (ALPN "h2" only, certificate verified against CA_PEM
for the name SNI), sends the HEADERS of every stream in the plan at once, waits until each
has a response (or a reset), then runs the steps of every 2xx stream in plan order, and
finally reads the bodies of the others to their end.

PLAN_JSON: {"streams": [STREAM, ...]}
STREAM: {"authority": "host:port" or null (no :authority),
         "method": "CONNECT" (default), "scheme": ..., "path": ... (only if given),
         "headers": [[name, value], ...],
         "steps": [STEP, ...]}
STEP: ["echo", TEXT]           send TEXT (no END_STREAM), read until as many bytes came back
      ["send", TEXT, REPEAT]   send TEXT * REPEAT, honouring flow control
      ["end"]                  send END_STREAM (our half-close)
      ["read_to_end"]          read until the server's END_STREAM (or a reset)
      ["reset"]                send RST_STREAM(CANCEL)

Prints one JSON object:
  {"alpn", "max_concurrent_streams", "initial_window_size", "connection_window",
   "streams": [{"status", "headers", "echoes", "sent", "sent_sha256", "received",
                "sha256", "text", "ended", "reset"}]}
"received"/"sha256" cover every DATA byte of the stream (the body for refusals); "text" is
that data decoded when shorter than 4 KiB; "connection_window" is our send window for the
whole connection once all responses are in (before any DATA was sent).
"""
import hashlib
import json
import socket
import ssl
import sys

import h2.config
import h2.connection
import h2.errors
import h2.events

TIMEOUT = 20

host, port, sni, ca_pem, plan = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], json.loads(sys.argv[5])

ctx = ssl.create_default_context(cafile=ca_pem)
ctx.set_alpn_protocols(["h2"])
raw = socket.create_connection((host, port), timeout=TIMEOUT)
sock = ctx.wrap_socket(raw, server_hostname=sni)
alpn = sock.selected_alpn_protocol()
if alpn != "h2":
    print(json.dumps({"alpn": alpn}))
    sys.exit(0)

# hyper-h2 (up to at least 4.3) insists on :scheme and :path in every request it sends,
# although RFC 9113 section 8.5 forbids them on CONNECT (python-hyper/h2 issue #1247), so
# outbound validation is off: the header blocks below are built by hand and the server
# validates them. Everything we receive is still validated.
conn = h2.connection.H2Connection(
    config=h2.config.H2Configuration(
        client_side=True, header_encoding="utf-8", validate_outbound_headers=False
    )
)
conn.initiate_connection()


def flush():
    data = conn.data_to_send()
    if data:
        sock.sendall(data)


class Stream:
    def __init__(self, spec):
        self.spec = spec
        self.id = None
        self.status = None
        self.headers = {}
        self.data = bytearray()
        self.ended = False
        self.reset = None
        self.echoes = []
        self.sent = hashlib.sha256()
        self.sent_len = 0

    def done(self):
        return self.ended or self.reset is not None

    def report(self):
        return {
            "status": self.status,
            "headers": self.headers,
            "echoes": self.echoes,
            "sent": self.sent_len,
            "sent_sha256": self.sent.hexdigest(),
            "received": len(self.data),
            "sha256": hashlib.sha256(self.data).hexdigest(),
            "text": self.data.decode("utf-8", "replace") if len(self.data) < 4096 else None,
            "ended": self.ended,
            "reset": self.reset,
        }


streams = [Stream(spec) for spec in plan["streams"]]
by_id = {}


def handle(events):
    for ev in events:
        if isinstance(ev, h2.events.ResponseReceived):
            st = by_id[ev.stream_id]
            st.headers = {k: v for k, v in ev.headers}
            st.status = int(st.headers[":status"])
        elif isinstance(ev, h2.events.DataReceived):
            st = by_id[ev.stream_id]
            st.data += ev.data
            # Give the window back at once, so the server can keep sending.
            conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, h2.events.StreamEnded):
            by_id[ev.stream_id].ended = True
        elif isinstance(ev, h2.events.StreamReset):
            by_id[ev.stream_id].reset = int(ev.error_code)
        elif isinstance(ev, h2.events.ConnectionTerminated):
            raise SystemExit(f"server sent GOAWAY: {ev.error_code} {ev.additional_data!r}")


def pump(until):
    """Reads and handles frames until `until()` is true."""
    flush()
    while not until():
        data = sock.recv(65536)
        if not data:
            raise SystemExit("server closed the connection")
        handle(conn.receive_data(data))
        flush()


def send(st, payload):
    view = memoryview(payload)
    while view:
        room = min(conn.local_flow_control_window(st.id), conn.max_outbound_frame_size)
        if room <= 0:
            pump(lambda: st.reset is not None or conn.local_flow_control_window(st.id) > 0)
            if st.reset is not None:
                raise SystemExit(f"stream {st.id} reset while sending: {st.reset}")
            continue
        chunk = bytes(view[:room])
        conn.send_data(st.id, chunk)
        st.sent.update(chunk)
        st.sent_len += len(chunk)
        view = view[room:]
        flush()


for st in streams:
    spec = st.spec
    st.id = conn.get_next_available_stream_id()
    by_id[st.id] = st
    headers = [(":method", spec.get("method", "CONNECT"))]
    if spec.get("scheme") is not None:
        headers.append((":scheme", spec["scheme"]))
    if spec.get("authority") is not None:
        headers.append((":authority", spec["authority"]))
    if spec.get("path") is not None:
        headers.append((":path", spec["path"]))
    headers += [(k, v) for k, v in spec.get("headers", [])]
    conn.send_headers(st.id, headers)
flush()

pump(lambda: all(st.status is not None or st.reset is not None for st in streams))
connection_window = conn.outbound_flow_control_window

for st in streams:
    if st.status is None or not 200 <= st.status < 300:
        continue
    for step in st.spec.get("steps", []):
        kind = step[0]
        if kind == "echo":
            text = step[1].encode()
            start = len(st.data)
            send(st, text)
            pump(lambda: st.done() or len(st.data) >= start + len(text))
            st.echoes.append(st.data[start:].decode("utf-8", "replace"))
        elif kind == "send":
            send(st, step[1].encode() * (step[2] if len(step) > 2 else 1))
        elif kind == "end":
            conn.end_stream(st.id)
            flush()
        elif kind == "read_to_end":
            pump(st.done)
        elif kind == "reset":
            conn.reset_stream(st.id, error_code=h2.errors.ErrorCodes.CANCEL)
            flush()
        else:
            raise SystemExit(f"unknown step {step!r}")

pump(lambda: all(st.done() for st in streams if st.status is None or not 200 <= st.status < 300))

report = {
    "alpn": alpn,
    "max_concurrent_streams": conn.remote_settings.max_concurrent_streams,
    "initial_window_size": conn.remote_settings.initial_window_size,
    "connection_window": connection_window,
    "streams": [st.report() for st in streams],
}
conn.close_connection()
flush()
sock.close()
print(json.dumps(report))
