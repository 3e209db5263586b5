"""TLS and mutual TLS credentials for servers and for the channels that call them.

Files are PEM. Each is checked when read (a certificate that does not parse, a key that does
not belong to its certificate), so that a mistake is one line naming the file at start-up
rather than a failed handshake later. Private keys are read into memory and handed to gRPC,
never logged.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc


class TlsFileError(ValueError):
    """A certificate, key or CA file that cannot be used; the message names the file."""


def read_file(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TlsFileError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise TlsFileError(f"{what} {path} is not PEM (no -----BEGIN line)")
    return data


def check_cert_and_key(cert_file: str, key_file: str) -> None:
    """The key belongs to the certificate (both readable PEM)."""
    read_file(cert_file, "certificate")
    read_file(key_file, "private key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        raise TlsFileError(
            f"certificate {cert_file} and key {key_file} do not go together ({exc.reason})"
        ) from None


def check_ca(ca_file: str) -> None:
    read_file(ca_file, "CA certificate")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=ca_file)
    except ssl.SSLError as exc:
        raise TlsFileError(f"CA certificate {ca_file} does not parse ({exc.reason})") from None


@dataclass(frozen=True)
class ServerTls:
    """A server's certificate and key; with `client_ca_file`, clients must present a
    certificate signed by that CA (mutual TLS), or the handshake fails."""

    cert_file: str
    key_file: str
    client_ca_file: str = ""

    def check(self) -> None:
        check_cert_and_key(self.cert_file, self.key_file)
        if self.client_ca_file:
            check_ca(self.client_ca_file)

    def credentials(self) -> grpc.ServerCredentials:
        self.check()
        pair = (read_file(self.key_file, "private key"), read_file(self.cert_file, "certificate"))
        client_ca = None
        if self.client_ca_file:
            client_ca = read_file(self.client_ca_file, "CA certificate")
        return grpc.ssl_server_credentials(
            [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
        )


@dataclass(frozen=True)
class ClientTls:
    """How a caller verifies a server (`ca_file`; empty = the system's roots) and, for
    mutual TLS, the certificate it presents (`cert_file` and `key_file`, both or neither)."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    def check(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise TlsFileError("a client certificate needs its key, and a key its certificate")
        if self.ca_file:
            check_ca(self.ca_file)
        if self.cert_file:
            check_cert_and_key(self.cert_file, self.key_file)

    def credentials(self) -> grpc.ChannelCredentials:
        self.check()
        return grpc.ssl_channel_credentials(
            root_certificates=read_file(self.ca_file, "CA certificate") if self.ca_file else None,
            private_key=read_file(self.key_file, "private key") if self.key_file else None,
            certificate_chain=read_file(self.cert_file, "certificate") if self.cert_file else None,
        )
