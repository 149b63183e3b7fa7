"""MNS HTTP push: verify a request as MNS signs it, and take the message out of its notification.

A request is authentic when, in this order: the ``x-mns-signing-cert-url`` header (base64 of a URL)
names a certificate under an allowed prefix; ``Date`` is within ``max_clock_skew_seconds``;
``Content-MD5`` matches the body (base64 of the hex digest as MNS sends it, base64 of the raw digest,
or hex); and ``Authorization`` (base64) is an RSA-SHA1 signature, by the certificate's key, of

    VERB\\nContent-MD5\\nContent-Type\\nDate\\n + every x-mns-* header as "name:value\\n" (lower-cased
    names, sorted) + the request path

The certificate is fetched once per URL (HTTPS, bounded in time and size, redirects followed only
inside the prefixes) and cached.

Bodies: ``XML`` (a ``<Notification>`` document, parsed with entities and DTDs refused), ``JSON`` (the same
fields as an object) or ``SIMPLIFIED`` (the message alone). The message may be base64; the decoder
unwraps it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import ssl
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from pathlib import Path
from urllib.parse import urljoin, urlsplit
from xml.etree.ElementTree import ParseError

import aiohttp
import orjson
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring
from pydantic import Field, field_validator

from router.channels.base import Frozen
from router.errors import IngestRefused

# MNS keeps its signing certificates in its own OSS bucket in cn-hangzhou.
MNS_CERT_PREFIX = "https://mnstest.oss-cn-hangzhou.aliyuncs.com/"
NOTIFICATION_FIELDS = ("TopicOwner", "TopicName", "Subscriber", "SubscriptionName", "MessageId", "Message")
MAX_REDIRECTS = 3
CACHED_CERTIFICATES = 32


class MnsIngestSettings(Frozen):
    enabled: bool = False
    cert_url_prefixes: tuple[str, ...] = Field(
        default=(MNS_CERT_PREFIX,), min_length=1, description="the signing certificate's URL must start with one"
    )
    ca_file: Path | None = Field(
        default=None, description="CA bundle trusted for the certificate's HTTPS server; unset: the system CAs"
    )
    max_clock_skew_seconds: float = Field(default=900.0, gt=0, description="Date must be this close to now")
    cert_timeout_seconds: float = Field(default=5.0, gt=0)
    max_cert_bytes: int = Field(default=65_536, gt=0)

    @field_validator("cert_url_prefixes")
    @classmethod
    def _https_with_path(cls, prefixes: tuple[str, ...]) -> tuple[str, ...]:
        for prefix in prefixes:
            parts = urlsplit(prefix)
            # "https://host" alone would also admit "https://host.attacker.example/".
            if parts.scheme != "https" or not parts.hostname or not parts.path.startswith("/"):
                raise ValueError(f"{prefix!r}: a prefix is an https:// URL with a path, e.g. {MNS_CERT_PREFIX}")
        return prefixes


@dataclass(frozen=True, slots=True)
class MnsMessage:
    body: bytes
    message_id: str | None


def forbidden(reason: str, message: str) -> IngestRefused:
    return IngestRefused(403, reason, message)


def malformed(reason: str, message: str) -> IngestRefused:
    return IngestRefused(400, reason, message)


def allowed_url(url: str, prefixes: tuple[str, ...]) -> bool:
    parts = urlsplit(url)
    if parts.scheme != "https" or parts.username or parts.password or "/../" in f"{parts.path}/":
        return False
    for prefix in prefixes:
        allowed = urlsplit(prefix)
        if url.startswith(prefix) and parts.netloc == allowed.netloc and parts.path.startswith(allowed.path):
            return True
    return False


def signing_cert_url(headers: Mapping[str, str], prefixes: tuple[str, ...]) -> str:
    encoded = headers.get("x-mns-signing-cert-url")
    if not encoded:
        raise forbidden("cert_url", "x-mns-signing-cert-url header missing")
    try:
        url = base64.b64decode(encoded, validate=True).decode("ascii")
    except (binascii.Error, ValueError):
        raise forbidden("cert_url", "x-mns-signing-cert-url is not base64 of a URL") from None
    if not allowed_url(url, prefixes):
        raise forbidden("cert_url", "signing certificate URL is outside the allowed prefixes")
    return url


def check_date(headers: Mapping[str, str], skew: float, now: float | None = None) -> None:
    try:
        sent = parsedate_to_datetime(headers.get("Date", ""))
    except (TypeError, ValueError):
        raise forbidden("date", "Date header missing or not an HTTP date") from None
    if sent.tzinfo is None:
        sent = sent.replace(tzinfo=UTC)
    age = (now if now is not None else time.time()) - sent.timestamp()
    if abs(age) > skew:
        raise forbidden("date", f"Date is {abs(age):.0f}s from now, more than {skew:.0f}s")


def check_content_md5(headers: Mapping[str, str], body: bytes) -> None:
    sent = headers.get("Content-MD5", "").strip()
    if not sent:
        raise forbidden("content_md5", "Content-MD5 header missing (MNS signs the body through it)")
    digest = hashlib.md5(body, usedforsecurity=False)
    hexdigest = digest.hexdigest()
    forms = {
        base64.b64encode(hexdigest.encode()).decode(),  # what MNS sends
        base64.b64encode(hexdigest.upper().encode()).decode(),
        base64.b64encode(digest.digest()).decode(),
    }
    if sent not in forms and sent.lower() != hexdigest:
        raise forbidden("content_md5", "Content-MD5 does not match the body")


def string_to_sign(method: str, headers: Mapping[str, str], path: str) -> bytes:
    mns = sorted((k.lower(), v) for k, v in headers.items() if k.lower().startswith("x-mns-"))
    lines = [method, headers.get("Content-MD5", ""), headers.get("Content-Type", ""), headers.get("Date", "")]
    return ("\n".join(lines) + "\n" + "".join(f"{k}:{v}\n" for k, v in mns) + path).encode()


def check_signature(key: rsa.RSAPublicKey, headers: Mapping[str, str], signed: bytes) -> None:
    try:
        signature = base64.b64decode(headers.get("Authorization", ""), validate=True)
    except (binascii.Error, ValueError):
        raise forbidden("signature", "Authorization is not a base64 signature") from None
    if not signature:
        raise forbidden("signature", "Authorization header missing")
    try:
        key.verify(signature, signed, padding.PKCS1v15(), hashes.SHA1())
    except InvalidSignature:
        raise forbidden("signature", "signature does not verify with the MNS certificate") from None


class CertificateStore:
    """Signing keys by certificate URL: fetched once (concurrent requests share the fetch), kept for the
    last CACHED_CERTIFICATES URLs. A failed fetch is not kept: the next request tries again."""

    def __init__(self) -> None:
        self.keys: OrderedDict[str, rsa.RSAPublicKey] = OrderedDict()
        self.fetches = 0
        self._pending: dict[str, asyncio.Task[rsa.RSAPublicKey]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._session_ca: Path | None = None

    async def key(self, url: str, settings: MnsIngestSettings) -> rsa.RSAPublicKey:
        if url in self.keys:
            self.keys.move_to_end(url)
            return self.keys[url]
        task = self._pending.get(url)
        if task is None:
            task = asyncio.ensure_future(self._fetch(url, settings))
            self._pending[url] = task
            task.add_done_callback(lambda _: self._pending.pop(url, None))
        key = await asyncio.shield(task)
        self.keys[url] = key
        while len(self.keys) > CACHED_CERTIFICATES:
            self.keys.popitem(last=False)
        return key

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _client(self, settings: MnsIngestSettings) -> aiohttp.ClientSession:
        if self._session is None or self._session_ca != settings.ca_file:  # a reload may name another CA
            await self.close()
            context = ssl.create_default_context(cafile=str(settings.ca_file) if settings.ca_file else None)
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context))
            self._session_ca = settings.ca_file
        return self._session

    async def _fetch(self, url: str, settings: MnsIngestSettings) -> rsa.RSAPublicKey:
        self.fetches += 1
        try:
            async with asyncio.timeout(settings.cert_timeout_seconds):
                pem = await self._download(url, settings)
        except TimeoutError:
            raise unavailable(f"fetching the signing certificate took over {settings.cert_timeout_seconds}s") from None
        except aiohttp.ClientError as exc:
            raise unavailable(f"fetching the signing certificate failed: {type(exc).__name__}") from None
        try:
            cert = x509.load_pem_x509_certificate(pem) if b"-----BEGIN" in pem else x509.load_der_x509_certificate(pem)
        except ValueError:
            raise forbidden("certificate", "the signing certificate URL does not hold an X.509 certificate") from None
        key = cert.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            raise forbidden("certificate", "the signing certificate's key is not RSA")
        return key

    async def _download(self, url: str, settings: MnsIngestSettings) -> bytes:
        session = await self._client(settings)
        for _ in range(MAX_REDIRECTS + 1):
            async with session.get(url, allow_redirects=False) as response:
                if response.status in (301, 302, 303, 307, 308):
                    url = urljoin(url, response.headers.get("Location", ""))
                    if not allowed_url(url, settings.cert_url_prefixes):
                        raise forbidden("cert_url", "the signing certificate redirects outside the allowed prefixes")
                    continue
                if response.status != 200:
                    raise unavailable(f"the signing certificate URL answered HTTP {response.status}")
                if (response.content_length or 0) > settings.max_cert_bytes:
                    raise forbidden("certificate", f"the signing certificate is over {settings.max_cert_bytes} bytes")
                body = b""
                async for chunk in response.content.iter_chunked(16_384):
                    body += chunk
                    if len(body) > settings.max_cert_bytes:
                        raise forbidden(
                            "certificate", f"the signing certificate is over {settings.max_cert_bytes} bytes"
                        )
                return body
        raise unavailable(f"the signing certificate URL redirects more than {MAX_REDIRECTS} times")


def unavailable(message: str) -> IngestRefused:
    return IngestRefused(503, "certificate_unavailable", message)


async def verify(
    store: CertificateStore,
    settings: MnsIngestSettings,
    method: str,
    path: str,
    headers: Mapping[str, str],
    body: bytes,
) -> None:
    """Raise IngestRefused unless the request is signed by MNS; cheap checks before the certificate."""
    url = signing_cert_url(headers, settings.cert_url_prefixes)
    check_date(headers, settings.max_clock_skew_seconds)
    check_content_md5(headers, body)
    key = await store.key(url, settings)
    check_signature(key, headers, string_to_sign(method, headers, path))


def message(body: bytes) -> MnsMessage:
    """The message a push carries, whatever the subscription's NotifyContentFormat."""
    head = body.lstrip()[:1]
    if head == b"<":
        return _from_xml(body)
    if head == b"{":
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise malformed("json", f"body is not valid JSON: {str(exc)[:200]}") from None
        if isinstance(doc, dict) and {"TopicName", "MessageId", "Message"} <= doc.keys():
            return _from_fields(doc, "JSON")
    return MnsMessage(body, None)


def _from_xml(body: bytes) -> MnsMessage:
    try:
        root = fromstring(body, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except DefusedXmlException as exc:
        raise malformed("xml", f"XML with a DTD or entities is refused ({type(exc).__name__})") from None
    except ParseError as exc:
        raise malformed("xml", f"body is not well-formed XML: {exc}") from None
    if _local(root.tag) != "Notification":
        raise malformed("xml", f"XML root is <{_local(root.tag)}>, not an MNS <Notification>")
    return _from_fields({_local(child.tag): child.text or "" for child in root}, "XML")


def _from_fields(fields: Mapping[str, object], fmt: str) -> MnsMessage:
    missing = [name for name in NOTIFICATION_FIELDS if name not in fields]
    if missing:
        raise malformed(fmt.lower(), f"MNS {fmt} notification lacks {', '.join(missing)}")
    text = fields["Message"]
    if not isinstance(text, str):
        raise malformed(fmt.lower(), "MNS notification Message is not a string")
    message_id = fields["MessageId"]
    return MnsMessage(text.encode(), str(message_id) if message_id else None)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]
