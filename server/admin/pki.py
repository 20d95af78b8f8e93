"""The project's certificate authority and the certificates it signs, with ``cryptography``.

Pure functions from names to PEM bytes (no files): a CA, a server certificate for the hosts
clients dial (DNS names and IP addresses as subject alternative names), and one client
certificate per data holder (its name as common name) for mutual TLS. Keys are ECDSA P-256:
small, fast to make, and accepted by gRPC's TLS stack on both sides.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_BACKDATE = datetime.timedelta(minutes=5)  # tolerate clocks a little behind the CA's


@dataclass(frozen=True)
class KeyPair:
    """A certificate and its private key, both PEM."""

    cert_pem: bytes
    key_pem: bytes


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _name(common_name: str, project: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, project),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: x509.Name, issuer: x509.Name, public_key, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE).not_valid_after(now + datetime.timedelta(days=days)))


def make_ca(project: str, days: int) -> KeyPair:
    """A self-signed CA that may sign end-entity certificates only (path length 0)."""
    key = _new_key()
    name = _name(f"{project} flora CA", project)
    cert = (_builder(name, name, key.public_key(), days)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _alt_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return x509.DNSName(host)


def _sign(ca: KeyPair, common_name: str, project: str, days: int, usages: list[x509.ObjectIdentifier],
          hosts: list[str] | None = None) -> KeyPair:
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    key = _new_key()
    builder = (_builder(_name(common_name, project), ca_cert.subject, key.public_key(), days)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName([_alt_name(h) for h in hosts]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def server_cert(ca: KeyPair, project: str, hosts: list[str], days: int) -> KeyPair:
    """The server's certificate, valid for every host name or address clients may dial.

    It may also authenticate as a TLS client, so that probes on the server's own host (the
    container health check) pass mutual TLS with the server's kit alone.
    """
    return _sign(ca, hosts[0], project, days, [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], hosts)


def client_cert(ca: KeyPair, project: str, name: str, days: int) -> KeyPair:
    """A data holder's (or the operator's) certificate for mutual TLS; its common name is ``name``."""
    return _sign(ca, name, project, days, [ExtendedKeyUsageOID.CLIENT_AUTH])


def common_name(cert_pem: bytes) -> str:
    """The common name of a PEM certificate (a client certificate's client name)."""
    attributes = x509.load_pem_x509_certificate(cert_pem).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attributes[0].value) if attributes else ""
