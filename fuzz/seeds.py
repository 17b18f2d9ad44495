#!/usr/bin/env python3
"""Writes the seed corpora of fuzz/corpus/<target>/ from the inputs the tests use
(tests/core.rs, tests/common, tests/im.rs, tests/cluster.rs, src/config/'s tests,
systemd/ringpush.toml) and cluster payloads in the wire format of src/cluster/wire.rs.
Deterministic; rerun after changing it and commit the files."""
import hashlib, os, shutil, struct, sys

ROOT = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(ROOT)
RFC_KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def write(target, items):
    d = os.path.join(ROOT, "corpus", target)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    for item in items:
        data = item.encode() if isinstance(item, str) else bytes(item)
        name = hashlib.sha1(data).hexdigest()[:16]
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)


# --- handshake: tests/common upgrade_request and the refusals of tests/core.rs -----------
def upgrade(path="/ws", extra=()):
    r = (f"GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
         f"Connection: Upgrade\r\nSec-WebSocket-Key: {RFC_KEY}\r\nSec-WebSocket-Version: 13\r\n")
    for name, value in extra:
        r += f"{name}: {value}\r\n"
    return r + "\r\n"

good = upgrade("/ws?token=abc")
handshake = [
    good, upgrade("/echo"), upgrade("/demo"), upgrade("/ws"),
    upgrade("/ws", [("Authorization", "Bearer eyJhbGciOiJIUzI1NiJ9.e30.x")]),
    upgrade("/ws?token=t&x=1", [("Origin", "https://good.example")]),
    upgrade("/ws", [("X-Forwarded-For", "6.6.6.6, 203.0.113.7, 10.0.0.2"), ("X-Real-IP", "203.0.113.9")]),
    upgrade("/ws", [("X-Forwarded-For", "::1, 10.0.0.1"), ("X-Real-IP", "2001:db8::1")]),
    good + "\x81\x89after 101",
    good.replace("Upgrade: websocket\r\n", ""),
    good.replace("Connection: Upgrade\r\n", "Connection: keep-alive\r\n"),
    good.replace("Connection: Upgrade\r\n", "Connection: keep-alive, Upgrade\r\n"),
    good.replace("Version: 13", "Version: 12"),
    good.replace(f"Sec-WebSocket-Key: {RFC_KEY}\r\n", ""),
    good.replace(RFC_KEY, "c2hvcnQ="),
    good.replace("HTTP/1.1", "HTTP/1.0"),
    good.replace("GET", "POST"),
    good.replace("Host: localhost\r\n", ""),
    "\x00\x01\x02garbage\x7f\r\n\r\n", "hello there\r\n\r\n",
    "GET /echo HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",
    good[:-2] + "X-Padding: " + "a" * 300 + "\r\n\r\n",
    good[:-2] + "".join(f"X-H{i}: v\r\n" for i in range(45)) + "\r\n",
]
write("handshake", handshake)


# --- frames: client frames (masked) as tests/core.rs and the Autobahn cases send them ----
def frame(opcode, payload=b"", fin=True, mask=b"\x01\x02\x03\x04", rsv=0):
    if isinstance(payload, str):
        payload = payload.encode()
    b0 = (0x80 if fin else 0) | rsv | opcode
    n = len(payload)
    m = 0x80 if mask is not None else 0
    if n < 126:
        h = bytes([b0, m | n])
    elif n < 65536:
        h = bytes([b0, m | 126]) + struct.pack(">H", n)
    else:
        h = bytes([b0, m | 127]) + struct.pack(">Q", n)
    if mask is None:
        return h + payload
    return h + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(payload))

close = lambda code, reason=b"": frame(8, struct.pack(">H", code) + reason)
frames = [
    frame(1, "hello"), frame(2, b"\x00\x01\x02"), frame(1, ""), frame(9, "hb"), frame(10, "raw-123"),
    frame(1, "pipelined 1") + frame(2, "pipelined 2"),
    frame(1, "hel", fin=False) + frame(0, "lo"),
    frame(1, "a", fin=False) + frame(9, "mid") + frame(0, "b", fin=False) + frame(0, "c"),
    frame(1, "x" * 200), frame(2, b"\x07" * 300), frame(1, "é€𝄞"),
    close(1000), close(1001, b"bye"), close(1000) + frame(1, "after close"), frame(8, b""), frame(8, b"\x03"),
    frame(1, b"\xff\xfe"), frame(1, b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80"),
    frame(1, "a", rsv=0x40), frame(3, "x"), frame(11, "x"), frame(9, "p" * 126),
    frame(9, "p", fin=False), frame(0, "continuation first"), frame(1, "a", fin=False) + frame(1, "b"),
    frame(1, "unmasked", mask=None), frame(2, b"\x00" * 70000)[:40],
    bytes([0x82, 0xFF]) + struct.pack(">Q", 1 << 40) + b"\x01\x02\x03\x04",
    frame(1, '{"op":"send","conv":"c1","cid":"a1","body":{"text":"hi"}}'),
    close(1002, b"\xff"), close(999), close(5000, b"ok"),
]
# The first byte is the target's knobs (limit, echo, split seed).
write("frames", [bytes([k]) + f for i, f in enumerate(frames) for k in (i % 256, (i * 37 + 3) % 256)])


# --- client_json: tests/im.rs and tests/core.rs ------------------------------------------
client = [
    '{"op":"send","conv":"c1","cid":"a1b2","body":{"text":"hi"}}',
    '{"op":"send","conv":"c1","cid":"b1","body":null}',
    '{"op":"send","conv":"c1","cid":"k","body":[1,2.5,-3e9,"x",true,{"a":{"b":[]}}]}',
    '{"op":"sync","conv":"c1","after":0}', '{"op":"sync","conv":"c1","after":7,"limit":100,"cid":"s1"}',
    '{"op":"sync","conv":"c1","after":0,"cid":"evil-3"}', '{"op":"nope","cid":"still-here"}',
    '{"op":"send","cid":"k1","body":1}', '{"op":"send","conv":"c 1","cid":"k2","body":1}',
    '{"op":"send","conv":"","cid":"k3","body":1}', '{"op":"send","conv":"' + "c" * 129 + '","cid":"k4","body":1}',
    '{"op":"send","conv":7,"cid":"k5","body":1}', '{"op":"send","conv":"c1","body":1}',
    '{"op":"send","conv":"c1","cid":"","body":1}', '{"op":"send","conv":"c1","cid":"' + "x" * 65 + '","body":1}',
    '{"op":"send","conv":"c1","cid":"k6"}', '{"op":"sync","cid":"k7","after":0}',
    '{"op":"sync","conv":"c/1","cid":"k8"}', '{"op":"frobnicate","cid":"a1b2"}', '{"cid":"x9"}',
    '{"op":"frobnicate","cid":"a1b3"', "null", "42", '"send"', "[]", '["frobnicate","c1"]', '[{"op":"x"}]',
    '  {"op":"send","conv":"a.b_c:d@e-f","cid":"\\u00e9\\ud834\\udd1e","body":"\\n"}',
    '{"op":"sync","conv":"c1","after":-1}', '{"op":"sync","conv":"c1","limit":18446744073709551616}',
    '{"op":"send","op":"sync","conv":"c1","cid":"d"}',
]
write("client_json", client)


# --- admin_request: tests/common's HTTP client against /api/v1 ---------------------------
def http(method, path, body=None, headers=(("Authorization", "Bearer test-api-key"),)):
    r = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:9091\r\nConnection: close\r\n"
    for n, v in headers:
        r += f"{n}: {v}\r\n"
    if body is not None:
        r += f"Content-Type: application/json\r\nContent-Length: {len(body.encode())}\r\n"
    return r + "\r\n" + (body or "")

admin = [
    http("PUT", "/api/v1/conversations/c1/members", '{"users":["alice","bob"]}'),
    http("POST", "/api/v1/conversations/c1/members", '{"users":["carol"]}'),
    http("DELETE", "/api/v1/conversations/c1/members", '{"users":["carol"]}'),
    http("POST", "/api/v1/conversations/c1/messages", '{"from":"alice","body":{"text":"hi"}}'),
    http("POST", "/api/v1/push", '{"users":["u1"],"body":{"hi":1}}'),
    http("POST", "/api/v1/broadcast", '{"body":{"all":true}}'),
    http("GET", "/api/v1/conversations/c1"), http("GET", "/api/v1/presence/alice"),
    http("POST", "/api/v1/users/alice/disconnect", ""), http("GET", "/healthz", headers=()),
    http("GET", "/readyz", headers=()), http("GET", "/metrics", headers=()), http("GET", "/events?interval=1", headers=()),
    "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /readyz HTTP/1.1\r\nHost: x\r\n\r\n",
    "GET /healthz HTTP/1.0\r\n\r\n",
    "POST /api/v1/push HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "POST /api/v1/push HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n",
    "POST /api/v1/push HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    "POST /api/v1/push HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    "GET / HTTP/1.1\r\n" + "X: y\r\n" * 70 + "\r\n", "\x00garbage\r\n\r\n",
]
write("admin_request", admin)


# --- config: src/config/'s tests, tests/, the shipped file ------------------------------
full = open(os.path.join(REPO, "systemd", "ringpush.toml")).read()
config = [
    "", full, 'api_key = "0123456789"\n[auth]\nsecret = "abcdefghij"\n',
    "[heartbeat]\nping_interval_ms = 1000\nidle_timeout_ms = 30000\n[limits]\nsend_rate_per_sec = 1000\n",
    "[heartbeat]\nping_interval_ms = 500\nidle_timeout_ms = 5000\n[auth]\nleeway_secs = 3",
    '[limits]\nmax_message_bytes = 1024', '[diagnostics]\necho = false', 'allowed_origins = ["https://good.example"]',
    'trusted_proxies = ["10.0.0.0/8", "::1/128"]\nshards = 0\nhandshake_timeout_ms = 5000\n',
    'node_id = "n1"\nlisten = "127.0.0.1:0"\nadmin_listen = "127.0.0.1:0"\n[redis]\nurl = "redis://127.0.0.1:6379/0"\n'
    '[cluster]\npub_listen = "tcp://127.0.0.1:7001"\nadvertise = "tcp://127.0.0.1:7001"\npeers = ["tcp://127.0.0.1:7002"]\n',
    "[redis]\n[cluster]\n[limits]\n", '[cluster]\nhwm = 10\n', '[redis]\nurl = "true"\n', "auth = 5\n",
    '[auth]\nsecret = "from-the-file"\n\0RINGPUSH_AUTH__SECRET=x\nRINGPUSH_LISTEN=127.0.0.1:0\n'
    'RINGPUSH_ALLOWED_ORIGINS=["https://a.example","https://b.example"]\nRINGPUSH_TRUSTED_PROXIES=["10.0.0.0/8"]\n',
    "\0RINGPUSH_REDIS__URL=redis://10.1.2.3:6379/2\n", "\0RINGPUSH_LIMITS__FOO=1\n",
    "\0RINGPUSH_HEARTBEAT__PING_INTERVAL_MS=0\n", "\0RINGPUSH_LISTEN=abc\n", "[limits\nx = ",
]
write("config", config)


# --- cluster_wire: the format of src/cluster/wire.rs (version 1) --------------------------
def ident(s):
    s = s.encode()
    return struct.pack("<H", len(s)) + s

def lst(xs):
    return struct.pack("<I", len(xs)) + b"".join(ident(x) for x in xs)

def blob(s):
    s = s.encode()
    return struct.pack("<I", len(s)) + s

def env(kind, body, node="node-a", epoch=1700000000123):
    return bytes([1, kind]) + ident(node) + struct.pack("<Q", epoch) + body

msg = '{"op":"msg","conv":"c1","seq":1,"from":"alice","dev":"laptop","cid":"a1b2","ts":1,"body":{"text":"hi"}}'
wire = [
    env(1, ident("c1") + struct.pack("<Q", 1) + blob(msg)),
    env(1, ident("c1") + struct.pack("<Q", 2**64 - 1) + blob(""), node="n"),
    env(2, lst(["u1", "u2"]) + blob('{"op":"push","body":{"hi":1}}')),
    env(2, lst([]) + blob("{}")),
    env(3, ident("alice")), env(3, ident("")),
    env(4, ident("c1") + lst(["alice", "bob"]) + lst(["carol"])), env(4, ident("c2") + lst([]) + lst([])),
    env(5, blob('{"op":"push","body":{"all":true}}')),
    env(3, ident("alice"))[:-2], env(3, ident("alice")) + b"x", bytes([2, 1]), bytes([1, 9]),
    env(2, struct.pack("<I", 0xFFFFFFFF)), env(5, struct.pack("<I", 0x7FFFFFFF) + b"{}"),
    env(5, blob("") + b"")[:-1] + b"\xff", b"a", b"c0000", b"u0fff", b"c00g0",
]
write("cluster_wire", wire)


# --- jwt: claims as src/auth.rs's tests sign them; the first byte picks the mode -----------
# (bit 0: sign the rest as claims inside the target; bits 1-3: which header; 4-7: leeway).
import base64, hmac, json

JWT_SECRET = b"fuzz-secret-0123456789"  # the secret of fuzz_targets/jwt.rs
FAR = 4102444800  # 2100-01-01

def b64url(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=")

def jwt(claims, header=b'{"alg":"HS256","typ":"JWT"}'):
    signing = b64url(header) + b"." + b64url(claims.encode())
    return (signing + b"." + b64url(hmac.new(JWT_SECRET, signing, "sha256").digest())).decode()

claims = [
    {"sub": "alice", "dev": "phone", "exp": FAR},
    {"sub": "alice@example.com", "dev": "phone-1", "exp": FAR, "nbf": 1},
    {"sub": "u", "dev": "d", "exp": FAR + 0.5, "iat": 1, "aud": "x"},
    {"sub": "u" * 128, "dev": "d" * 64, "exp": FAR},
    {"sub": "u" * 129, "dev": "d", "exp": FAR},
    {"sub": "has space", "dev": "d", "exp": FAR},
    {"sub": 7, "dev": "d", "exp": FAR},
    {"sub": "u", "dev": "d", "exp": "soon"},
    {"sub": "u", "dev": "d", "exp": -5},
    {"sub": "u", "dev": "d", "exp": 1000},
    {"sub": "u", "dev": "d", "exp": FAR, "nbf": FAR - 1},
    {"dev": "d", "exp": FAR},
]
texts = [json.dumps(c, separators=(",", ":")) for c in claims]
texts += ['{"sub":"u","dev":"d","exp":1e400}', '{"sub":"u","dev":"d","exp":' + "[" * 200 + "]" * 200 + "}",
          "[]", "null", "{", ""]
jwt_seeds = [bytes([1]) + t.encode() for t in texts]
jwt_seeds += [bytes([1 | (h << 1)]) + texts[0].encode() for h in range(1, 6)]
jwt_seeds += [bytes([0x31]) + texts[9].encode()]
jwt_seeds += [bytes([0]) + t.encode() for t in [jwt(texts[0]), jwt(texts[1]), jwt(texts[4]),
              jwt(texts[0])[:-3] + "AAA", jwt(texts[0], b'{"alg":"none"}'), "x", "a.b", "a.b.c", "....",
              "eyJhbGciOiJIUzI1NiJ9.e30"]]
write("jwt", jwt_seeds)


# --- dashboard_query: request targets of GET /events (tests/web.rs) and /demo/token ------
write("dashboard_query", [
    "/events", "/events?interval_ms=250", "/events?interval_ms=5", "/events?interval_ms=99999999",
    "/events?interval_ms=%32%35%30", "/events?x=1&interval_ms=100&interval_ms=7", "/events?interval_ms=",
    "/events?interval_ms=-1", "/events?interval_ms=1e3", "/events?interval_ms=%zz", "/events?interval_ms=%4",
    "/demo/token?user=alice&device=lap%20top&ttl=60", "/demo/token?user=%C3%A9&device=+", "/?=&&=x&user",
])
