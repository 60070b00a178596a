#!/usr/bin/env python3
"""Regenerates the checked-in seed corpora under fuzz/corpus/<target>/.

  python3 fuzz/make_seeds.py            # everything (needs openssl, curl, cargo)
  python3 fuzz/make_seeds.py --no-ech   # skip the rustls ECH client (builds aws-lc)

sniff: ClientHellos of real clients (openssl s_client TLS 1.2 and 1.3, curl, Python's ssl,
node) captured by a listener on 127.0.0.1, plus rustls hellos with a real ECH extension and
with GREASE ECH (the `seed-hellos` package, which prints the bytes rustls writes). Each hello
is stored as sent, re-framed into several TLS records, and cut short (the first read of a
slow client). The other targets get hand-written inputs: every shape of response, file and
frame their parsers must handle. A target's directory is replaced as a whole.
"""
import argparse
import hashlib
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")


def save(target, data, label):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    name = f"{label}-{hashlib.sha1(data).hexdigest()[:12]}"
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---------------------------------------------------------------- sniff: real ClientHellos

def hello_complete(buf):
    """True once buf holds a whole ClientHello (possibly over several records)."""
    hs = b""
    i = 0
    while i + 5 <= len(buf):
        if buf[i] != 22:
            return True  # not a handshake record: let the fuzzer have it as is
        n = struct.unpack(">H", buf[i + 3:i + 5])[0]
        if i + 5 + n > len(buf):
            return False
        hs += buf[i + 5:i + 5 + n]
        i += 5 + n
        if len(hs) >= 4 and len(hs) >= 4 + int.from_bytes(hs[1:4], "big"):
            return True
    return False


def capture(client_argv, env=None):
    """Runs a client against a listener on 127.0.0.1; returns the first bytes it sent."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(10)
    port = srv.getsockname()[1]
    argv = [a.replace("{port}", str(port)) for a in client_argv]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    data = b""
    try:
        conn, _ = srv.accept()
        conn.settimeout(5)
        while not hello_complete(data):
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
        conn.close()
    finally:
        srv.close()
        try:
            proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
    return data


def python_client(max12):
    code = (
        "import socket,ssl,sys\n"
        "c=ssl.create_default_context(); c.check_hostname=False; c.verify_mode=ssl.CERT_NONE\n"
        "c.set_alpn_protocols(['h2','http/1.1'])\n"
        + ("c.maximum_version=ssl.TLSVersion.TLSv1_2\n" if max12 else "")
        + "s=socket.create_connection(('127.0.0.1',int(sys.argv[1])))\n"
        "try: c.wrap_socket(s,server_hostname=sys.argv[2])\n"
        "except Exception: pass\n"
    )
    return [sys.executable, "-c", code, "{port}"]


def reframe(hello, cuts):
    """The hello's handshake bytes re-sent as several records, cut at `cuts`."""
    if len(hello) < 5 or hello[0] != 22:
        return None
    n = struct.unpack(">H", hello[3:5])[0]
    body = hello[5:5 + n]
    out, start = b"", 0
    for c in list(cuts) + [len(body)]:
        c = min(c, len(body))
        if c > start:
            out += hello[:3] + struct.pack(">H", c - start) + body[start:c]
            start = c
    return out + hello[5 + n:]


def sniff_variants(label, hello):
    save("sniff", hello, label)
    for cuts, tag in (([1], "rec1"), ([40, 41], "rec3"), ([len(hello) // 2], "rechalf")):
        r = reframe(hello, cuts)
        if r:
            save("sniff", r, f"{label}-{tag}")
    # What the first read of a slow client holds.
    for n in (3, 5 + 38, len(hello) // 2):
        save("sniff", hello[:n], f"{label}-cut{n}")


def sniff_seeds(ech):
    clients = {
        "openssl-tls12": ["openssl", "s_client", "-connect", "127.0.0.1:{port}", "-tls1_2",
                          "-servername", "tls12.openssl.example"],
        "openssl-tls13": ["openssl", "s_client", "-connect", "127.0.0.1:{port}", "-tls1_3",
                          "-servername", "tls13.openssl.example", "-alpn", "h2,http/1.1"],
        "openssl-nosni": ["openssl", "s_client", "-connect", "127.0.0.1:{port}", "-noservername"],
        "curl": ["curl", "-sk", "--max-time", "5", "--resolve",
                 "curl.example:{port}:127.0.0.1", "https://curl.example:{port}/"],
        "curl-tls12": ["curl", "-sk", "--max-time", "5", "--tlsv1.2", "--tls-max", "1.2",
                       "--resolve", "curl12.example:{port}:127.0.0.1",
                       "https://curl12.example:{port}/"],
        "python": python_client(False) + ["python.example"],
        "python-tls12": python_client(True) + ["python12.example"],
        "node": ["node", "-e",
                 "require('tls').connect({host:'127.0.0.1',port:+process.argv[1],"
                 "servername:'node.example',rejectUnauthorized:false,"
                 "ALPNProtocols:['h2']}).on('error',()=>{})", "{port}"],
        # An HTTP request on the same port (the sniffer's other parser).
        "curl-http": ["curl", "-s", "--max-time", "5", "-H", "X-Seed: 1",
                      "http://curl-http.example:{port}/path?q=1", "--resolve",
                      "curl-http.example:{port}:127.0.0.1"],
    }
    for label, argv in clients.items():
        if not shutil.which(argv[0]):
            print(f"sniff: {label}: {argv[0]} not installed, skipped")
            continue
        hello = capture(argv)
        if not hello:
            print(f"sniff: {label}: nothing captured")
            continue
        print(f"sniff: {label}: {len(hello)} bytes")
        sniff_variants(label, hello)
    if ech:
        # rustls with a real ECH extension and with GREASE ECH; it prints name<TAB>hex lines.
        out = subprocess.run(
            ["cargo", "run", "--quiet", "--release", "--target-dir",
             os.path.join(HERE, "target", "seed-hellos")],
            cwd=os.path.join(HERE, "seed-hellos"), check=True, capture_output=True,
            text=True).stdout
        for line in out.splitlines():
            label, hexed = line.split("\t")
            hello = bytes.fromhex(hexed)
            print(f"sniff: {label}: {len(hello)} bytes")
            sniff_variants(label, hello)


# ---------------------------------------------------------------- connect_response

def connect_response_seeds():
    R = "\r\n"
    heads = {
        "200": "HTTP/1.1 200 Connection established\r\n\r\n",
        "200-tunnel-bytes": "HTTP/1.1 200 OK\r\n\r\nSSH-2.0-server\r\n",
        "200-headers": "HTTP/1.1 200 OK\r\nProxy-Agent: squid/6\r\nVia: 1.1 p\r\n\r\n",
        "http10-200": "HTTP/1.0 200 Connection established\r\n\r\n",
        "100-then-200": "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\ndata",
        "103-then-407": "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                        "HTTP/1.1 407 Proxy Authentication Required\r\n\r\n",
        "101": "HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
        "407-no-body": "HTTP/1.1 407 Proxy Authentication Required\r\n"
                       "Proxy-Authenticate: Basic realm=\"corp\"\r\n\r\n",
        "407-body": "HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 13\r\n"
                    "Proxy-Authenticate: Negotiate\r\n\r\naccess denied",
        "407-chunked": "HTTP/1.1 407 Denied\r\nTransfer-Encoding: chunked\r\n\r\n"
                       "5\r\nhello\r\n0\r\n\r\n",
        "200-dup-cl": "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nContent-Length: 5\r\n\r\nabcde",
        "200-cl-te": "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        "407-dup-te": "HTTP/1.1 407 No\r\nTransfer-Encoding: chunked\r\n"
                      "Transfer-Encoding: gzip\r\n\r\n0\r\n\r\n",
        "obs-fold": "HTTP/1.1 200 OK\r\nX-Folded: a\r\n  continued\r\n\r\n",
        "bare-lf": "HTTP/1.1 200 OK\nServer: x\n\ntunnel",
        "mixed-eol": "HTTP/1.1 200 OK\r\nServer: x\n\r\ntunnel",
        "reason-ctl": "HTTP/1.1 403 Forbidden\tby\x7fpolicy\x80\xff\r\n\r\n",
        "no-reason": "HTTP/1.1 502\r\n\r\n",
        "status-999": "HTTP/1.1 999 What\r\n\r\n",
        "status-099": "HTTP/1.1 099 Low\r\n\r\n",
        "status-2dig": "HTTP/1.1 20 OK\r\n\r\n",
        "http2-line": "HTTP/2 200\r\n\r\n",
        "ssh": "SSH-2.0-OpenSSH_9.6\r\n",
        "tls-alert": "\x15\x03\x03\x00\x02\x02\x28",
        "endless-headers": "HTTP/1.1 200 OK\r\n" + "X-Pad: " + "a" * 100 + "\r\n" * 1,
        "many-headers": "HTTP/1.1 200 OK\r\n" + "".join(f"H{i}: v\r\n" for i in range(70)) + R,
        "1xx-flood": "HTTP/1.1 100 Continue\r\n\r\n" * 50 + "HTTP/1.1 200 OK\r\n\r\n",
        "space-before-colon": "HTTP/1.1 200 OK\r\nX-A : b\r\n\r\n",
        "nul-in-header": "HTTP/1.1 200 OK\r\nX-A: b\x00c\r\n\r\n",
    }
    for label, head in heads.items():
        data = head.encode("latin-1")
        # Whole, then in reads of 1 byte, of 7 bytes, and of (3, 50) bytes in turn.
        save("connect_response", b"\x00" + data, label)
        save("connect_response", b"\x01\x00" + data, label + "-1byte")
        save("connect_response", b"\x01\x06" + data, label + "-7bytes")
        save("connect_response", b"\x02\x02\x31" + data, label + "-3-50")
    # Headers that never end: just over the 16 KiB head limit, and a complete head just under.
    big = b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"b" * (16 * 1024) + b"\r\n"
    save("connect_response", b"\x01\xff" + big, "never-ends")
    under = b"HTTP/1.1 200 OK\r\nX-Pad: " + b"c" * (16 * 1024 - 30) + b"\r\n\r\nT"
    save("connect_response", b"\x00" + under, "just-under-limit")


# ---------------------------------------------------------------- h2_connect

def frame(ftype, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + \
        struct.pack(">I", stream) + payload


def h2_seeds():
    HEADERS, DATA, RST, SETTINGS, PING, GOAWAY, WINDOW, CONT = 1, 0, 3, 4, 6, 7, 8, 9
    END_STREAM, END_HEADERS, ACK = 1, 4, 1
    status = lambda code: b"\x48\x03" + code.encode()  # :status, literal, incremental index
    seeds = {
        "200-data-end": frame(HEADERS, END_HEADERS, 1, b"\x88")
        + frame(DATA, 0, 1, b"hello") + frame(DATA, END_STREAM, 1, b""),
        "200-indexed": frame(HEADERS, END_HEADERS, 1, b"\x88"),
        "200-literal-server": frame(HEADERS, END_HEADERS, 1, status("200") + b"\x76\x03gw1"),
        "407": frame(HEADERS, END_HEADERS | END_STREAM, 1, status("407")),
        "403-body": frame(HEADERS, END_HEADERS, 1, status("403"))
        + frame(DATA, END_STREAM, 1, b"forbidden"),
        "100-then-200": frame(HEADERS, END_HEADERS, 1, status("100"))
        + frame(HEADERS, END_HEADERS, 1, b"\x88") + frame(DATA, END_STREAM, 1, b"x"),
        "continuation": frame(HEADERS, 0, 1, b"\x88") + frame(CONT, END_HEADERS, 1, b"\x76\x01a"),
        "rst-stream": frame(RST, 0, 1, struct.pack(">I", 7)),
        "goaway": frame(GOAWAY, 0, 0, struct.pack(">II", 0, 0) + b"bye"),
        "ping": frame(PING, 0, 0, b"\0" * 8) + frame(HEADERS, END_HEADERS, 1, b"\x88"),
        "window-update": frame(WINDOW, 0, 1, struct.pack(">I", 1 << 20))
        + frame(HEADERS, END_HEADERS, 1, b"\x88"),
        "settings-window-0": frame(SETTINGS, 0, 0, struct.pack(">HI", 4, 0))
        + frame(HEADERS, END_HEADERS, 1, b"\x88"),
        "data-before-headers": frame(DATA, 0, 1, b"early") + frame(HEADERS, END_HEADERS, 1, b"\x88"),
        "bad-hpack": frame(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\xff\x0f"),
        "status-missing": frame(HEADERS, END_HEADERS, 1, b"\x76\x01a"),
        "stream-3": frame(HEADERS, END_HEADERS, 3, b"\x88"),
        "huge-length": b"\xff\xff\xff\x00\x00\x00\x00\x00\x01",
    }
    for label, data in seeds.items():
        save("h2_connect", b"\x01" + data, label)  # after a valid server preface
    raw = frame(SETTINGS, 0, 0, b"") + frame(SETTINGS, ACK, 0, b"") + \
        frame(HEADERS, END_HEADERS, 1, b"\x88")
    save("h2_connect", b"\x00" + raw, "own-preface")
    save("h2_connect", b"\x00HTTP/1.1 200 OK\r\n\r\n", "http1-answer")


# ---------------------------------------------------------------- config, secret_files

def config_seeds():
    yaml = {
        "readme": """gateway-url: https://contoso.gw.arc.azure.com
proxy-https: http://proxy.corp.example:3128
proxy-skip-range: 10.0.0.0/16,kubernetes.default.svc,.svc.cluster.local,.svc
route-presets: [arc-not-covered]
routes:
  - host: "*.blob.core.windows.net:443"
    route: proxy
  - cidr: 198.51.100.0/24
    route: direct
allow-dial: []
""",
        "limits": """proxy-http: http://user:p%40ss@[2001:db8::1]:8080
connect-timeout: 2.5
tls-timeout: 0.001
sniff-timeout: 1e-3
idle-timeout: 0
max-connections: 1
max-pending: 18446744073709551615
gateway-h2-streams: 0
""",
        "headers": """gateway-url: https://gw.example:8443
gateway-header: ["X-Tenant: t1", "Host: evil", "X-Bad: a\\r\\nb"]
gateway-connect-to: 192.0.2.1
gateway-http2: false
""",
        "empty": "",
        "anchors": "a: &x [1, 2]\nroutes: *x\n",
    }
    for label, text in yaml.items():
        save("config", b"\x00" + text.encode(), "yaml-" + label)
    toml = {
        "basic": """gateway-url = "https://gw.example"
proxy-https = "https://proxy.example:443"
proxy-skip-range = "10.0.0.0/8,.local"
[[routes]]
host = "login.example"
route = "direct"
[[routes]]
cidr = "203.0.113.0/24"
port = 443
route = "proxy"
""",
        "types": "proxy-port = 70000\nconnect-timeout = -1\nkubernetes = \"yes\"\n",
        "unknown": "no-such-key = 1\n",
    }
    for label, text in toml.items():
        save("config", b"\x01" + text.encode(), "toml-" + label)


def secret_seeds():
    files = {
        "user-pass": b"user:pass\n",
        "colons": b"user:p:a:ss\r\n",
        "no-colon": b"justauser\n",
        "empty-user": b":pass\n",
        "two-lines": b"a:b\nc:d\n",
        "ctl": b"u:p\x01ss\n",
        "utf8": "\u00fcser:p\u00e4ss\n".encode(),
        "bom": b"\xef\xbb\xbfuser:pass\n",
        "token": b"eyJhbGciOi.J9.sig-_~+/=\n",
        "token-space": b"two words\n",
        "ws-only": b" \t\r\n",
        "not-utf8": b"\xff\xfeu:p",
    }
    for label, data in files.items():
        # First byte: length of the admin token file part.
        save("secret_files", bytes([len(data)]) + data + b"Bearer " + data.strip(), label)
        save("secret_files", data, label + "-raw")
    save("secret_files", b"\x06s3cretBearer s3cret", "admin-match")
    save("secret_files", b"\x07s3cret\nBearer s3cret", "admin-trimmed")
    save("secret_files", b"\x06s3cretbearer s3cret", "admin-case")
    save("secret_files", b"\x06s3cretBearer  s3cret", "admin-2spaces")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-ech", action="store_true", help="skip the rustls ECH client")
    ap.add_argument("--only", help="one target")
    a = ap.parse_args()
    steps = {
        "sniff": lambda: sniff_seeds(not a.no_ech),
        "connect_response": connect_response_seeds,
        "h2_connect": h2_seeds,
        "config": config_seeds,
        "secret_files": secret_seeds,
    }
    for name, step in steps.items():
        if a.only in (None, name):
            # The directory holds generated seeds only: regenerating replaces them (the
            # ClientHellos differ on every run: random, session id, key shares).
            shutil.rmtree(os.path.join(CORPUS, name), ignore_errors=True)
            step()


if __name__ == "__main__":
    main()
