"""An MNS topic pushing to an HTTP endpoint, for tests and benchmarks: a throw-away RSA signing key, its
X.509 certificate served over HTTPS (like MNS's certificate bucket), and requests built and signed the
way MNS signs its pushes (written from MNS's description, independently of router.sources.mns).

Paths on the certificate server: ``/mns/cert.pem`` (the certificate), ``/other/cert.pem`` (the same, for
a prefix check), ``/mns/redirect-outside`` (302 to ``/other/cert.pem``), ``/mns/big.pem`` (100 KB).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import ssl
import uuid
from email.utils import formatdate
from xml.sax.saxutils import escape

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from router.embedded import HttpServer, Recorder

__all__ = ["MnsPublisher"]

FORMATS = ("XML", "JSON", "SIMPLIFIED")
CONTENT_TYPES = {"XML": "text/xml;charset=utf-8", "JSON": "application/json", "SIMPLIFIED": "text/plain;charset=utf-8"}


def _self_signed(key: rsa.RSAPrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mns-signing-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


class MnsPublisher(HttpServer):
    """HTTPS certificate server (``tls`` is its server context) plus the signer of push requests."""

    def __init__(self, tls: ssl.SSLContext, *, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host=host, port=port)
        self.tls = tls
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.cert_pem = _self_signed(self.key)
        self.fetched: Recorder[str] = Recorder()  # paths requested from the certificate server

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    @property
    def prefix(self) -> str:
        return f"{self.url}/mns/"

    @property
    def cert_url(self) -> str:
        return f"{self.url}/mns/cert.pem"

    def make_app(self) -> web.Application:
        async def serve(request: web.Request) -> web.StreamResponse:
            self.fetched.add(request.path)
            name = request.match_info["name"]
            if name == "redirect-outside":
                raise web.HTTPFound(f"{self.url}/other/cert.pem")
            if name == "big.pem":
                return web.Response(body=b"x" * 100_000)
            if name == "cert.pem":
                return web.Response(body=self.cert_pem, content_type="application/x-pem-file")
            raise web.HTTPNotFound()

        app = web.Application()
        app.router.add_get("/{dir}/{name}", serve)
        return app

    async def start(self) -> None:
        if self._runner is not None:
            return
        runner = web.AppRunner(self.make_app(), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, self.host, self.port, ssl_context=self.tls).start()
        self.port = runner.addresses[0][1]
        self._runner = runner

    def body(self, message: bytes, fmt: str, *, message_id: str | None = None) -> bytes:
        """The push body of ``message`` for the subscription's NotifyContentFormat ``fmt``."""
        fields = {
            "TopicOwner": "1234567890123456",
            "TopicName": "imm-tasks",
            "Subscriber": "1234567890123456",
            "SubscriptionName": "imm-router",
            "MessageId": message_id or uuid.uuid4().hex.upper(),
            "MessageMD5": hashlib.md5(message, usedforsecurity=False).hexdigest().upper(),
            "Message": message.decode(),
            "PublishTime": "1724133063161",
        }
        if fmt == "XML":
            inner = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in fields.items())
            return (
                '<?xml version="1.0" encoding="utf-8"?>'
                f'<Notification xmlns="http://mns.aliyuncs.com/doc/v1/">{inner}</Notification>'
            ).encode()
        if fmt == "JSON":
            return json.dumps(fields).encode()
        return message

    def sign(
        self,
        body: bytes,
        fmt: str,
        *,
        path: str = "/ingest/mns",
        date: float | None = None,
        cert_url: str | None = None,
        key: rsa.RSAPrivateKey | None = None,
    ) -> dict[str, str]:
        """The headers MNS sends with ``body``: Date, Content-MD5 (base64 of the hex digest, as in MNS's
        documentation), x-mns-* and the RSA-SHA1 signature in Authorization."""
        headers = {
            "Content-Type": CONTENT_TYPES[fmt],
            "Content-MD5": base64.b64encode(hashlib.md5(body, usedforsecurity=False).hexdigest().encode()).decode(),
            "Date": formatdate(date, usegmt=True),
            "x-mns-request-id": uuid.uuid4().hex,
            "x-mns-version": "2015-06-06",
            "x-mns-signing-cert-url": base64.b64encode((cert_url or self.cert_url).encode()).decode(),
        }
        canonical_headers = "".join(
            f"{k.lower()}:{v}\n"
            for k, v in sorted(headers.items(), key=lambda kv: kv[0].lower())
            if k.startswith("x-mns-")
        )
        to_sign = (
            f"POST\n{headers['Content-MD5']}\n{headers['Content-Type']}\n{headers['Date']}\n{canonical_headers}{path}"
        )
        signature = (key or self.key).sign(to_sign.encode(), padding.PKCS1v15(), hashes.SHA1())
        headers["Authorization"] = base64.b64encode(signature).decode()
        return headers
