"""ISO 20022 wire format: pain.001 instructions (001.09, or 001.03), pain.002 status reports
(001.11) and the sandbox's camt.053 statements (read by `camt053`); options, transport signing
and status mapping. Pure, no I/O.

Every XML document is parsed hardened: no DTD, no entity expansion, no network, and a
document that declares a DOCTYPE or ENTITY is refused before parsing (XML bombs).
Outgoing pain.001 is validated against the official XSD before it is sent.

Transport (the sandbox's HTTP upload/download; real banks add their own envelope)::

    X-ISO-Timestamp, X-ISO-Nonce,
    X-ISO-Signature: hex(hmac_sha256(secret, timestamp + "\\n" + nonce + "\\n" + body))
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

from lxml import etree
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from connectors.base import BankStatus, PayoutOrder

TIMESTAMP_HEADER = "X-ISO-Timestamp"
NONCE_HEADER = "X-ISO-Nonce"
SIGNATURE_HEADER = "X-ISO-Signature"
# pain.001 has no place for it; real channels configure it out of band
CALLBACK_HEADER = "X-ISO-Callback-Url"
MAX_CLOCK_SKEW_SECONDS = 300  # CONTRACT.md: ±300 s
BANK_ZONE = ZoneInfo("Asia/Shanghai")
SCHEMAS = Path(__file__).parent / "schemas"

PAIN001 = "urn:iso:std:iso:20022:tech:xsd:pain.001.001.{version}"
PAIN002 = "urn:iso:std:iso:20022:tech:xsd:pain.002.001.11"
CAMT053 = "urn:iso:std:iso:20022:tech:xsd:camt.053.001.{version}"

# ExternalStatusReason1Code values that say the payment was refused before execution
# (account, amount, agent and format checks). Any other RJCT reason is terminal.
PRE_EXECUTION_REASONS = frozenset(
    {
        "AC01", "AC02", "AC03", "AC04", "AC06", "AC13", "AG01", "AG02", "AM01", "AM02",
        "AM03", "AM04", "AM05", "AM09", "AM10", "BE01", "BE04", "BE05", "CH03", "CUST",
        "DT01", "FF01", "MD07", "MS02", "MS03", "NARR", "RC01", "RR01", "RR02", "RR03",
        "RR04",
    }
)  # fmt: skip
# "duplicate payment": this copy was refused, but the order it repeats (a re-send after a
# lost answer, or one already in another message) may have been executed. Never a fail-over.
DUPLICATE_REASON = "DUPL"
# pain.001 identifiers (MsgId, InstrId, EndToEndId) are Max35Text
MAX_ID_LENGTH = 35
# transactions per pain.001 the dispatcher may batch; banks commonly cap a file far above it
MAX_BATCH_SIZE = 500

_DECLARATION = re.compile(rb"<!(DOCTYPE|ENTITY)", re.IGNORECASE)
_TIMESTAMP = re.compile(r"\d{1,12}")
_LONG_DIGITS = re.compile(r"\d{6,}")
RAW_LOG_LIMIT = 512  # enough to diagnose a bad reply, never a whole document in a log line


def masked_excerpt(body: bytes) -> str:
    """A bank reply fit for a log line: truncated, long digit runs (accounts, IDs) masked."""
    text = body[:RAW_LOG_LIMIT].decode("utf-8", "replace")
    text = _LONG_DIGITS.sub(lambda m: m[0][:2] + "*" * (len(m[0]) - 4) + m[0][-2:], text)
    return text + ("…" if len(body) > RAW_LOG_LIMIT else "")


class WireFormatError(ValueError):
    """A message that is not the ISO 20022 document it should be."""


class IsoOptions(BaseModel):
    """`connector_options` of a funder speaking ISO 20022 over HTTP."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str
    secret: SecretStr
    pain001_version: Literal["09", "03"] = "09"
    debtor_name: str = Field(min_length=1, max_length=140)
    debtor_account: str = Field(min_length=1, max_length=34)
    debtor_agent_bic: str = Field(pattern=r"^[A-Z]{6}[A-Z2-9][A-NP-Z0-9]([A-Z0-9]{3})?$")
    upload_path: str = "/iso/pain001"
    status_path: str = "/iso/pain002/{order_no}"
    statement_path: str = "/iso/camt053/{day}"
    timeout_seconds: float = Field(default=10, gt=0, le=300)
    # orders the dispatcher may put in one pain.001 for this funder; 1 sends each alone
    batch_size: int = Field(default=1, ge=1, le=MAX_BATCH_SIZE)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http(s) URL with a host, got {v!r}")
        return v.rstrip("/")

    @field_validator("secret")
    @classmethod
    def _non_empty(cls, v: SecretStr) -> SecretStr:
        if not v.get_secret_value():
            raise ValueError("must not be empty")
        return v


def parse_options(raw: Mapping[str, Any]) -> IsoOptions:
    try:
        opts = IsoOptions.model_validate(dict(raw))
    except ValidationError as e:
        problems = []
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"]) or "options"
            msg = str(err["msg"]).removeprefix("Value error, ")
            problems.append(
                f"{where}: {'unknown option' if err['type'] == 'extra_forbidden' else msg}"
            )
        raise ValueError("; ".join(problems)) from None
    if "{order_no}" not in opts.status_path:
        raise ValueError("status_path: must contain {order_no}")
    if "{day}" not in opts.statement_path:
        raise ValueError("statement_path: must contain {day}")
    return opts


# --- transport signing ---------------------------------------------------------------------


def sign(secret: str, timestamp: str, nonce: str, body: bytes) -> str:
    message = f"{timestamp}\n{nonce}\n".encode(errors="surrogateescape") + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signed_headers(secret: str, body: bytes, *, timestamp: str, nonce: str) -> dict[str, str]:
    return {
        TIMESTAMP_HEADER: timestamp,
        NONCE_HEADER: nonce,
        SIGNATURE_HEADER: sign(secret, timestamp, nonce, body),
        "Content-Type": "application/xml",
    }


def verify(secret: str, headers: Mapping[str, str], body: bytes, now: float) -> tuple[int, str]:
    """(timestamp, nonce) of a genuine, fresh message, else `SignatureError`."""
    lowered = {k.lower(): v for k, v in headers.items()}
    ts = lowered.get(TIMESTAMP_HEADER.lower(), "")
    nonce = lowered.get(NONCE_HEADER.lower(), "")
    given = lowered.get(SIGNATURE_HEADER.lower(), "")
    if not (ts and nonce and given):
        raise SignatureError("bad_signature", "missing X-ISO signature header(s)")
    expected = sign(secret, ts, nonce, body).encode()
    if not hmac.compare_digest(expected, given.strip().lower().encode("utf-8", "replace")):
        raise SignatureError("bad_signature", "signature does not match")
    return _fresh(ts, now), nonce


def _fresh(ts: str, now: float) -> int:
    if not _TIMESTAMP.fullmatch(ts.strip()):
        raise SignatureError("malformed", "timestamp is not unix seconds")
    if abs(now - int(ts)) > MAX_CLOCK_SKEW_SECONDS:
        raise SignatureError("stale", f"timestamp {ts} is outside ±{MAX_CLOCK_SKEW_SECONDS} s")
    return int(ts)


def _running(secret: str, timestamp: str, nonce: str) -> Any:
    """An HMAC of the signed message so far: `sign`'s, fed the body in pieces."""
    prefix = f"{timestamp}\n{nonce}\n".encode(errors="surrogateescape")
    return hmac.new(secret.encode(), prefix, hashlib.sha256)


def sign_statement(
    secret: str, chunks: Iterable[bytes], *, timestamp: str, nonce: str
) -> dict[str, str]:
    """The headers that sign a camt.053 download made of `chunks` (the bank's side): the same
    signature as `signed_headers` over the whole body, computed as the chunks go by."""
    mac = _running(secret, timestamp, nonce)
    for chunk in chunks:
        mac.update(chunk)
    return {
        TIMESTAMP_HEADER: timestamp,
        NONCE_HEADER: nonce,
        SIGNATURE_HEADER: mac.hexdigest(),
        "Content-Type": "application/xml",
    }


class StatementCheck:
    """Verifies a camt.053 download while it streams: `StatementCheck(secret, headers, now)`
    refuses an unsigned answer at once; feed every chunk to `update`; `finish` raises
    `SignatureError` unless the signature over the whole body matches and the timestamp was
    fresh at `now` (when the answer's headers arrived)."""

    def __init__(self, secret: str, headers: Mapping[str, str], now: float) -> None:
        lowered = {k.lower(): v for k, v in headers.items()}
        self._ts = lowered.get(TIMESTAMP_HEADER.lower(), "")
        nonce = lowered.get(NONCE_HEADER.lower(), "")
        self._given = lowered.get(SIGNATURE_HEADER.lower(), "")
        if not (self._ts and nonce and self._given):
            raise SignatureError("bad_signature", "statement is not signed")
        self._now = now
        self._mac = _running(secret, self._ts, nonce)

    def update(self, chunk: bytes) -> None:
        self._mac.update(chunk)

    def finish(self) -> None:
        given = self._given.strip().lower().encode("utf-8", "replace")
        if not hmac.compare_digest(self._mac.hexdigest().encode(), given):
            raise SignatureError("bad_signature", "statement signature does not match")
        _fresh(self._ts, self._now)


class SignatureError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


# --- XML hardening and schemas -------------------------------------------------------------


def _parser(schema: etree.XMLSchema | None = None) -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        huge_tree=False,
        remove_comments=True,
        schema=schema,
    )


_schemas: dict[str, etree.XMLSchema] = {}


def schema(name: str) -> etree.XMLSchema:
    """An XSD from this folder, loaded once, never from the network."""
    found = _schemas.get(name)
    if found is None:
        doc = etree.parse(str(SCHEMAS / f"{name}.xsd"), _parser())
        found = _schemas[name] = etree.XMLSchema(doc)
    return found


def _xsd_error(xsd: etree.XMLSchema) -> str:
    return str(xsd.error_log).split("\n", 1)[0][:300]


def parse_xml(body: bytes, schema_name: str | None = None) -> etree._Element:
    """A hardened parse; with `schema_name`, the document must also be valid."""
    if _DECLARATION.search(body[:4096]) or b"<!ENTITY" in body:
        raise WireFormatError("documents with a DOCTYPE or ENTITY declaration are refused")
    try:
        root = etree.fromstring(body, _parser())
    except etree.XMLSyntaxError as e:
        raise WireFormatError(f"not well-formed XML: {e}") from e
    if schema_name is not None:
        xsd = schema(schema_name)
        if not xsd.validate(root):
            raise WireFormatError(f"not a valid {schema_name}: {_xsd_error(xsd)}")
    return root


# --- pain.001 ------------------------------------------------------------------------------


def yuan(fen: int) -> str:
    return f"{fen // 100}.{fen % 100:02d}"


def pain001(
    options: IsoOptions, orders: Iterable[PayoutOrder], *, msg_id: str, created: datetime
) -> bytes:
    """One pain.001 carrying `orders` (one batch per funder), validated against its XSD."""
    batch = list(orders)
    if not batch:
        raise ValueError("a pain.001 needs at least one order")
    for o in batch:
        # a cut EndToEndId could name two orders, and its status never matches ours
        if len(o.order_no) > MAX_ID_LENGTH:
            raise WireFormatError(
                f"order number {o.order_no[:40]!r} is longer than {MAX_ID_LENGTH} characters"
            )
    if len({o.order_no for o in batch}) != len(batch):
        raise ValueError("an order number appears twice in one pain.001")
    v = options.pain001_version
    ns = PAIN001.format(version=v)

    def el(parent: etree._Element, tag: str, text: str | None = None, **attrs: str) -> Any:
        node = etree.SubElement(parent, f"{{{ns}}}{tag}", attrs)
        if text is not None:
            node.text = text
        return node

    total = yuan(sum(o.amount for o in batch))
    root = etree.Element(f"{{{ns}}}Document", nsmap={None: ns})  # type: ignore[dict-item]
    init = el(root, "CstmrCdtTrfInitn")
    hdr = el(init, "GrpHdr")
    el(hdr, "MsgId", msg_id[:35])
    el(hdr, "CreDtTm", created.replace(microsecond=0).isoformat())
    el(hdr, "NbOfTxs", str(len(batch)))
    el(hdr, "CtrlSum", total)
    el(el(hdr, "InitgPty"), "Nm", options.debtor_name)
    pmt = el(init, "PmtInf")
    el(pmt, "PmtInfId", msg_id[:35])
    el(pmt, "PmtMtd", "TRF")
    el(pmt, "NbOfTxs", str(len(batch)))
    el(pmt, "CtrlSum", total)
    day = created.astimezone(BANK_ZONE).date().isoformat()
    if v == "09":
        el(el(pmt, "ReqdExctnDt"), "Dt", day)
    else:
        el(pmt, "ReqdExctnDt", day)
    el(el(pmt, "Dbtr"), "Nm", options.debtor_name)
    el(el(el(el(pmt, "DbtrAcct"), "Id"), "Othr"), "Id", options.debtor_account)
    el(el(el(pmt, "DbtrAgt"), "FinInstnId"), "BICFI" if v == "09" else "BIC",
       options.debtor_agent_bic)  # fmt: skip
    for o in batch:
        tx = el(pmt, "CdtTrfTxInf")
        ids = el(tx, "PmtId")
        el(ids, "InstrId", o.order_no[:35])
        el(ids, "EndToEndId", o.order_no[:35])
        el(el(tx, "Amt"), "InstdAmt", yuan(o.amount), Ccy=o.currency)
        el(el(el(el(tx, "CdtrAgt"), "FinInstnId"), "Othr"), "Id", o.bank_code[:35])
        el(el(tx, "Cdtr"), "Nm", o.account_name[:140])
        el(el(el(el(tx, "CdtrAcct"), "Id"), "Othr"), "Id", o.account_no[:34])
    body: bytes = etree.tostring(root, xml_declaration=True, encoding="UTF-8")
    xsd = schema(f"pain.001.001.{v}")
    if not xsd.validate(root):
        raise WireFormatError(f"pain.001 fails its XSD: {_xsd_error(xsd)}")
    return body


@dataclass(frozen=True, slots=True)
class Pain001Tx:
    order_no: str
    amount: int
    currency: str
    account_no: str


def read_pain001(body: bytes) -> tuple[str, list[Pain001Tx]]:
    """The sandbox side: (MsgId, transactions) of a valid pain.001.001.03/09."""
    root = parse_xml(body)
    ns = etree.QName(root).namespace or ""
    version = ns.rsplit(".", 1)[-1]
    if ns != PAIN001.format(version=version) or version not in ("03", "09"):
        raise WireFormatError(f"not a pain.001.001.03/09 document ({ns[:80]})")
    xsd = schema(f"pain.001.001.{version}")
    if not xsd.validate(root):
        raise WireFormatError("pain.001 fails its XSD")
    n = {"p": ns}
    msg_id = root.findtext("p:CstmrCdtTrfInitn/p:GrpHdr/p:MsgId", namespaces=n) or ""
    txs = []
    for tx in root.iterfind(".//p:CdtTrfTxInf", n):
        amt = tx.find("p:Amt/p:InstdAmt", n)
        assert amt is not None
        txs.append(
            Pain001Tx(
                order_no=tx.findtext("p:PmtId/p:EndToEndId", namespaces=n) or "",
                amount=fen(amt.text or ""),
                currency=amt.get("Ccy", ""),
                account_no=tx.findtext("p:CdtrAcct/p:Id/p:Othr/p:Id", namespaces=n) or "",
            )
        )
    return msg_id, txs


def fen(text: str) -> int:
    try:
        value = Decimal(text.strip()) * 100
    except InvalidOperation as e:
        raise WireFormatError(f"amount {text[:30]!r} is not a number") from e
    if value != value.to_integral_value() or value < 0:
        raise WireFormatError(f"amount {text[:30]!r} is not whole fen")
    return int(value)


# --- pain.002 ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TxStatus:
    order_no: str
    code: str  # ExternalPaymentTransactionStatus1Code, e.g. ACTC, ACSC, RJCT
    reason: str | None
    bank_ref: str | None = None  # AcctSvcrRef
    amount: int | None = None  # OrgnlTxRef/Amt/InstdAmt, fen
    at: datetime | None = None  # AccptncDtTm


def map_status(code: str) -> BankStatus:
    """pain.002 transaction (or group) status codes in fundgate's vocabulary."""
    match code:
        case "RCVD" | "ACTC" | "ACCP" | "PDNG" | "PART":
            return BankStatus.ACCEPTED
        case "ACSP" | "ACWC" | "ACWP" | "ACFC":
            return BankStatus.PROCESSING
        case "ACSC" | "ACCC":
            return BankStatus.SUCCEEDED
        case "RJCT" | "CANC":
            return BankStatus.FAILED
        case _:
            return BankStatus.UNKNOWN


def pre_execution(code: str, reason: str | None) -> bool:
    """A rejection with a reason saying the payment was never executed."""
    return code == "RJCT" and reason is not None and reason in PRE_EXECUTION_REASONS


def pain002(
    *, msg_id: str, original_msg_id: str, statuses: Iterable[TxStatus], created: datetime
) -> bytes:
    """A pain.002.001.11 status report (the sandbox bank's side)."""
    ns = PAIN002

    def el(parent: etree._Element, tag: str, text: str | None = None) -> Any:
        node = etree.SubElement(parent, f"{{{ns}}}{tag}")
        if text is not None:
            node.text = text
        return node

    root = etree.Element(f"{{{ns}}}Document", nsmap={None: ns})  # type: ignore[dict-item]
    rpt = el(root, "CstmrPmtStsRpt")
    hdr = el(rpt, "GrpHdr")
    el(hdr, "MsgId", msg_id[:35])
    el(hdr, "CreDtTm", created.replace(microsecond=0).isoformat())
    grp = el(rpt, "OrgnlGrpInfAndSts")
    el(grp, "OrgnlMsgId", original_msg_id[:35])
    el(grp, "OrgnlMsgNmId", "pain.001.001.09")
    pmt = el(rpt, "OrgnlPmtInfAndSts")
    el(pmt, "OrgnlPmtInfId", original_msg_id[:35])
    for s in statuses:
        tx = el(pmt, "TxInfAndSts")
        el(tx, "OrgnlInstrId", s.order_no[:35])
        el(tx, "OrgnlEndToEndId", s.order_no[:35])
        el(tx, "TxSts", s.code)
        if s.reason:
            el(el(el(tx, "StsRsnInf"), "Rsn"), "Cd", s.reason)
        if s.at is not None:
            el(tx, "AccptncDtTm", s.at.replace(microsecond=0).isoformat())
        if s.bank_ref:
            el(tx, "AcctSvcrRef", s.bank_ref[:35])
        if s.amount is not None:
            amt = el(el(el(tx, "OrgnlTxRef"), "Amt"), "InstdAmt", yuan(s.amount))
            amt.set("Ccy", "CNY")
    xsd = schema("pain.002.001.11")
    if not xsd.validate(root):
        raise WireFormatError(f"pain.002 fails its XSD: {_xsd_error(xsd)}")
    return bytes(etree.tostring(root, xml_declaration=True, encoding="UTF-8"))


def read_pain002(body: bytes) -> list[TxStatus]:
    """Transaction statuses of a valid pain.002.001.11; the group status applies to every
    transaction without its own (a group RJCT rejects them all)."""
    root = parse_xml(body, "pain.002.001.11")
    n = {"p": PAIN002}
    rpt = root.find("p:CstmrPmtStsRpt", n)
    if rpt is None:
        raise WireFormatError("no CstmrPmtStsRpt")
    group = rpt.findtext("p:OrgnlGrpInfAndSts/p:GrpSts", namespaces=n)
    group_reason = rpt.findtext("p:OrgnlGrpInfAndSts/p:StsRsnInf/p:Rsn/p:Cd", namespaces=n)
    out = []
    for pmt in rpt.iterfind("p:OrgnlPmtInfAndSts", n):
        pmt_sts = pmt.findtext("p:PmtInfSts", namespaces=n)
        pmt_reason = pmt.findtext("p:StsRsnInf/p:Rsn/p:Cd", namespaces=n)
        for tx in pmt.iterfind("p:TxInfAndSts", n):
            order_no = tx.findtext("p:OrgnlEndToEndId", namespaces=n) or tx.findtext(
                "p:OrgnlInstrId", namespaces=n
            )
            code = tx.findtext("p:TxSts", namespaces=n) or pmt_sts or group
            reason = tx.findtext("p:StsRsnInf/p:Rsn/p:Cd", namespaces=n) or pmt_reason
            if not order_no or not code:
                raise WireFormatError("a transaction status without order number or status")
            amount = tx.findtext("p:OrgnlTxRef/p:Amt/p:InstdAmt", namespaces=n)
            at = tx.findtext("p:AccptncDtTm", namespaces=n)
            try:
                when = datetime.fromisoformat(at) if at else None
            except ValueError as e:
                raise WireFormatError(f"AccptncDtTm {(at or '')[:40]!r} is not a time") from e
            out.append(
                TxStatus(
                    order_no,
                    code,
                    reason or group_reason,
                    bank_ref=tx.findtext("p:AcctSvcrRef", namespaces=n),
                    amount=fen(amount) if amount else None,
                    at=when if when is None or when.tzinfo else when.replace(tzinfo=BANK_ZONE),
                )
            )
    return out


# --- camt.053 ------------------------------------------------------------------------------


def camt053(statement_id: str, lines: Iterable[tuple[str, str, int, datetime]]) -> Iterator[bytes]:
    """A minimal camt.053.001.08 as byte chunks (the sandbox side): (order_no, bank_ref, fen,
    booked_at) per booked entry."""
    ns = CAMT053.format(version="08")
    yield (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Document xmlns="{ns}"><BkToCstmrStmt>'
        f"<GrpHdr><MsgId>{statement_id}</MsgId><CreDtTm>{datetime.now(BANK_ZONE).replace(microsecond=0).isoformat()}</CreDtTm></GrpHdr>"
        f"<Stmt><Id>{statement_id}</Id><Acct><Id><Othr><Id>SANDBOX</Id></Othr></Id></Acct>\n"
        '<Bal><Tp><CdOrPrtry><Cd>CLBD</Cd></CdOrPrtry></Tp><Amt Ccy="CNY">0.00</Amt>'
        "<CdtDbtInd>CRDT</CdtDbtInd><Dt><Dt>2026-01-01</Dt></Dt></Bal>\n"
    ).encode()
    for order_no, bank_ref, amount, at in lines:
        # one element per line, as banks' pretty-printed files come
        yield (
            f'<Ntry>\n<Amt Ccy="CNY">{yuan(amount)}</Amt>\n<CdtDbtInd>DBIT</CdtDbtInd>\n'
            f"<Sts><Cd>BOOK</Cd></Sts>\n<BookgDt><DtTm>{at.isoformat()}</DtTm></BookgDt>\n"
            f"<AcctSvcrRef>{bank_ref}</AcctSvcrRef>\n<BkTxCd/>\n<NtryDtls><TxDtls>\n"
            f"<Refs><AcctSvcrRef>{bank_ref}</AcctSvcrRef><EndToEndId>{order_no}</EndToEndId></Refs>\n"
            f'<Amt Ccy="CNY">{yuan(amount)}</Amt>\n</TxDtls></NtryDtls>\n</Ntry>\n'
        ).encode()
    yield b"</Stmt></BkToCstmrStmt></Document>\n"
