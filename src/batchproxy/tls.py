"""TLS settings: TFS's --ssl_config_file for the serving ports, and (mutual) TLS towards
replicas."""

from __future__ import annotations

import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf import text_format

from batchproxy.protos import ssl_config_pb2


@dataclass(frozen=True)
class ServerTLS:
    key: bytes
    cert: bytes
    ca: bytes | None  # clients' CA, when client certificates are checked
    client_verify: bool

    @classmethod
    def from_tfs_file(cls, path: str | Path) -> ServerTLS:
        """Parse TFS's text-format SSLConfig (server_key, server_cert, custom_ca,
        client_verify), whose values are the PEM texts themselves."""
        config = ssl_config_pb2.SSLConfig()
        try:
            text_format.Parse(Path(path).read_text(), config)
        except text_format.ParseError as err:
            raise ValueError(f"{path}: not a valid SSLConfig text proto: {err}") from None
        if not config.server_key or not config.server_cert:
            raise ValueError(f"{path}: server_key and server_cert are required")
        if config.client_verify and not config.custom_ca:
            raise ValueError(f"{path}: client_verify needs custom_ca to check clients against")
        return cls(config.server_key.encode(), config.server_cert.encode(),
                   config.custom_ca.encode() or None, config.client_verify)

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca,
            require_client_auth=self.client_verify)

    def ssl_context(self) -> ssl.SSLContext:
        """The same key and certificate for the REST port."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        # ssl wants files; the PEM texts live only in a private temporary directory.
        with tempfile.TemporaryDirectory() as directory:
            cert, key = Path(directory) / "cert.pem", Path(directory) / "key.pem"
            cert.write_bytes(self.cert)
            key.write_bytes(self.key)
            context.load_cert_chain(cert, key)
        if self.ca:
            context.load_verify_locations(cadata=self.ca.decode())
        if self.client_verify:
            context.verify_mode = ssl.CERT_REQUIRED
        return context


def replica_credentials(ca: str | None, cert: str | None, key: str | None,
                        ) -> grpc.ChannelCredentials | None:
    """TLS to replicas when --replica_ca is given; mutual TLS with --replica_cert/key too."""
    if not ca and not cert and not key:
        return None
    if bool(cert) != bool(key):
        raise ValueError("--replica_cert and --replica_key go together")
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes() if ca else None,
        private_key=Path(key).read_bytes() if key else None,
        certificate_chain=Path(cert).read_bytes() if cert else None)
