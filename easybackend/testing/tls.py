"""
TLS for tests: a self-signed certificate made at run time, and clients
that trust it (and nothing else).
"""

from __future__ import annotations

import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

__all__ = ["self_signed", "client_tls", "TrustingPolicy", "server_endpoint"]


def self_signed(directory: str, hostname: str = "localhost") -> tuple[str, str]:
    """
    Write a fresh self-signed certificate for C{hostname} (and 127.0.0.1)
    and its private key into C{directory} (made if missing), both PEM.

    @return: the certificate's path and the key's path.
    """
    os.makedirs(directory, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([
                x509.DNSName(hostname),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            ]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = os.path.join(directory, "cert.pem")
    key_path = os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ))
    return cert_path, key_path


def client_tls(cert_path: str, hostname: str = "localhost") -> IOpenSSLClientConnectionCreator:
    """
    Client TLS options that trust only the certificate at C{cert_path} and
    check that it names C{hostname}: for C{wrapClientTLS}, C{connectSSL}.
    """
    with open(cert_path, "rb") as f:
        trusted = Certificate.loadPEM(f.read())
    return optionsForClientTLS(hostname, trustRoot=trusted)


@implementer(IPolicyForHTTPS)
class TrustingPolicy:
    """
    An HTTPS policy for C{twisted.web.client.Agent} (and so treq) trusting
    only the certificate at C{cert_path}, whatever host it is reached by.

    @param hostname: the name the certificate must carry.
    """

    def __init__(self, cert_path: str, hostname: str = "localhost") -> None:
        self._options = client_tls(cert_path, hostname)

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        return self._options


def server_endpoint(cert_path: str, key_path: str, interface: str = "127.0.0.1") -> str:
    """An C{ssl:} endpoint string on a free port of C{interface}."""

    def quoted(path: str) -> str:
        return path.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")

    return (f"ssl:0:interface={interface}:privateKey={quoted(key_path)}"
            f":certKey={quoted(cert_path)}")
