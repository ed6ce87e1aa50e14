"""Throw-away PKI for tests: a CA, an agent server cert, client certs."""

import dataclasses
import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclasses.dataclass(frozen=True)
class PemPaths:
    ca: str
    cert: str
    key: str


def _name(common_name):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _builder(subject, issuer, public_key):
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


class Authority:
    def __init__(self, common_name):
        self.key = _key()
        self.name = _name(common_name)
        self.cert = (
            _builder(self.name, self.name, self.key.public_key())
            .add_extension(
                x509.BasicConstraints(ca=True, path_length=None),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )

    def issue(self, common_name, server=False):
        key = _key()
        builder = _builder(_name(common_name), self.name, key.public_key())
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName('localhost'),
                        x509.IPAddress(ipaddress.ip_address('127.0.0.1')),
                    ]
                ),
                critical=False,
            )
        return key, builder.sign(self.key, hashes.SHA256())


def _write(path, data):
    with open(path, 'wb') as out:
        out.write(data)
    return path


def _cert_pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key):
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_identity(directory, prefix, authority, common_name, server=False):
    """Write <prefix>-ca.pem, <prefix>.pem, <prefix>.key; return the paths."""
    key, cert = authority.issue(common_name, server=server)
    return PemPaths(
        ca=_write(
            os.path.join(directory, f'{prefix}-ca.pem'),
            _cert_pem(authority.cert),
        ),
        cert=_write(os.path.join(directory, f'{prefix}.pem'), _cert_pem(cert)),
        key=_write(os.path.join(directory, f'{prefix}.key'), _key_pem(key)),
    )


def write_test_pki(directory):
    """Server and client identities of one CA, plus a stranger's client."""
    authority = Authority('dmclone test CA')
    stranger = Authority('some other CA')
    return {
        'server': write_identity(
            directory, 'server', authority, 'agent', server=True
        ),
        'client': write_identity(directory, 'client', authority, 'cinder'),
        'stranger': write_identity(
            directory, 'stranger', stranger, 'intruder'
        ),
    }
