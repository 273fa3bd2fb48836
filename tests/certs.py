"""Certificates made at test time: a CA, a server certificate for 127.0.0.1/localhost and a
client certificate, all signed by the CA."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


@dataclass
class Certs:
    ca: bytes
    server_cert: bytes
    server_key: bytes
    client_cert: bytes
    client_key: bytes

    def write(self, directory: Path) -> dict[str, Path]:
        paths = {}
        for name in ("ca", "server_cert", "server_key", "client_cert", "client_key"):
            path = directory / f"{name}.pem"
            path.write_bytes(getattr(self, name))
            paths[name] = path
        return paths

    def ssl_config(self, path: Path, client_verify: bool = False) -> Path:
        """TFS's --ssl_config_file format: PEM texts inline in a text proto."""
        def quoted(pem: bytes) -> str:
            return '"' + pem.decode().replace("\n", "\\n") + '"'
        lines = [f"server_key: {quoted(self.server_key)}",
                 f"server_cert: {quoted(self.server_cert)}",
                 f"custom_ca: {quoted(self.ca)}",
                 f"client_verify: {'true' if client_verify else 'false'}"]
        path.write_text("\n".join(lines) + "\n")
        return path


def make_certs() -> Certs:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = _key()
    ca = (x509.CertificateBuilder().subject_name(_name("batchproxy test CA"))
          .issuer_name(_name("batchproxy test CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))

    def leaf(common_name: str, usage, san: list[x509.GeneralName] | None):
        key = _key()
        builder = (x509.CertificateBuilder().subject_name(_name(common_name))
                   .issuer_name(ca.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)

    server_cert, server_key = leaf(
        "localhost", ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client_cert, client_key = leaf("batchproxy test client", ExtendedKeyUsageOID.CLIENT_AUTH,
                                   None)
    return Certs(ca.public_bytes(serialization.Encoding.PEM), server_cert, server_key,
                 client_cert, client_key)
