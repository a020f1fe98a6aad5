"""The workpro gateway over TLS, as juzi's open-source PuppetServer serves by default, against the fake puppet
serving TLS on loopback: the certificate checked against the CA for the token's SNI (or the configured name), and
each kind of mismatch answered with the setting that fixes it."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import SecretStr

from engine.errors import PermanentError, TransientError
from engine.gateways.fake_puppet import SELF_ID, FakePuppet
from engine.gateways.workpro import WorkproGateway
from engine.gateways.workpro.tls import WECHATY_ROOT_CA, token_sni
from engine.i18n import Language, use_language
from engine.settings import WorkproSettings, load_settings

pytestmark = pytest.mark.anyio

TOKEN = "puppet_workpro_7c1e0d2b9a8f4e3d"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(tmp_path: Path, label: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(f"{label}-root-ca"))
        .issuer_name(_name(f"{label}-root-ca"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / f"{label}-ca.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, path


def server_pair(ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, name: str) -> tuple[bytes, bytes]:
    """(private key, certificate) PEM for `name`, signed by the CA; the name as CN only (no SAN), like juzi's
    built-in server certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture
async def fakes() -> AsyncIterator[list[FakePuppet]]:
    made: list[FakePuppet] = []
    yield made
    for fake in made:
        await fake.stop()


@pytest.fixture
async def gateways() -> AsyncIterator[list[WorkproGateway]]:
    made: list[WorkproGateway] = []
    yield made
    for gateway in made:
        await gateway.close()


async def serve(fakes: list[FakePuppet], tls: tuple[bytes, bytes] | None) -> FakePuppet:
    fake = FakePuppet(token=TOKEN, contacts=5, tls=tls, auto_scan_after=0.05)
    await fake.start()
    fakes.append(fake)
    return fake


async def connect(gateways: list[WorkproGateway], fake: FakePuppet, **settings: Any) -> WorkproGateway:
    values: dict[str, Any] = {"token": SecretStr(TOKEN), "endpoint": fake.endpoint, "call_timeout": "5s"}
    gateway = WorkproGateway(WorkproSettings.model_validate({**values, **settings}))
    gateways.append(gateway)
    await gateway.start()
    return gateway


def test_the_server_name_is_the_tokens_prefix() -> None:
    """As npm wechaty-token: the part before the last `_`, lower-cased; none without a `prefix_`."""
    assert token_sni("puppet_workpro_7c1e0d2b") == "puppet_workpro"
    assert token_sni("Puppet_PadLocal_X_1") == "puppet_padlocal_x"
    assert token_sni("insecure_abc") == "insecure"
    assert token_sni("0123456789abcdef") == "" and token_sni("_abc") == ""


def test_the_default_ca_is_the_wechaty_community_root() -> None:
    """With no tls_ca_cert, a server certificate is checked against the CA juzi's client embeds."""
    ca = x509.load_pem_x509_certificate(WECHATY_ROOT_CA)
    assert ca.subject.rfc4514_string() == "CN=wechaty-root-ca,OU=CA,O=Wechaty,L=Palo Alto,ST=San Francisco,C=US"
    assert ca.not_valid_after_utc.year == 2031


async def test_login_and_send_over_tls_for_the_tokens_name(
    tmp_path: Path, fakes: list[FakePuppet], gateways: list[WorkproGateway]
) -> None:
    """workpro.tls with the CA that signed a certificate for the token's prefix: QR, code, login, sync, send."""
    ca_key, ca, ca_file = make_ca(tmp_path, "test")
    fake = await serve(fakes, server_pair(ca_key, ca, "puppet_workpro"))
    gateway = await connect(gateways, fake, tls=True, tls_ca_cert=ca_file)
    status = await gateway.start_login()
    assert status.qrcode_key == fake.qr_key
    code = None
    while code is None:
        code = fake.phone_code()
        await gateway.wait_for_login(0.05)
    status = await gateway.submit_verify_code(code)
    assert status.logged_in and status.account_id == SELF_ID
    page = await gateway.list_contacts()
    assert len(page.contacts) == 5
    await gateway.send_text(page.contacts[0].id, "你好", idempotency_key="k")
    assert [s.text for s in fake.sends] == ["你好"]


async def test_a_certificate_for_another_name_needs_tls_server_name(
    tmp_path: Path, fakes: list[FakePuppet], gateways: list[WorkproGateway]
) -> None:
    """juzi's server, given no certificate, uses one for `insecure`: the token's prefix does not match it, and the
    error names workpro.tls_server_name; with it set, the same server connects."""
    ca_key, ca, ca_file = make_ca(tmp_path, "test")
    fake = await serve(fakes, server_pair(ca_key, ca, "insecure"))
    with pytest.raises(TransientError, match=r"not for 'puppet_workpro': set workpro.tls_server_name"):
        await connect(gateways, fake, tls=True, tls_ca_cert=ca_file)
    gateway = await connect(gateways, fake, tls=True, tls_ca_cert=ca_file, tls_server_name="insecure")
    assert (await gateway.start_login()).qrcode_key == fake.qr_key


async def test_mismatches_name_the_setting_that_fixes_them(
    tmp_path: Path, fakes: list[FakePuppet], gateways: list[WorkproGateway]
) -> None:
    """Plaintext against a TLS server, TLS against a plaintext one (WorkPro's), and a certificate from a CA wecast
    does not trust (the default is Wechaty's root): each a TransientError naming what to set."""
    ca_key, ca, ca_file = make_ca(tmp_path, "test")
    tls_fake = await serve(fakes, server_pair(ca_key, ca, "puppet_workpro"))
    plain_fake = await serve(fakes, None)
    errors = []
    with pytest.raises(TransientError, match=r"set workpro.tls: true") as caught:
        await connect(gateways, tls_fake)
    errors.append(str(caught.value))
    with pytest.raises(TransientError, match=r"answers without TLS .*: set workpro.tls: false") as caught:
        await connect(gateways, plain_fake, tls=True, tls_ca_cert=ca_file)
    errors.append(str(caught.value))
    with pytest.raises(TransientError, match=r"set workpro.tls_ca_cert") as caught:
        await connect(gateways, tls_fake, tls=True)
    errors.append(str(caught.value))
    assert tls_fake.calls == [] and plain_fake.calls == []  # nothing reached either server's service
    assert not [e for e in errors if TOKEN in e]


async def test_bad_tls_settings_are_permanent(
    tmp_path: Path, fakes: list[FakePuppet], gateways: list[WorkproGateway]
) -> None:
    """A CA file that is missing or holds no certificate, and a token without a prefix to name the server: clear
    PermanentErrors before any connection."""
    fake = await serve(fakes, None)
    with pytest.raises(PermanentError, match=r"cannot read workpro.tls_ca_cert"):
        await connect(gateways, fake, tls=True, tls_ca_cert=tmp_path / "missing.pem")
    (tmp_path / "not.pem").write_text("hello")
    with pytest.raises(PermanentError, match=r"holds no PEM certificate"):
        await connect(gateways, fake, tls=True, tls_ca_cert=tmp_path / "not.pem")
    settings = WorkproSettings.model_validate({"token": "0123456789abcdef", "endpoint": fake.endpoint, "tls": True})
    gateway = WorkproGateway(settings)
    gateways.append(gateway)
    with pytest.raises(PermanentError, match=r"set workpro.tls_server_name"):
        await gateway.start()
    with use_language(Language.ZH), pytest.raises(PermanentError) as in_chinese:
        await connect(gateways, fake, tls=True, tls_ca_cert=tmp_path / "not.pem")
    assert (
        str(in_chinese.value)
        == f"workpro.tls_ca_cert {tmp_path / 'not.pem'} 里没有 PEM 证书（-----BEGIN CERTIFICATE-----）"
    )


def test_a_relative_ca_file_is_relative_to_the_config(tmp_path: Path) -> None:
    """Like every path in config.yaml, workpro.tls_ca_cert is relative to the config file's folder."""
    (tmp_path / "conf").mkdir()
    config = tmp_path / "conf" / "config.yaml"
    config.write_text("version: 1\nworkpro:\n  tls: true\n  tls_ca_cert: certs/ca.pem\n", encoding="utf-8")
    settings = load_settings(config)
    assert settings.workpro.tls and settings.workpro.tls_ca_cert == (tmp_path / "conf" / "certs" / "ca.pem").resolve()
