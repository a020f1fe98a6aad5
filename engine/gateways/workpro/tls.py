"""How the channel to the puppet is secured (pure): plaintext, as WorkPro serves it, or TLS, as juzi's open-source
`PuppetServer` serves by default (npm @juzi/wechaty-puppet-service: `tls.disable` / the environment's
`WECHATY_PUPPET_SERVICE_NO_TLS_INSECURE_SERVER` turn it off).

With TLS, juzi's client (`src/client/grpc-manager.ts` initClient) checks the server's certificate against the
Wechaty community root CA (`src/auth/ca.ts`, below) for the name `grpc.ssl_target_name_override` = the token's
SNI: the part before its last `_`, lower-cased (npm wechaty-token: `puppet_workpro_xxx` → `puppet_workpro`).
The certificate juzi's server uses when given none is for `insecure` (`TLS_INSECURE_SERVER_CERT_COMMON_NAME`),
so a client of such a server sets that name (`workpro.tls_server_name: insecure`).

`connect_hint` turns the transport's words for a mismatch (plaintext against TLS, TLS against plaintext, a
certificate for another name or from another CA) into the setting that fixes it.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from engine.errors import PermanentError
from engine.i18n import tr

# The Wechaty community root CA, CN=wechaty-root-ca, valid 2021-08-09 to 2031-08-07 (public: juzi's client
# embeds it as TLS_CA_CERT, src/auth/ca.ts).
WECHATY_ROOT_CA = b"""-----BEGIN CERTIFICATE-----
MIIFxTCCA62gAwIBAgIUYddLAoa8JnLzJ80l2u5vGuFsaEIwDQYJKoZIhvcNAQEL
BQAwcjELMAkGA1UEBhMCVVMxFjAUBgNVBAgMDVNhbiBGcmFuY2lzY28xEjAQBgNV
BAcMCVBhbG8gQWx0bzEQMA4GA1UECgwHV2VjaGF0eTELMAkGA1UECwwCQ0ExGDAW
BgNVBAMMD3dlY2hhdHktcm9vdC1jYTAeFw0yMTA4MDkxNTQ4NTJaFw0zMTA4MDcx
NTQ4NTJaMHIxCzAJBgNVBAYTAlVTMRYwFAYDVQQIDA1TYW4gRnJhbmNpc2NvMRIw
EAYDVQQHDAlQYWxvIEFsdG8xEDAOBgNVBAoMB1dlY2hhdHkxCzAJBgNVBAsMAkNB
MRgwFgYDVQQDDA93ZWNoYXR5LXJvb3QtY2EwggIiMA0GCSqGSIb3DQEBAQUAA4IC
DwAwggIKAoICAQDulLjOZhzQ58TSQ7TfWNYgdtWhlc+5L9MnKb1nznVRhzAkZo3Q
rPLRW/HDjlv2OEbt4nFLaQgaMmc1oJTUVGDBDlrzesI/lJh7z4eA/B0z8eW7f6Cw
/TGc8lgzHvq7UIE507QYPhvfSejfW4Prw+90HJnuodriPdMGS0n9AR37JPdQm6sD
iMFeEvhHmM2SXRo/o7bll8UDZi81DoFu0XuTCx0esfCX1W5QWEmAJ5oAdjWxJ23C
lxI1+EjwBQKXGqp147VP9+pwpYW5Xxpy870kctPBHKjCAti8Bfo+Y6dyWz2UAd4w
4BFRD+18C/TgX+ECl1s9fsHMY15JitcSGgAIz8gQX1OelECaTMRTQfNaSnNW4LdS
sXMQEI9WxAU/W47GCQFmwcJeZvimqDF1QtflHSaARD3O8tlbduYqTR81LJ63bPoy
9e1pdB6w2bVOTlHunE0YaGSJERALVc1xz40QpPGcZ52mNCb3PBg462RQc77yv/QB
x/P2RC1y0zDUF2tP9J29gTatWq6+D4MhfEk2flZNyzAgJbDuT6KAIJGzOB1ZJ/MG
o1gS13eTuZYw24LElrhd1PrR6OHK+lkyYzqUPYMulUg4HzaZIDclfHKwAC4lecKm
zC5q9jJB4m4SKMKdzxvpIOfdahoqsZMg34l4AavWRqPTpwEU0C0dboNA/QIDAQAB
o1MwUTAdBgNVHQ4EFgQU0rey3QPklTOgdhMJ9VIA6KbZ5bAwHwYDVR0jBBgwFoAU
0rey3QPklTOgdhMJ9VIA6KbZ5bAwDwYDVR0TAQH/BAUwAwEB/zANBgkqhkiG9w0B
AQsFAAOCAgEAx2uyShx9kLoB1AJ8x7Vf95v6PX95L/4JkJ1WwzJ9Dlf3BcCI7VH7
Fp1dnQ6Ig7mFqSBDBAUUBWAptAnuqIDcgehI6XAEKxW8ZZRxD877pUNwZ/45tSC4
b5U5y9uaiNK7oC3LlDCsB0291b3KSOtevMeDFoh12LcliXAkdIGGTccUxrH+Cyij
cBOc+EKGJFBdLqcjLDU4M6QdMMMFOdfXyAOSpYuWGYqrxqvxQjAjvianEyMpNZWM
lajggJqiPhfF67sZTB2yzvRTmtHdUq7x+iNOVonOBcCHu31aGxa9Py91XEr9jaIQ
EBdl6sycLxKo8mxF/5tyUOns9+919aWNqTOUBmI15D68bqhhOVNyvsb7aVURIt5y
6A7Sj4gSBR9P22Ba6iFZgbvfLn0zKLzjlBonUGlSPf3rSIYUkawICtDyYPvK5mi3
mANgIChMiOw6LYCPmmUVVAWU/tDy36kr9ZV9YTIZRYAkWswsJB340whjuzvZUVaG
DgW45GPR6bGIwlFZeqCwXLput8Z3C8Sw9bE9vjlB2ZCpjPLmWV/WbDlH3J3uDjgt
9PoALW0sOPhHfYklH4/rrmsSWMYTUuGS/HqxrEER1vpIOOb0hIiAWENDT/mruq22
VqO8MHX9ebjInSxPmhYOlrSZrOgEcogyMB4Z0SOtKVqPnkWmdR5hatU=
-----END CERTIFICATE-----
"""
INSECURE_SERVER_NAME = "insecure"  # the name on the certificate juzi's server uses when given none


def token_sni(token: str) -> str:
    """The server name juzi's client expects for `token`: its part before the last `_`, lower-cased ('' if none)."""
    index = token.rfind("_")
    return token[:index].lower() if index > 0 else ""


def server_name(token: str, configured: str | None) -> str:
    """The name the server's certificate must be for: `workpro.tls_server_name`, else the token's SNI."""
    name = configured or token_sni(token)
    if not name:
        raise PermanentError(
            tr(
                "workpro.tls needs a server name: the token has no `prefix_` to take it from (juzi's client needs "
                "one too); set workpro.tls_server_name to the name on the puppet's certificate"
            )
        )
    return name


def root_certificates(ca_file: Path | None) -> bytes:
    """The CA certificates (PEM) the server's certificate is checked against: `workpro.tls_ca_cert`'s, else the
    Wechaty community root CA."""
    if ca_file is None:
        return WECHATY_ROOT_CA
    try:
        data = ca_file.read_bytes()
    except OSError as exc:
        raise PermanentError(
            tr("cannot read workpro.tls_ca_cert {path}: {reason}", path=ca_file, reason=exc.strerror or exc)
        ) from None
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise PermanentError(
            tr("workpro.tls_ca_cert {path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)", path=ca_file)
        )
    return data


def channel_credentials(ca_file: Path | None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=root_certificates(ca_file))


def connect_hint(details: str | None, *, tls: bool, name: str = "") -> str:
    """What to change when a connection failed the way a TLS mismatch fails ('' for any other failure)."""
    text = (details or "").lower()
    if not tls:
        # A TLS server drops a plaintext HTTP/2 preface: gRPC's client sees the socket closed while connecting.
        if "failed to connect" in text and "socket closed" in text:
            return (
                "if the puppet serves TLS (juzi's open-source PuppetServer does unless its TLS is disabled; "
                "WorkPro does not), set workpro.tls: true"
            )
        return ""
    if "hostname verification" in text:
        return (
            f"the puppet's certificate is not for {name!r}: set workpro.tls_server_name to the name on it "
            f"(the certificate juzi's server uses when given none is for {INSECURE_SERVER_NAME!r})"
        )
    if "wrong_version_number" in text or "packet_length_too_long" in text or "http_request" in text:
        return "the puppet answers without TLS (as WorkPro does): set workpro.tls: false"
    if "certificate verify failed" in text or "unable to get local issuer" in text or "self signed" in text:
        return (
            "the puppet's certificate is not signed by a CA wecast trusts: set workpro.tls_ca_cert to the PEM "
            "file of the CA that signed it"
        )
    if "handshake failed" in text:
        return "the TLS handshake with the puppet failed: check workpro.tls, tls_server_name and tls_ca_cert"
    return ""
