"""The `signed_json` wire format: options, canonical strings, signing, field and status mapping.
Pure, no I/O; the connector and the sandbox bank share it. (Statements are CSV in the funder's
`[funders.statement]` mapping, read by the shared `connectors.csv_statement`.)

Signed message (requests, responses and callbacks alike)::

    <timestamp> "\\n" <nonce> "\\n" <canonical body>

Statement downloads are signed too, always over the raw bytes of the CSV (there is no JSON to
sort and no field to carry a signature): timestamp, nonce and signature travel in their
headers whatever `canonical` and `placement` say, and the signature is computed over the
download as it streams (`Signer.running`), so a statement is never held whole in memory.

`canonical = "sorted"`: the body's top-level fields as `key=value` joined by `&` in key order,
skipping empty values and the signature field (nested values as compact JSON with sorted keys);
`canonical = "raw"`: the body bytes as sent. Timestamp and nonce travel in headers; the
signature in a header (`placement = "header"`) or in a body field (`placement = "body"`,
sorted canonical only; bodiless GET requests then carry it in the header). Algorithms:
HMAC-SHA256 (shared secret), RSA-SHA256 with PKCS#1 v1.5 or PSS (our private key signs, the
bank's public key verifies). The bank's status words are configuration: every word listed in
`status_map` is mapped, any other word is `BankStatus.UNKNOWN`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from config.models import StatementConfig
from connectors.base import BankStatus, PayoutOrder, PayoutResult

# CONTRACT.md: messages outside ±300 s are refused.
MAX_CLOCK_SKEW_SECONDS = 300
# Enough of a bad reply to diagnose it, never a whole statement or page in a log line.
RAW_LOG_LIMIT = 512

OurField = Literal[
    "order_no",
    "txn_no",
    "amount",
    "currency",
    "account_no",
    "account_name",
    "bank_code",
    "mode",
    "funder_amount",
    "platform_amount",
    "callback_url",
]
ResultField = Literal[
    "order_no",
    "status",
    "bank_ref",
    "amount",
    "fail_code",
    "fail_reason",
    "finished_at",
    "pre_execution",
]
Target = Literal["accepted", "processing", "succeeded", "failed", "not_found"]
AMOUNT_FIELDS = frozenset({"amount", "funder_amount", "platform_amount"})

_TIMESTAMP = re.compile(r"\d{1,12}")
_YUAN = re.compile(r"-?\d+(\.\d{1,2})?")
_LONG_DIGITS = re.compile(r"\d{6,}")


class WireFormatError(ValueError):
    """A message that does not follow the configured wire format."""


# --- options -------------------------------------------------------------------------------


class _Opts(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Endpoints(_Opts):
    """Paths under `base_url`; `{order_no}` and `{day}` (YYYY-MM-DD) are filled in."""

    create: str = "/payouts"
    query: str = "/payouts/{order_no}"
    statement: str = "/statements/{day}"

    @model_validator(mode="after")
    def _placeholders(self) -> Endpoints:
        for name, path, needed in (
            ("create", self.create, None),
            ("query", self.query, "{order_no}"),
            ("statement", self.statement, "{day}"),
        ):
            if not path.startswith("/"):
                raise ValueError(f"{name} must start with '/'")
            if needed is not None and needed not in path:
                raise ValueError(f"{name} must contain {needed}")
        return self


def _default_request_fields() -> dict[OurField, str]:
    return {
        "order_no": "order_no",
        "amount": "amount",
        "currency": "currency",
        "account_no": "account_no",
        "account_name": "account_name",
        "bank_code": "bank_code",
        "callback_url": "callback_url",
    }


def _default_response_fields() -> dict[ResultField, str]:
    return {
        "order_no": "order_no",
        "status": "status",
        "bank_ref": "bank_ref",
        "amount": "amount",
        "fail_code": "fail_code",
        "fail_reason": "fail_reason",
        "finished_at": "finished_at",
    }


class Signing(_Opts):
    algorithm: Literal["hmac-sha256", "rsa-sha256", "rsa-pss-sha256"] = "hmac-sha256"
    secret: SecretStr | None = None  # HMAC, both ways
    private_key: SecretStr | None = None  # RSA: our PEM private key, signs requests
    bank_public_key: SecretStr | None = None  # RSA: the bank's PEM public key or certificate
    canonical: Literal["sorted", "raw"] = "sorted"
    placement: Literal["header", "body"] = "header"
    encoding: Literal["base64", "hex"] = "base64"
    signature_header: str = "X-Signature"
    signature_field: str = "sign"
    timestamp_header: str = "X-Timestamp"
    nonce_header: str = "X-Nonce"
    verify_responses: bool = True

    @model_validator(mode="after")
    def _keys(self) -> Signing:
        if self.algorithm == "hmac-sha256":
            if self.secret is None or not self.secret.get_secret_value():
                raise ValueError("secret is required for hmac-sha256")
        else:
            if self.private_key is None:
                raise ValueError(f"private_key is required for {self.algorithm}")
            if self.bank_public_key is None:
                raise ValueError(f"bank_public_key is required for {self.algorithm}")
            try:
                load_private_key(self.private_key.get_secret_value())
            except ValueError as e:
                raise ValueError(f"private_key: {e}") from None
            try:
                load_public_key(self.bank_public_key.get_secret_value())
            except ValueError as e:
                raise ValueError(f"bank_public_key: {e}") from None
        if self.placement == "body" and self.canonical == "raw":
            raise ValueError("placement = 'body' needs canonical = 'sorted'")
        return self


class Tls(_Opts):
    client_cert: str | None = None  # PEM file path (mTLS)
    client_key: str | None = None  # PEM file path
    ca_bundle: str | None = None  # PEM file path replacing the system roots

    @model_validator(mode="after")
    def _pair(self) -> Tls:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key go together")
        return self

    @property
    def custom(self) -> bool:
        return self.client_cert is not None or self.ca_bundle is not None


class SignedJsonOptions(_Opts):
    """`connector_options` of a funder speaking a signed host-to-host JSON API."""

    base_url: str
    endpoints: Endpoints = Endpoints()
    request_fields: dict[OurField, str] = Field(default_factory=_default_request_fields)
    static_fields: dict[str, str] = Field(default_factory=dict)  # e.g. merchant_id
    amount_format: Literal["fen", "yuan"] = "fen"
    response_fields: dict[ResultField, str] = Field(default_factory=_default_response_fields)
    status_map: dict[str, Target]
    # FAILED words / fail codes that say no money moved (fail-over allowed)
    pre_execution_words: list[str] = Field(default_factory=list)
    pre_execution_codes: list[str] = Field(default_factory=list)
    # HTTP statuses the bank documents as "refused before looking at the order"
    refused_http_statuses: list[int] = Field(default_factory=lambda: [400, 401, 403])
    signing: Signing
    timeout_seconds: float = Field(default=10, gt=0, le=300)
    tls: Tls = Tls()
    callback_ack_ok: str = "SUCCESS"
    callback_ack_fail: str = "FAIL"

    @model_validator(mode="after")
    def _consistent(self) -> SignedJsonOptions:
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url: must be an http(s) URL with a host, got {self.base_url!r}")
        if parts.query or parts.fragment:
            raise ValueError("base_url: must not carry a query or fragment")
        problems = []
        for needed in ("order_no", "amount"):
            if needed not in self.request_fields:
                problems.append(f"request_fields: must map {needed}")
        if "status" not in self.response_fields:
            problems.append("response_fields: must map status")
        if not self.status_map:
            problems.append("status_map: must list the bank's status words")
        for word in self.pre_execution_words:
            if self.status_map.get(word) != "failed":
                problems.append(f"pre_execution_words: {word!r} is not mapped to failed")
        clash = set(self.static_fields) & set(self.request_fields.values())
        if clash:
            problems.append(f"static_fields: {sorted(clash)} are also request fields")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/")


def _problems(e: ValidationError) -> str:
    out = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "options"
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown option"
        out.append(f"{where}: {msg}" if where != "options" else msg)
    return "; ".join(out)


def parse_options(raw: Mapping[str, Any]) -> SignedJsonOptions:
    """Validate `connector_options`; every problem, with its field, in one `ValueError`."""
    try:
        return SignedJsonOptions.model_validate(dict(raw))
    except ValidationError as e:
        raise ValueError(_problems(e)) from None


def check_statement_config(cfg: StatementConfig) -> None:
    """The statement is fetched as CSV in the funder's `[funders.statement]` mapping."""
    if cfg.path is None and cfg.format == "camt053":
        raise ValueError("statement.format: signed_json fetches CSV statements, not camt053")


# --- keys and signatures -------------------------------------------------------------------


def load_private_key(pem: str) -> rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError) as e:
        raise ValueError("not a PEM private key without password") from e
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("not an RSA private key")
    return key


def load_public_key(pem: str) -> rsa.RSAPublicKey:
    data = pem.encode()
    key: object
    try:
        if b"CERTIFICATE" in data:
            key = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise ValueError("not a PEM public key or certificate") from e
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("not an RSA public key")
    return key


def _encode(sig: bytes, encoding: str) -> str:
    return sig.hex() if encoding == "hex" else base64.b64encode(sig).decode()


def _decode(text: str, encoding: str) -> bytes | None:
    try:
        if encoding == "hex":
            return bytes.fromhex(text.strip())
        return base64.b64decode(text.strip(), validate=True)
    except (ValueError, binascii.Error):
        return None


class Signer:
    """Signs outgoing and verifies incoming messages for one side of the wire.

    `own_key` signs (HMAC secret or RSA private key); `peer_key` verifies (the same HMAC
    secret, or the peer's RSA public key).
    """

    def __init__(
        self,
        signing: Signing,
        *,
        own_key: rsa.RSAPrivateKey | bytes,
        peer_key: rsa.RSAPublicKey | bytes,
    ) -> None:
        self.cfg = signing
        self._own = own_key
        self._peer = peer_key

    @classmethod
    def for_client(cls, signing: Signing) -> Signer:
        if signing.algorithm == "hmac-sha256":
            assert signing.secret is not None
            secret = signing.secret.get_secret_value().encode()
            return cls(signing, own_key=secret, peer_key=secret)
        assert signing.private_key is not None
        assert signing.bank_public_key is not None
        return cls(
            signing,
            own_key=load_private_key(signing.private_key.get_secret_value()),
            peer_key=load_public_key(signing.bank_public_key.get_secret_value()),
        )

    def _pad(self) -> padding.AsymmetricPadding:
        if self.cfg.algorithm == "rsa-pss-sha256":
            return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        return padding.PKCS1v15()

    def sign(self, message: bytes) -> str:
        if isinstance(self._own, bytes):
            raw = hmac.new(self._own, message, hashlib.sha256).digest()
        else:
            raw = self._own.sign(message, self._pad(), hashes.SHA256())
        return _encode(raw, self.cfg.encoding)

    def verify(self, message: bytes, given: str) -> bool:
        sig = _decode(given, self.cfg.encoding)
        if sig is None:
            return False
        if isinstance(self._peer, bytes):
            expected = hmac.new(self._peer, message, hashlib.sha256).digest()
            return hmac.compare_digest(expected, sig)
        return self._rsa_verify(sig, message, hashes.SHA256())

    def _rsa_verify(
        self, sig: bytes, data: bytes, algorithm: hashes.HashAlgorithm | utils.Prehashed
    ) -> bool:
        assert not isinstance(self._peer, bytes)
        pad: padding.AsymmetricPadding = self._pad()
        if self.cfg.algorithm == "rsa-pss-sha256":
            pad = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.AUTO)
        try:
            self._peer.verify(sig, data, pad, algorithm)
        except InvalidSignature:
            return False
        return True

    def running(self, first: bytes, *, verify: bool) -> Running:
        """A signature (ours) or a verification (the peer's) over `first` + later chunks."""
        key = self._peer if verify else self._own
        return Running(self, key if isinstance(key, bytes) else None, first)

    def sign_digest(self, digest: bytes) -> str:
        """RSA: the signature of a message given as its SHA-256 digest."""
        assert not isinstance(self._own, bytes)
        raw = self._own.sign(digest, self._pad(), utils.Prehashed(hashes.SHA256()))
        return _encode(raw, self.cfg.encoding)

    def verify_digest(self, digest: bytes, sig: bytes) -> bool:
        """RSA: does `sig` sign the message whose SHA-256 digest this is?"""
        return self._rsa_verify(sig, digest, utils.Prehashed(hashes.SHA256()))


class Running:
    """A signature over a message fed in chunks: a statement download is signed and verified
    as it streams instead of being held whole. HMAC runs over the bytes; RSA signs and
    verifies the SHA-256 of them (`Prehashed`), which is the same signature as over the whole
    message."""

    def __init__(self, signer: Signer, mac_key: bytes | None, first: bytes) -> None:
        self._signer = signer
        self._mac = hmac.new(mac_key, first, hashlib.sha256) if mac_key is not None else None
        self._sha = hashlib.sha256(first) if mac_key is None else None

    def update(self, chunk: bytes) -> None:
        if self._mac is not None:
            self._mac.update(chunk)
        elif self._sha is not None:
            self._sha.update(chunk)

    def sign(self) -> str:
        if self._mac is not None:
            return _encode(self._mac.digest(), self._signer.cfg.encoding)
        assert self._sha is not None
        return self._signer.sign_digest(self._sha.digest())

    def verify(self, given: str) -> bool:
        sig = _decode(given, self._signer.cfg.encoding)
        if sig is None:
            return False
        if self._mac is not None:
            return hmac.compare_digest(self._mac.digest(), sig)
        assert self._sha is not None
        return self._signer.verify_digest(self._sha.digest(), sig)


def statement_prefix(timestamp: str, nonce: str) -> bytes:
    """What precedes the raw statement bytes in its signed message."""
    return f"{timestamp}\n{nonce}\n".encode(errors="surrogateescape")


def sign_statement(
    signer: Signer, chunks: Iterable[bytes], *, timestamp: str, nonce: str
) -> dict[str, str]:
    """The headers that sign a statement download made of `chunks` (the bank's side)."""
    cfg = signer.cfg
    running = signer.running(statement_prefix(timestamp, nonce), verify=False)
    for chunk in chunks:
        running.update(chunk)
    return {
        cfg.timestamp_header: timestamp,
        cfg.nonce_header: nonce,
        cfg.signature_header: running.sign(),
    }


class StatementCheck:
    """Verifies a statement download while it streams: `StatementCheck(signer, headers, now)`
    refuses an unsigned answer at once; feed every chunk to `update`; `finish` raises
    `SignatureError` unless the signature matches and the timestamp was fresh at `now` (when
    the answer's headers arrived)."""

    def __init__(self, signer: Signer, headers: Mapping[str, str], now: float) -> None:
        cfg = signer.cfg
        lowered = {k.lower(): v for k, v in headers.items()}
        self.timestamp = lowered.get(cfg.timestamp_header.lower(), "")
        nonce = lowered.get(cfg.nonce_header.lower(), "")
        self._given = lowered.get(cfg.signature_header.lower(), "")
        if not (self.timestamp and nonce and self._given):
            raise SignatureError("bad_signature", "statement is not signed")
        self._now = now
        self._running = signer.running(statement_prefix(self.timestamp, nonce), verify=True)

    def update(self, chunk: bytes) -> None:
        self._running.update(chunk)

    def finish(self) -> None:
        if not self._running.verify(self._given):
            raise SignatureError("bad_signature", "statement signature does not match")
        _fresh(self.timestamp, self._now)


def _fresh(timestamp: str, now: float) -> int:
    if not _TIMESTAMP.fullmatch(timestamp.strip()):
        raise SignatureError("malformed", f"timestamp {timestamp[:20]!r} is not unix seconds")
    ts = int(timestamp)
    if abs(now - ts) > MAX_CLOCK_SKEW_SECONDS:
        raise SignatureError("stale", f"timestamp {ts} is outside ±{MAX_CLOCK_SKEW_SECONDS} s")
    return ts


def _canonical_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def canonical_sorted(fields: Mapping[str, Any], skip: str) -> bytes:
    """`k1=v1&k2=v2…` in key order, without empty values and without the signature field."""
    parts = [
        f"{k}={_canonical_value(v)}"
        for k, v in sorted(fields.items())
        if k != skip and v is not None and v != ""
    ]
    return "&".join(parts).encode()


def signed_message(signing: Signing, timestamp: str, nonce: str, body: bytes) -> bytes:
    """What is signed for `body` (which, for a body-placed signature, may hold the signature)."""
    if signing.canonical == "raw":
        canonical = body
    elif not body.strip():
        canonical = b""
    else:
        try:
            obj = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise WireFormatError("body is not JSON") from e
        if not isinstance(obj, dict):
            raise WireFormatError("body is not a JSON object")
        canonical = canonical_sorted(obj, signing.signature_field)
    # header bytes that are not UTF-8 arrive surrogate-escaped: sign them as they came
    return f"{timestamp}\n{nonce}\n".encode(errors="surrogateescape") + canonical


def sign_message(
    signer: Signer, fields: Mapping[str, Any] | None, *, timestamp: str, nonce: str
) -> tuple[bytes, dict[str, str]]:
    """The body bytes and headers of a signed message carrying `fields` (None: no body)."""
    cfg = signer.cfg
    headers = {cfg.timestamp_header: timestamp, cfg.nonce_header: nonce}
    if fields is None:
        headers[cfg.signature_header] = signer.sign(signed_message(cfg, timestamp, nonce, b""))
        return b"", headers
    body = json_bytes(dict(fields))
    signature = signer.sign(signed_message(cfg, timestamp, nonce, body))
    if cfg.placement == "body":
        body = json_bytes({**fields, cfg.signature_field: signature})
    else:
        headers[cfg.signature_header] = signature
    headers["Content-Type"] = "application/json"
    return body, headers


def verify_message(
    signer: Signer, headers: Mapping[str, str], body: bytes, now: float
) -> tuple[int, str]:
    """Check signature and freshness; returns (timestamp, nonce) or raises `SignatureError`."""
    cfg = signer.cfg
    lowered = {k.lower(): v for k, v in headers.items()}
    timestamp = lowered.get(cfg.timestamp_header.lower(), "")
    nonce = lowered.get(cfg.nonce_header.lower(), "")
    if not timestamp or not nonce:
        raise SignatureError("bad_signature", "missing timestamp or nonce header")
    given = lowered.get(cfg.signature_header.lower())
    if cfg.placement == "body" and body.strip():
        given = None
        try:
            obj = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get(cfg.signature_field), str):
            given = obj[cfg.signature_field]
    if not given:
        raise SignatureError("bad_signature", "no signature")
    try:
        message = signed_message(cfg, timestamp, nonce, body)
    except WireFormatError as e:
        raise SignatureError("bad_signature", f"cannot canonicalise: {e}") from e
    if not signer.verify(message, given):
        raise SignatureError("bad_signature", "signature does not match")
    return _fresh(timestamp, now), nonce


class SignatureError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # bad_signature | stale | malformed
        self.message = message


# --- amounts, fields and statuses ----------------------------------------------------------


def fen_to_wire(fen: int, fmt: str) -> int | str:
    if fmt == "fen":
        return fen
    sign = "-" if fen < 0 else ""
    fen = abs(fen)
    return f"{sign}{fen // 100}.{fen % 100:02d}"


def wire_to_fen(value: Any, fmt: str) -> int:
    """Fen from the bank's amount (fen integer, or yuan string/number); exact, no floats."""
    if isinstance(value, bool):
        raise WireFormatError("amount is a boolean")
    if fmt == "fen":
        if isinstance(value, int):
            return value
        if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
            return int(value)
        raise WireFormatError(f"amount {str(value)[:30]!r} is not whole fen")
    text = value if isinstance(value, str) else json.dumps(value)
    if not _YUAN.fullmatch(text.strip()):
        raise WireFormatError(f"amount {text[:30]!r} is not yuan with at most 2 decimals")
    try:
        return int(Decimal(text.strip()) * 100)
    except InvalidOperation as e:  # pragma: no cover - the pattern guarantees a number
        raise WireFormatError(f"amount {text[:30]!r} is not a number") from e


def map_status(options: SignedJsonOptions, word: str) -> BankStatus:
    """The bank's status word in fundgate's vocabulary; a word not configured is UNKNOWN."""
    target = options.status_map.get(word)
    match target:
        case "accepted":
            return BankStatus.ACCEPTED
        case "processing":
            return BankStatus.PROCESSING
        case "succeeded":
            return BankStatus.SUCCEEDED
        case "failed":
            return BankStatus.FAILED
        case "not_found":
            return BankStatus.NOT_FOUND
        case None:
            return BankStatus.UNKNOWN


def words_for(options: SignedJsonOptions, target: Target) -> list[str]:
    return [w for w, t in options.status_map.items() if t == target]


def get_path(obj: Mapping[str, Any], path: str) -> Any:
    """`obj["a"]["b"]` for `path = "a.b"`; None when any step is missing."""
    node: Any = obj
    for step in path.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(step)
    return node


def set_path(obj: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node = obj
    for step in parents:
        node = node.setdefault(step, {})
    node[last] = value


def request_fields(options: SignedJsonOptions, order: PayoutOrder) -> dict[str, Any]:
    """The bank's payout request fields for `order` (before signing)."""
    out: dict[str, Any] = dict(options.static_fields)
    for ours, theirs in options.request_fields.items():
        value = getattr(order, ours)
        if ours in AMOUNT_FIELDS:
            value = fen_to_wire(value, options.amount_format)
        set_path(out, theirs, value)
    return out


def parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WireFormatError("body is not JSON") from e
    except RecursionError as e:
        raise WireFormatError("body is nested too deeply") from e
    if not isinstance(obj, dict):
        raise WireFormatError("body is not a JSON object")
    return obj


def _text(obj: Mapping[str, Any], options: SignedJsonOptions, key: ResultField) -> str | None:
    path = options.response_fields.get(key)
    if path is None:
        return None
    value = get_path(obj, path)
    if value is None or value == "":
        return None
    if isinstance(value, dict | list):
        raise WireFormatError(f"{key} is not a scalar")
    return str(value)


def _when(text: str | None, zone: ZoneInfo) -> datetime | None:
    if text is None:
        return None
    try:
        at = datetime.fromisoformat(text)
    except ValueError as e:
        raise WireFormatError(f"finished_at {text[:40]!r} is not ISO 8601") from e
    return at if at.tzinfo is not None else at.replace(tzinfo=zone)


BANK_ZONE = ZoneInfo("Asia/Shanghai")


def result_of(
    options: SignedJsonOptions, obj: Mapping[str, Any], *, order_no: str | None
) -> tuple[PayoutResult, str]:
    """The result described by a response or callback object, and the raw status word."""
    word = _text(obj, options, "status")
    if word is None:
        raise WireFormatError("no status")
    bank_order = _text(obj, options, "order_no")
    if order_no is not None and bank_order is not None and bank_order != order_no:
        raise WireFormatError(f"answer is about order {bank_order[:64]!r}, asked {order_no!r}")
    final_order = bank_order or order_no
    if not final_order:
        raise WireFormatError("no order number")
    amount_text = get_path(obj, options.response_fields["amount"]) if (
        "amount" in options.response_fields
    ) else None  # fmt: skip
    amount = None if amount_text in (None, "") else wire_to_fen(amount_text, options.amount_format)
    status = map_status(options, word)
    fail_code = _text(obj, options, "fail_code")
    flag = _text(obj, options, "pre_execution")
    pre = status is BankStatus.FAILED and (
        word in options.pre_execution_words
        or (fail_code is not None and fail_code in options.pre_execution_codes)
        or (flag is not None and flag.lower() == "true")
    )
    return (
        PayoutResult(
            order_no=final_order,
            status=status,
            bank_ref=_text(obj, options, "bank_ref"),
            amount=amount,
            fail_code=fail_code,
            fail_reason=_text(obj, options, "fail_reason"),
            finished_at=_when(_text(obj, options, "finished_at"), BANK_ZONE),
            pre_execution=pre,
        ),
        word,
    )


def json_bytes(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str).encode()


def masked_excerpt(body: bytes) -> str:
    """A bank reply fit for a log line: truncated, long digit runs (accounts, IDs) masked."""
    text = body[:RAW_LOG_LIMIT].decode("utf-8", "replace")
    text = _LONG_DIGITS.sub(
        lambda m: m.group()[:2] + "*" * (len(m.group()) - 4) + m.group()[-2:], text
    )
    return text + ("…" if len(body) > RAW_LOG_LIMIT else "")
