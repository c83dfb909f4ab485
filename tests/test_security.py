"""Token auth, allowed Origins and TLS: the policy on its own, then over real sockets."""

from __future__ import annotations

import asyncio
import datetime
import hmac
import ipaddress
import json
import logging
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.datastructures import Headers
from websockets.exceptions import InvalidMessage
from websockets.http11 import Request

from client_demo.pacing import send_paced
from server.cli import _config, build_parser
from server.config import ConfigError, ServerConfig
from server.transport import access
from server.transport.access import AccessPolicy, ssl_context
from tests.serverharness import DATA, ServerThread, clip_wer, handshake, make_config, pcm16, read_clip

FILE_TOKEN = "file-token-7Qx2"
ENV_TOKEN = "env-token-9Zk4"
LISTED = "https://captions.example.com"


def req(path: str, *headers: tuple[str, str]) -> Request:
    return Request(path, Headers(list(headers)))


def body(resp) -> dict:
    return json.loads(resp.body)


def policy(tokens=(), **kw) -> AccessPolicy:
    return AccessPolicy(tokens, **kw)


# ---------------------------------------------------------------------- configuration
def test_auth_off_by_default():
    p = AccessPolicy.from_config(ServerConfig(), {})
    assert not p.auth_enabled
    assert p.check(req("/v1/stream"), "/v1/stream", False) is None
    assert p.check(req("/metrics"), "/metrics", False) is None


def test_tokens_from_file_and_env(tmp_path):
    f = tmp_path / "tokens"
    f.write_text(f"# ops tokens\n\n  {FILE_TOKEN}  \n#not-a-token\nsecond\n")
    p = AccessPolicy.from_config(ServerConfig(auth_tokens_file=str(f)), {"CHORUS_AUTH_TOKENS": f" {ENV_TOKEN} , other,,"})
    assert p.auth_enabled
    for good in (FILE_TOKEN, "second", ENV_TOKEN, "other"):
        assert p.check(req("/v1/stream", ("Authorization", f"Bearer {good}")), "/v1/stream", False) is None, good
    for bad in ("# ops tokens", "#not-a-token", "not-a-token", "", FILE_TOKEN + "x"):
        assert not p.token_valid([bad]), bad


def test_env_tokens_alone():
    p = AccessPolicy.from_config(ServerConfig(), {"CHORUS_AUTH_TOKENS": ENV_TOKEN})
    assert p.auth_enabled and p.token_valid([ENV_TOKEN])
    assert not AccessPolicy.from_config(ServerConfig(), {"CHORUS_AUTH_TOKENS": "  "}).auth_enabled


@pytest.mark.parametrize("content", [None, "", "\n# only a comment\n\n"])
def test_bad_tokens_file_is_a_startup_error(tmp_path, content):
    f = tmp_path / "tokens"
    if content is not None:
        f.write_text(content)
    with pytest.raises(ConfigError, match="auth_tokens_file") as e:
        AccessPolicy.from_config(ServerConfig(auth_tokens_file=str(f)), {"CHORUS_AUTH_TOKENS": ENV_TOKEN})
    assert ENV_TOKEN not in str(e.value)


def test_unreadable_tokens_file_does_not_print_tokens(tmp_path):
    f = tmp_path / "tokens"
    f.write_bytes(FILE_TOKEN.encode() + b"\n\xff\xfe")  # not UTF-8
    with pytest.raises(ConfigError, match="cannot read") as e:
        AccessPolicy.from_config(ServerConfig(auth_tokens_file=str(f)), {})
    assert FILE_TOKEN not in str(e.value)


def test_env_of_only_commas_is_a_startup_error():
    with pytest.raises(ConfigError, match="CHORUS_AUTH_TOKENS"):
        AccessPolicy.from_config(ServerConfig(), {"CHORUS_AUTH_TOKENS": " , ,"})


@pytest.mark.parametrize("entry", ["captions.example.com", "https://x.example/app", "null", "https://", "http://x:99999"])
def test_bad_allowed_origin_is_a_config_error(entry):
    with pytest.raises(ConfigError, match=r"allowed_origins\[1\]"):
        AccessPolicy.from_config(ServerConfig(allowed_origins=("https://ok.example", entry)), {})


# ---------------------------------------------------------------------- tokens
def test_token_in_header_or_query():
    p = policy([ENV_TOKEN])
    for r in (
        req("/v1/stream", ("Authorization", f"Bearer {ENV_TOKEN}")),
        req("/v1/stream", ("Authorization", f"bearer   {ENV_TOKEN} ")),
        # xiaozhi-esp32-server's form, sent to FunASR-compatible servers
        req("/v1/stream", ("Authorization", f"Bearer; {ENV_TOKEN}")),
        req("/v1/stream", ("Authorization", f"Bearer;{ENV_TOKEN}")),
        req(f"/v1/stream?token={ENV_TOKEN}"),
        req(f"/v1/stream?language=en&token={ENV_TOKEN}&sample_rate=16000"),
        req(f"/v1/stream?token=wrong&token={ENV_TOKEN}"),
    ):
        assert p.check(r, "/v1/stream", False) is None, r.path
    # Query values are URL-decoded, as browsers encode them.
    assert policy(["a+b/c="]).check(req("/v1/stream?token=a%2Bb%2Fc%3D"), "/v1/stream", False) is None


@pytest.mark.parametrize("headers, query, error", [
    ((), "", None),
    ((("Authorization", "Bearer wrong"),), "", "invalid_token"),
    ((("Authorization", f"Basic {ENV_TOKEN}"),), "", None),
    ((("Authorization", "Bearer"),), "", None),
    ((), "?token=", None),
    ((), "?token=wrong", "invalid_token"),
    ((), f"?tok={ENV_TOKEN}", None),
])
def test_refused_with_401(headers, query, error):
    resp = policy([ENV_TOKEN]).check(req("/v1/stream" + query, *headers), "/v1/stream", False)
    assert resp is not None and resp.status_code == 401
    assert resp.headers["Content-Type"] == "application/json"
    assert int(resp.headers["Content-Length"]) == len(resp.body)
    www = resp.headers["WWW-Authenticate"]
    assert www.startswith("Bearer")
    assert (f'error="{error}"' in www) == (error is not None)
    assert body(resp)["error"] == "unauthorized" and body(resp)["message"]
    assert ENV_TOKEN not in resp.body.decode() and "wrong" not in resp.body.decode()


def test_paths_that_need_a_token():
    p = policy([ENV_TOKEN])
    # The page and its files hold no secret (the page asks for the token itself).
    for path in ("/healthz", "/livez", "/metrics", "/", "/index.html", "/static/app.js"):
        assert p.check(req(path), path, False) is None, path
    for path in ("/v1/stream", "/nope", "/healthz/", "/v1/stream/", "/index.html/", "/static"):
        assert p.check(req(path), path, False).status_code == 401, path
    strict = policy([ENV_TOKEN], metrics_require_token=True)
    assert strict.check(req("/metrics"), "/metrics", False).status_code == 401
    assert strict.check(req("/metrics", ("Authorization", f"Bearer {ENV_TOKEN}")), "/metrics", False) is None
    assert strict.check(req("/healthz"), "/healthz", False) is None
    # Without tokens, metrics_require_token has nothing to require.
    assert policy([], metrics_require_token=True).check(req("/metrics"), "/metrics", False) is None


def test_every_token_is_compared_without_stopping(monkeypatch):
    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(access.hmac, "compare_digest", counting)
    p = policy(["t1", "t2", "t3"])
    assert p.token_valid(["t1"])  # a match on the first token still compares all three
    assert len(calls) == 3
    calls.clear()
    assert not p.token_valid(["x", "y"])
    assert len(calls) == 6


def test_tokens_are_not_kept_in_the_clear():
    p = policy([ENV_TOKEN])
    assert ENV_TOKEN not in repr(vars(p))


# ---------------------------------------------------------------------- origins
def origin_check(p: AccessPolicy, origin: str | None, host: str = "127.0.0.1:8765", secure: bool = False, path="/v1/stream"):
    headers = [("Host", host)] + ([("Origin", origin)] if origin is not None else [])
    return p.check(req(path, *headers), path, secure)


def test_origins():
    # Any Host: this test is about Origins (test_hosts below is about Hosts).
    p = policy(allowed_origins=[LISTED, "http://LocalHost:3000", "https://x.example:443"], allowed_hosts=["*"])
    allowed = [
        (None, "127.0.0.1:8765", False),  # not a browser
        ("http://127.0.0.1:8765", "127.0.0.1:8765", False),  # the server's own page
        ("HTTP://LOCALHOST:8765", "localhost:8765", False),
        ("https://127.0.0.1:8765", "127.0.0.1:8765", True),
        ("http://example.org", "example.org", False),  # default port 80 on both sides
        ("https://example.org", "example.org:443", True),
        ("http://[::1]:8765", "[::1]:8765", False),
        (LISTED, "asr.example.com", False),
        ("https://captions.example.com:443", "asr.example.com", True),
        ("http://localhost:3000", "127.0.0.1:8765", False),
        ("https://x.example", "127.0.0.1:8765", False),
    ]
    for origin, host, secure in allowed:
        assert origin_check(p, origin, host, secure) is None, (origin, host, secure)
    refused = [
        ("https://evil.example", "127.0.0.1:8765", False),
        ("http://127.0.0.1:8765", "127.0.0.1:8765", True),  # http page, TLS socket: another scheme
        ("https://127.0.0.1:8765", "127.0.0.1:8765", False),
        ("http://127.0.0.1:9999", "127.0.0.1:8765", False),
        ("http://localhost:8765", "127.0.0.1:8765", False),  # another host name is another origin
        ("http://captions.example.com", "asr.example.com", False),
        ("https://captions.example.com:8443", "asr.example.com", False),
        ("https://sub.captions.example.com", "asr.example.com", False),
        ("null", "127.0.0.1:8765", False),
        ("", "127.0.0.1:8765", False),
    ]
    for origin, host, secure in refused:
        resp = origin_check(p, origin, host, secure)
        assert resp is not None and resp.status_code == 403, (origin, host, secure)
        assert body(resp)["error"] == "forbidden_origin"


def host_check(p: AccessPolicy, *hosts: str, path: str = "/v1/stream"):
    resp = p.check(req(path, *(("Host", h) for h in hosts)), path, False)
    return None if resp is None else (resp.status_code, body(resp)["error"])


def test_hosts_bound_to_loopback():
    """Bound to loopback (the default), only the loopback names, with any port or none."""
    p = policy()
    for host in ("127.0.0.1:8765", "localhost:8765", "LOCALHOST", "[::1]:8765", "127.0.0.1", "localhost."):
        assert host_check(p, host) is None, host
    for host in ("evil.example", "evil.example:8765", "10.1.2.3:8765", "[2001:db8::1]:8765", "localhost.evil.example",
                 "127.0.0.1.evil.example", "127.0.0.1:99999", "user@127.0.0.1", "127.0.0.1/x", "", " "):
        for path in ("/v1/stream", "/healthz", "/metrics", "/", "/v1/calls"):
            assert host_check(p, host, path=path) == (421, "unknown_host"), (host, path)
    assert host_check(p, "127.0.0.1:1", "127.0.0.1:1") == (421, "unknown_host")  # two Host headers
    assert host_check(p) is None  # no Host: not a browser (HTTP/1.0)


def test_hosts_bound_elsewhere_and_listed():
    """Bound to another address, IP addresses (probes) too; names must be listed; * is any."""
    p = policy(bind_host="0.0.0.0", allowed_hosts=["ASR.example.com", "[2001:db8::2]"])
    for host in ("10.1.2.3:8765", "[2001:db8::1]:8765", "localhost:1", "asr.example.com", "asr.example.com:443",
                 "Asr.Example.Com."):
        assert host_check(p, host, path="/healthz") is None, host
        assert host_check(p, host) is None, host
    for host in ("evil.example", "sub.asr.example.com", "asr.example.com.evil.example", "10.1.2.3.nip.io"):
        assert host_check(p, host, path="/healthz") == (421, "unknown_host"), host
    for bind in ("127.0.0.1", "::1", "localhost"):
        assert host_check(policy(bind_host=bind), "10.1.2.3:8765") == (421, "unknown_host"), bind
    assert host_check(policy(allowed_hosts=["*"]), "evil.example") is None
    # A rebinding page's request: its Origin matches its Host, and still it is refused.
    r = req("/v1/calls", ("Host", "evil.example:8765"), ("Origin", "http://evil.example:8765"))
    assert policy().check(r, "/v1/calls", False).status_code == 421


@pytest.mark.parametrize("entry", ["https://asr.example.com", "asr.example.com:443", "asr.example.com/x", "a b", ""])
def test_bad_allowed_host_is_a_config_error(entry):
    with pytest.raises(ConfigError, match=r"allowed_hosts\[1\]"):
        AccessPolicy.from_config(ServerConfig(allowed_hosts=("ok.example", entry)), {})


def test_origin_without_host_or_twice():
    p = policy()
    assert p.check(req("/v1/stream", ("Origin", "http://a:1")), "/v1/stream", False).status_code == 403
    two = req("/v1/stream", ("Host", "localhost:1"), ("Origin", "http://localhost:1"), ("Origin", "http://localhost:1"))
    assert p.check(two, "/v1/stream", False).status_code == 403


def test_any_origin():
    p = policy(allowed_origins=["*"])
    for origin in ("https://evil.example", "null", "chrome-extension://abc"):
        assert origin_check(p, origin) is None


def test_origin_not_checked_on_http_endpoints():
    p = policy()
    for path in ("/healthz", "/livez", "/metrics"):
        assert origin_check(p, "https://evil.example", path=path) is None


def test_token_is_checked_before_origin():
    p = policy([ENV_TOKEN])
    assert origin_check(p, "https://evil.example").status_code == 401
    r = req("/v1/stream", ("Host", "localhost:1"), ("Origin", "https://evil.example"), ("Authorization", f"Bearer {ENV_TOKEN}"))
    assert p.check(r, "/v1/stream", False).status_code == 403


# ---------------------------------------------------------------------- logs and CLI
def test_log_filter_redacts_request_line_and_authorization(caplog):
    access.redact_tokens_in_logs()
    logger = logging.getLogger("websockets.server")
    with caplog.at_level(logging.DEBUG, logger="websockets.server"):
        logger.debug("< %s %s %s", "GET", f"/v1/stream?language=en&token={ENV_TOKEN}&x=1", "HTTP/1.1")
        logger.debug("< %s: %s", "Authorization", f"Bearer {ENV_TOKEN}")
        logger.debug("< %s: %s", "Host", "127.0.0.1:1")
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert ENV_TOKEN not in text
    assert "token=<redacted>&x=1" in text and "Authorization: <redacted>" in text and "Host: 127.0.0.1:1" in text
    access.redact_tokens_in_logs()
    assert logger.filters.count(access._REDACTOR) == 1


def test_cli_tls_flags():
    args = build_parser().parse_args(["serve", "--tls-cert", "/x/cert.pem", "--tls-key", "/x/key.pem", "--port", "1"])
    cfg = _config(args)
    assert (cfg.server.tls_cert, cfg.server.tls_key, cfg.server.port) == ("/x/cert.pem", "/x/key.pem", 1)
    with pytest.raises(ConfigError, match="together"):
        _config(build_parser().parse_args(["serve", "--tls-cert", "/x/cert.pem"]))


# ---------------------------------------------------------------------- TLS context
def make_cert(directory: Path, cn: str = "localhost") -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1: (cert.pem, key.pem)."""
    cert, key = directory / f"{cn}-cert.pem", directory / f"{cn}-key.pem"
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("neither the cryptography package nor the openssl binary is available")
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={cn}",
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
            check=True, capture_output=True,
        )
        return cert, key
    k = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    c = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(k.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(k, hashes.SHA256())
    )
    cert.write_bytes(c.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return cert, key


@pytest.fixture(scope="module")
def cert_pair(tmp_path_factory) -> tuple[Path, Path]:
    return make_cert(tmp_path_factory.mktemp("tls"))


def test_ssl_context(cert_pair, tmp_path):
    cert, key = cert_pair
    assert ssl_context(ServerConfig()) is None
    ctx = ssl_context(ServerConfig(tls_cert=str(cert), tls_key=str(key)))
    assert isinstance(ctx, ssl.SSLContext) and ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    other_cert, other_key = make_cert(tmp_path, "other")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello\n")
    for c, k, match in [
        (tmp_path / "missing.pem", key, "tls_cert.*not a file"),
        (cert, tmp_path / "missing.pem", "tls_key.*not a file"),
        (garbage, key, "tls_cert.*not a PEM certificate"),
        (cert, garbage, "tls_key.*not a PEM private key"),
        (cert, other_key, "tls_key.*not the private key"),
        (cert, "", "together"),
    ]:
        with pytest.raises(ConfigError, match=match):
            ssl_context(ServerConfig(tls_cert=str(c), tls_key=str(k)))


# ---------------------------------------------------------------------- real sockets
def http_get(url: str, headers: dict | None = None, context: ssl.SSLContext | None = None) -> tuple[int, dict, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


async def open_and_stop(url: str, start: bool = True, **kw) -> list[dict]:
    """Open a stream, start it (unless the URL's query did), stop it: every message the server sent."""
    async with connect(url, **kw) as ws:
        if start:
            await ws.send(json.dumps({"type": "start", "language": "en"}))
        await ws.send(json.dumps({"type": "stop"}))
        messages = [json.loads(m) async for m in ws]
        assert ws.close_code == 1000
    return messages


def streams(url: str, start: bool = True, **kw) -> bool:
    messages = asyncio.run(open_and_stop(url, start, **kw))
    assert [m["type"] for m in messages] == ["ready", "done"], messages
    return True


@pytest.fixture(scope="module")
def auth_srv(whisper_runner, tmp_path_factory):
    """Token auth on (one token from a file, one from the environment), one listed Origin."""
    f = tmp_path_factory.mktemp("auth") / "tokens"
    f.write_text(f"# test tokens\n{FILE_TOKEN}\n")
    cfg = make_config(**{"server.auth_tokens_file": str(f), "server.allowed_origins": f"[{LISTED}]"})
    with pytest.MonkeyPatch.context() as mp:  # the environment is read when the server is built
        mp.setenv("CHORUS_AUTH_TOKENS", ENV_TOKEN)
        server = ServerThread(cfg, whisper_runner)
    with server as s:
        yield s


def test_socket_token_required(auth_srv):
    h = asyncio.run(handshake(auth_srv.url))
    assert h.status == 401 and h.body["error"] == "unauthorized" and h.headers["Content-Type"] == "application/json", h
    assert asyncio.run(handshake(auth_srv.url, additional_headers={"Authorization": "Bearer wrong"})).status == 401
    assert asyncio.run(handshake(auth_srv.url + "?token=wrong")).status == 401
    assert streams(auth_srv.url, additional_headers={"Authorization": f"Bearer {FILE_TOKEN}"})
    assert streams(auth_srv.url, additional_headers={"Authorization": f"Bearer {ENV_TOKEN}"})
    assert streams(f"{auth_srv.url}?token={ENV_TOKEN}")
    assert streams(f"{auth_srv.url}?language=en&token={ENV_TOKEN}", start=False)  # the query starts the session


def test_socket_401_carries_www_authenticate(auth_srv):
    status, headers, text = http_get(f"http://127.0.0.1:{auth_srv.app.port}/v1/stream")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert json.loads(text)["error"] == "unauthorized"
    # Unknown paths need the token too (an unauthenticated client learns no routes).
    assert http_get(f"http://127.0.0.1:{auth_srv.app.port}/nope")[0] == 401


def test_socket_probes_and_metrics_open(auth_srv):
    base = f"http://127.0.0.1:{auth_srv.app.port}"
    assert http_get(base + "/healthz")[0] == 200
    status, _, text = http_get(base + "/metrics")
    assert status == 200 and "chorus_" in text


def test_socket_metrics_token(whisper_runner, monkeypatch):
    monkeypatch.setenv("CHORUS_AUTH_TOKENS", ENV_TOKEN)
    with ServerThread(make_config(**{"server.metrics_require_token": "true"}), whisper_runner) as s:
        base = f"http://127.0.0.1:{s.app.port}"
        status, headers, text = http_get(base + "/metrics")
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
        assert http_get(base + "/metrics", {"Authorization": f"Bearer {ENV_TOKEN}"})[0] == 200
        assert http_get(base + f"/metrics?token={ENV_TOKEN}")[0] == 200
        assert http_get(base + "/healthz")[0] == 200


def test_socket_origins(auth_srv):
    auth = {"additional_headers": {"Authorization": f"Bearer {ENV_TOKEN}"}}
    h = asyncio.run(handshake(auth_srv.url, origin="https://evil.example", **auth))
    assert h.status == 403 and h.body["error"] == "forbidden_origin" and h.headers["Content-Type"] == "application/json", h
    assert asyncio.run(handshake(auth_srv.url, origin=f"https://127.0.0.1:{auth_srv.app.port}", **auth)).status == 403
    assert streams(auth_srv.url, origin=f"http://127.0.0.1:{auth_srv.app.port}", **auth)  # its own page
    assert streams(auth_srv.url, origin=LISTED, **auth)
    assert streams(auth_srv.url, **auth)  # no Origin: not a browser


def test_token_never_logged(auth_srv, caplog):
    caplog.set_level(logging.DEBUG)
    assert streams(f"{auth_srv.url}?token={ENV_TOKEN}")
    assert streams(auth_srv.url, additional_headers={"Authorization": f"Bearer {FILE_TOKEN}"})
    wrong = "wrong-token-Jd83"
    assert asyncio.run(handshake(f"{auth_srv.url}?token={wrong}")).status == 401
    assert asyncio.run(handshake(auth_srv.url, additional_headers={"Authorization": f"Bearer {wrong}"})).status == 401
    server_records = [r for r in caplog.records if not r.name.startswith("websockets.client")]
    text = "\n".join(r.getMessage() for r in server_records)
    assert "GET /v1/stream" in text, "the test must see websockets' request-line debug log"
    for secret in (ENV_TOKEN, FILE_TOKEN, wrong):
        assert secret not in text, f"{secret} in the server log"


@pytest.fixture(scope="module")
def tls_srv(whisper_runner, cert_pair):
    cert, key = cert_pair
    cfg = make_config(**{"server.tls_cert": str(cert), "server.tls_key": str(key), "batcher.partial_interval_ms": 0})
    with ServerThread(cfg, whisper_runner) as s:
        yield s


def test_tls_stream(tls_srv, cert_pair):
    client_ctx = ssl.create_default_context(cafile=str(cert_pair[0]))
    port = tls_srv.app.port
    url = f"wss://localhost:{port}/v1/stream"
    clip = DATA / "sense_and_sensibility_01_austen_64kb-0880.wav"

    async def go() -> list[dict]:
        messages: list[dict] = []
        async with connect(url, ssl=client_ctx, origin=f"https://localhost:{port}", max_size=None) as ws:
            await ws.send(json.dumps({"type": "start", "language": "en"}))
            x = np.concatenate([np.zeros(8000, np.float32), read_clip(clip), np.zeros(16000, np.float32)])

            async def reader() -> None:
                async for m in ws:
                    messages.append(json.loads(m))

            rd = asyncio.create_task(reader())
            await send_paced(ws, x, 16000, 100, 8.0, encode=pcm16)
            await ws.send(json.dumps({"type": "stop"}))
            await asyncio.wait_for(rd, 120)
            assert ws.close_code == 1000
        return messages

    messages = asyncio.run(go())
    finals = [m for m in messages if m["type"] == "final"]
    assert finals and messages[-1]["type"] == "done"
    assert clip_wer(clip, " ".join(f["text"] for f in finals)) <= 0.2
    # https:// on the same port; plain ws:// is not served.
    status, _, text = http_get(f"https://localhost:{port}/healthz", context=client_ctx)
    assert status == 200 and json.loads(text)["ready"]
    with pytest.raises((InvalidMessage, OSError)):
        asyncio.run(open_and_stop(f"ws://127.0.0.1:{port}/v1/stream", open_timeout=5))
    # A client that does not trust the certificate is refused by its own TLS check.
    with pytest.raises(ssl.SSLCertVerificationError):
        asyncio.run(open_and_stop(url, ssl=ssl.create_default_context(), open_timeout=5))
