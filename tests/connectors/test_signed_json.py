"""signed_json: options, canonical strings, signing, mapping and bad input from the bank."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from structlog.testing import capture_logs

from config.models import Funder, StatementConfig
from connectors import registry
from connectors.base import BankStatus, StatementLine
from connectors.errors import CallbackRejected, ConnectorError, OutcomeUnknown, Rejected
from connectors.signed_json import sandbox as sj_bank
from connectors.signed_json import wire
from connectors.signed_json.connector import SignedJsonConnector
from tests.connectors.conformance import CallbackInbox, bank_day, order, serve

BASE = "http://bank.test"
SECRET = "sj-secret"


def options(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "base_url": BASE,
        "status_map": {
            "ACCEPTED": "accepted",
            "SUCCESS": "succeeded",
            "FAIL": "failed",
            "REFUSED": "failed",
            "NONE": "not_found",
        },
        "pre_execution_words": ["REFUSED"],
        "signing": {"algorithm": "hmac-sha256", "secret": SECRET},
    }
    base.update(changes)
    return base


def funder(opts: dict[str, Any]) -> Funder:
    return Funder(
        id="bank-j",
        name="JSON Bank",
        license="bank",
        mode="direct",
        priority=1,
        products=["consumer-standard"],
        single_max=20_000_000,
        daily_limit=5_000_000_000,
        connector="signed_json",
        connector_options=opts,
    )


@pytest.fixture(scope="module")
def keys() -> dict[str, str]:
    def pair() -> tuple[str, str]:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        public = (
            key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )
        return private, public

    ours, our_pub = pair()
    bank, bank_pub = pair()
    return {"ours": ours, "our_pub": our_pub, "bank": bank, "bank_pub": bank_pub}


# --- options -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"base_url": "ftp://x"}, "base_url"),
        ({"status_map": {}}, "status_map"),
        ({"signing": {"algorithm": "hmac-sha256"}}, "secret"),
        ({"signing": {"algorithm": "rsa-sha256", "private_key": "x", "bank_public_key": "y"}},
         "private_key"),
        ({"endpoints": {"query": "/payouts"}}, "query"),
        ({"pre_execution_words": ["SUCCESS"]}, "pre_execution_words"),
        ({"request_fields": {"amount": "amt"}}, "request_fields"),
        ({"tls": {"client_cert": "/c.pem"}}, "client_key"),
        ({"amount_format": "cents"}, "amount_format"),
        ({"surprise": 1}, "surprise"),
        ({"signing": {"secret": "s", "placement": "body", "canonical": "raw"}}, "placement"),
    ],
)  # fmt: skip
def test_invalid_options_raise_value_error_naming_the_field(
    change: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValueError, match=field):
        wire.parse_options(options(**change))


@pytest.mark.asyncio
async def test_missing_ca_bundle_is_an_option_error() -> None:
    async with httpx.AsyncClient() as client:
        with pytest.raises(ValueError, match=r"tls\.ca_bundle"):
            SignedJsonConnector(funder(options(tls={"ca_bundle": "/nope.pem"})), client)


@pytest.mark.asyncio
async def test_entry_point_builds_the_connector() -> None:
    async with httpx.AsyncClient() as client:
        assert isinstance(registry.build(funder(options()), client), SignedJsonConnector)


# --- pure wire -----------------------------------------------------------------------------


def test_sorted_canonical_string_skips_empty_values_and_the_signature_field() -> None:
    fields = {"b": "2", "a": 1, "empty": "", "none": None, "sign": "xx", "n": {"z": 1, "y": [1]}}
    assert wire.canonical_sorted(fields, "sign") == b'a=1&b=2&n={"y":[1],"z":1}'


@pytest.mark.parametrize(
    ("fen", "yuan"), [(123456, "1234.56"), (5, "0.05"), (100, "1.00"), (0, "0.00")]
)
def test_amounts_convert_exactly_between_fen_and_yuan(fen: int, yuan: str) -> None:
    assert wire.fen_to_wire(fen, "yuan") == yuan
    assert wire.wire_to_fen(yuan, "yuan") == fen
    assert wire.fen_to_wire(fen, "fen") == fen


@pytest.mark.parametrize("bad", ["1.234", "abc", "1e3", ""])
def test_malformed_yuan_amounts_are_refused(bad: str) -> None:
    with pytest.raises(wire.WireFormatError):
        wire.wire_to_fen(bad, "yuan")


def test_request_fields_follow_the_mapping_with_nesting_and_static_fields() -> None:
    opts = wire.parse_options(
        options(
            request_fields={"order_no": "biz.out_no", "amount": "biz.amt", "account_no": "acct"},
            static_fields={"mch_id": "M1"},
            amount_format="yuan",
        )
    )
    assert wire.request_fields(opts, order(1)) == {
        "mch_id": "M1",
        "biz": {"out_no": "CF1-1", "amt": "10000.01"},
        "acct": "6222020200112233445",
    }


def test_every_listed_status_word_is_mapped_and_others_are_unknown() -> None:
    opts = wire.parse_options(options())
    assert wire.map_status(opts, "ACCEPTED") is BankStatus.ACCEPTED
    assert wire.map_status(opts, "SUCCESS") is BankStatus.SUCCEEDED
    assert wire.map_status(opts, "FAIL") is BankStatus.FAILED
    assert wire.map_status(opts, "NONE") is BankStatus.NOT_FOUND
    assert wire.map_status(opts, "WHATEVER") is BankStatus.UNKNOWN


@pytest.mark.parametrize("algorithm", ["hmac-sha256", "rsa-sha256", "rsa-pss-sha256"])
@pytest.mark.parametrize("placement", ["header", "body"])
def test_signatures_verify_on_the_other_side_and_fail_with_the_wrong_key(
    algorithm: str, placement: str, keys: dict[str, str]
) -> None:
    signing = {
        "algorithm": algorithm,
        "secret": SECRET,
        "private_key": keys["ours"],
        "bank_public_key": keys["bank_pub"],
        "placement": placement,
    }
    opts = wire.parse_options(options(signing=signing))
    client = wire.Signer.for_client(opts.signing)
    bank = sj_bank.bank_signer(
        sj_bank.SignedJsonBankOptions(
            wire=opts, bank_private_key=keys["bank"], client_public_key=keys["our_pub"]
        )
    )
    body, headers = wire.sign_message(client, {"a": "1"}, timestamp="100", nonce="n")
    assert wire.verify_message(bank, headers, body, 100.0) == (100, "n")
    body, headers = wire.sign_message(bank, {"a": "1"}, timestamp="100", nonce="n")
    assert wire.verify_message(client, headers, body, 100.0) == (100, "n")
    # an answer signed with any other key is refused
    if algorithm == "hmac-sha256":
        impostor = wire.Signer(opts.signing, own_key=b"other", peer_key=b"other")
    else:
        impostor = client  # signs with our key, which is not the bank's
    body, headers = wire.sign_message(impostor, {"a": "1"}, timestamp="100", nonce="n")
    with pytest.raises(wire.SignatureError):
        wire.verify_message(client, headers, body, 100.0)


# --- against the sandbox bank: RSA and raw canonical ---------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("algorithm", ["rsa-sha256", "rsa-pss-sha256"])
async def test_rsa_signed_payout_and_callback_round_trip(
    algorithm: str, keys: dict[str, str], client: httpx.AsyncClient
) -> None:
    signing = {
        "algorithm": algorithm,
        "private_key": keys["ours"],
        "bank_public_key": keys["bank_pub"],
        "canonical": "raw",
        "signature_header": "X-Bank-Sign",
    }
    opts = options(signing=signing, amount_format="yuan")
    app = sj_bank.create_bank_app(
        sj_bank.SignedJsonBankOptions(
            wire=wire.parse_options(opts),
            bank_private_key=keys["bank"],
            client_public_key=keys["our_pub"],
            settle_ms=5,
        )
    )
    runner, url = await serve(app)
    try:
        async with CallbackInbox() as inbox:
            connector = SignedJsonConnector(funder({**opts, "base_url": url}), client)
            result = await connector.disburse(order(1, inbox.url))
            assert result.status is BankStatus.ACCEPTED
            event = connector.parse_callback(*await inbox.next())
            assert (event.status, event.amount) == (BankStatus.SUCCEEDED, order(1).amount)
            # the statement download is signed with the bank's RSA key as well
            lines = [line async for line in connector.fetch_statement(bank_day())]
            assert [(x.order_no, x.amount, x.status) for x in lines] == [
                (order(1).order_no, order(1).amount, "succeeded")
            ]
    finally:
        await runner.cleanup()


# --- bad input ------------------------------------------------------------------------------


Handler = Callable[[httpx.Request], httpx.Response]


def bank_answer(
    fields: dict[str, Any], status: int = 200, *, secret: str = SECRET, ts: float | None = None
) -> httpx.Response:
    opts = wire.parse_options(options(signing={"algorithm": "hmac-sha256", "secret": secret}))
    signer = sj_bank.bank_signer(sj_bank.SignedJsonBankOptions(wire=opts))
    body, headers = wire.sign_message(
        signer, fields, timestamp=str(int(ts or time.time())), nonce="bank-nonce"
    )
    return httpx.Response(status, content=body, headers=headers)


def connector_for(handler: Handler) -> tuple[SignedJsonConnector, httpx.AsyncClient]:
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return SignedJsonConnector(funder(options()), client), client


VIEW = {"order_no": "CF1-1", "status": "ACCEPTED", "bank_ref": "B1", "amount": 1_000_001}


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("answer", "code"),
    [
        (lambda: httpx.Response(200, text="<html><body>Login</body></html>"), "bad_signature"),
        (lambda: bank_answer(VIEW, secret="someone-else"), "bad_signature"),
        (lambda: bank_answer(VIEW, ts=time.time() - 3600), "stale"),
        (lambda: bank_answer({**VIEW, "status": "NEVER_SEEN"}), "unknown_status"),
        (lambda: bank_answer({**VIEW, "order_no": "OTHER-1"}), "malformed"),
        (lambda: bank_answer({**VIEW, "amount": "12.x"}), "malformed"),
        (lambda: httpx.Response(502, text="<html>Bad Gateway</html>"), "server_error"),
        (lambda: bank_answer(VIEW, status=418), "unexpected_status"),
        (lambda: bank_answer(VIEW, status=409), "order_conflict"),
    ],
)
async def test_untrustworthy_payout_answers_are_unknown_outcomes(
    answer: Callable[[], httpx.Response], code: str
) -> None:
    connector, client = connector_for(lambda _r: answer())
    async with client:
        with pytest.raises(OutcomeUnknown) as caught:
            await connector.disburse(order(1))
    assert caught.value.code == code


@pytest.mark.asyncio
async def test_truncated_json_is_an_unknown_outcome_logged_masked_and_truncated() -> None:
    good = bank_answer({**VIEW, "fail_reason": "acct 6222020200112233445 " + "x" * 2000})
    cut = good.content[:-10]
    headers = dict(good.headers)
    headers.pop("content-length", None)
    connector, client = connector_for(lambda _r: httpx.Response(200, content=cut, headers=headers))
    async with client:
        with capture_logs() as logs, pytest.raises(OutcomeUnknown):
            await connector.disburse(order(1))
    raw = logs[0]["raw"]
    assert "6222020200112233445" not in raw
    assert "62***************45" in raw
    assert len(raw) <= wire.RAW_LOG_LIMIT + 1


@pytest.mark.asyncio
async def test_refusal_words_are_rejected_with_their_pre_execution_flag() -> None:
    refused = {**VIEW, "status": "REFUSED", "fail_code": "RISK"}
    connector, client = connector_for(lambda _r: bank_answer(refused, status=422))
    async with client:
        with pytest.raises(Rejected) as caught:
            await connector.disburse(order(1))
    assert (caught.value.pre_execution, caught.value.code) == (True, "RISK")

    failed = {**VIEW, "status": "FAIL", "fail_code": "FROZEN"}
    connector, client = connector_for(lambda _r: bank_answer(failed))
    async with client:
        with pytest.raises(Rejected) as caught:
            await connector.disburse(order(1))
    assert caught.value.pre_execution is False


@pytest.mark.asyncio
async def test_query_distinguishes_the_banks_not_found_from_a_bare_404() -> None:
    connector, client = connector_for(lambda _r: bank_answer({"status": "NONE"}, status=404))
    async with client:
        assert (await connector.query("CF1-1")).status is BankStatus.NOT_FOUND
    connector, client = connector_for(lambda _r: httpx.Response(404, text="Not Found"))
    async with client:
        with pytest.raises(OutcomeUnknown):
            await connector.query("CF1-1")
    connector, client = connector_for(lambda _r: bank_answer({**VIEW, "status": "HUH"}))
    async with client:
        assert (await connector.query("CF1-1")).status is BankStatus.UNKNOWN


@pytest.mark.asyncio
async def test_callbacks_without_signature_or_with_garbage_are_refused(
    client: httpx.AsyncClient,
) -> None:
    connector = SignedJsonConnector(funder(options()), client)
    with pytest.raises(CallbackRejected, match="timestamp"):
        connector.parse_callback({}, b"{}")
    good = bank_answer({"status": "SUCCESS"})  # signed, but no order number
    with pytest.raises(CallbackRejected) as caught:
        connector.parse_callback(dict(good.headers), good.content)
    assert caught.value.reason == "malformed"
    html = bank_answer(VIEW)
    with pytest.raises(CallbackRejected) as caught:
        connector.parse_callback(dict(html.headers), b"<html>" + html.content)
    assert caught.value.reason == "bad_signature"


# --- signed statement downloads -------------------------------------------------------------


STATEMENT = (
    b"Bank J daily statement\n"  # a preamble line
    b"order_no,bank_ref,amount,status,finished_at\n"
    b"CF1-1,B1,1000001,SUCCESS,2026-11-25T10:00:00+08:00\n"
    b"CF2-1,B2,1000002,FAIL,2026-11-25T10:01:00+08:00\n"
    b"2,2000003\n"  # an unmarked last summary row: the shared CSV mapping reads it
)
STATEMENT_MAPPING = {
    "preamble_lines": 1,
    "summary": {"position": "last", "count_field": 0, "total_field": 1},
    "status_map": {"SUCCESS": "succeeded", "FAIL": "failed"},
}


def signed_statement(
    body: bytes = STATEMENT,
    *,
    secret: str = SECRET,
    ts: float | None = None,
    sent: bytes | None = None,
) -> httpx.Response:
    """The bank's statement answer: `body` signed, `sent` (default `body`) on the wire."""
    signer = wire.Signer.for_client(wire.parse_options(options(signing={"secret": secret})).signing)
    headers = wire.sign_statement(
        signer, [body[:10], body[10:]], timestamp=str(int(ts or time.time())), nonce="stmt"
    )
    return httpx.Response(200, content=body if sent is None else sent, headers=headers)


async def statement_of(
    answer: Callable[[], httpx.Response], **opts: Any
) -> tuple[list[StatementLine], ConnectorError | None]:
    """The lines the connector yielded, and the error that ended the download, if any."""
    got: list[StatementLine] = []
    f = funder(options(**opts)).model_copy(
        update={"statement": StatementConfig(**STATEMENT_MAPPING)}
    )
    async with httpx.AsyncClient(transport=httpx.MockTransport(lambda _r: answer())) as c:
        try:
            async for line in SignedJsonConnector(f, c).fetch_statement(dt.date(2026, 11, 25)):
                got.append(line)
        except ConnectorError as e:
            return got, e
    return got, None


@pytest.mark.asyncio
async def test_a_signed_statement_is_verified_then_read_with_the_generic_csv_mapping() -> None:
    lines, error = await statement_of(signed_statement)
    assert error is None
    assert [(x.order_no, x.bank_ref, x.amount, x.status) for x in lines] == [
        ("CF1-1", "B1", 1_000_001, "succeeded"),
        ("CF2-1", "B2", 1_000_002, "failed"),
    ]


UNSIGNED = lambda: httpx.Response(200, content=STATEMENT)  # noqa: E731
TAMPERED = lambda: signed_statement(sent=STATEMENT.replace(b"1000002", b"1000009"))  # noqa: E731


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("answer", "code"),
    [
        (UNSIGNED, "bad_signature"),
        (TAMPERED, "bad_signature"),
        (lambda: signed_statement(secret="someone-else"), "bad_signature"),
        (lambda: signed_statement(ts=time.time() - 3600), "stale"),
        # garbage that would fail parsing is refused for its signature first: never parsed
        (lambda: httpx.Response(200, content=b"\xff\xfe<html>not csv"), "bad_signature"),
    ],
    ids=["unsigned", "tampered", "wrong-key", "stale", "unsigned-garbage"],
)
async def test_an_unsigned_or_tampered_statement_is_refused_before_a_line_is_read(
    answer: Callable[[], httpx.Response], code: str
) -> None:
    with capture_logs() as logs:
        lines, error = await statement_of(answer)
    assert lines == []
    assert type(error) is ConnectorError
    assert error.code == code
    assert "statement not trusted" in error.message
    refused = [e for e in logs if e["event"] == "signed_json.statement_refused"]
    assert refused
    assert refused[0]["reason"] == code


@pytest.mark.asyncio
async def test_a_genuine_but_malformed_statement_is_a_malformed_statement_error() -> None:
    broken = STATEMENT.replace(b"2,2000003", b"3,2000003")  # the summary no longer adds up
    _, error = await statement_of(lambda: signed_statement(broken))
    assert error is not None
    assert error.code == "malformed_statement"
    assert "summary" in error.message


@pytest.mark.asyncio
async def test_statements_are_not_checked_when_responses_are_not_verified() -> None:
    signing = {"algorithm": "hmac-sha256", "secret": SECRET, "verify_responses": False}
    lines, error = await statement_of(UNSIGNED, signing=signing)
    assert (len(lines), error) == (2, None)


@pytest.mark.parametrize("algorithm", ["hmac-sha256", "rsa-sha256", "rsa-pss-sha256"])
def test_a_statement_signed_whole_verifies_as_it_streams_and_not_with_another_key(
    algorithm: str, keys: dict[str, str]
) -> None:
    signing = {
        "algorithm": algorithm,
        "secret": SECRET,
        "private_key": keys["ours"],
        "bank_public_key": keys["bank_pub"],
    }
    opts = wire.parse_options(options(signing=signing))
    bank = sj_bank.bank_signer(
        sj_bank.SignedJsonBankOptions(
            wire=opts, bank_private_key=keys["bank"], client_public_key=keys["our_pub"]
        )
    )
    client = wire.Signer.for_client(opts.signing)
    # the bank signs the whole message at once; we verify it chunk by chunk
    whole = bank.sign(wire.statement_prefix("100", "n") + STATEMENT)
    headers = {"X-Timestamp": "100", "X-Nonce": "n", "X-Signature": whole}
    check = wire.StatementCheck(client, headers, 100.0)
    for i in range(0, len(STATEMENT), 7):
        check.update(STATEMENT[i : i + 7])
    check.finish()
    # and a signature the bank streamed verifies as a whole
    streamed = wire.sign_statement(bank, [STATEMENT], timestamp="100", nonce="n")
    assert client.verify(wire.statement_prefix("100", "n") + STATEMENT, streamed["X-Signature"])
    # signed by anyone but the bank: refused
    impostor = client if algorithm != "hmac-sha256" else wire.Signer(
        opts.signing, own_key=b"other", peer_key=b"other"
    )  # fmt: skip
    forged = wire.sign_statement(impostor, [STATEMENT], timestamp="100", nonce="n")
    check = wire.StatementCheck(client, forged, 100.0)
    check.update(STATEMENT)
    with pytest.raises(wire.SignatureError):
        check.finish()


# --- mTLS ----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_mtls_options_give_the_connector_its_own_client_closed_by_aclose(
    tmp_path: Path,
) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fundgate")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "c.pem", tmp_path / "k.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    tls = {"client_cert": str(cert_path), "client_key": str(key_path), "ca_bundle": str(cert_path)}
    async with httpx.AsyncClient() as shared:
        connector = SignedJsonConnector(funder(options(tls=tls)), shared)
        own = connector._client
        assert own is not shared
        await connector.aclose()
        assert own.is_closed
        assert not shared.is_closed
