"""Security settings every service shares, as dataclass bases of the services' configs (so
they are flags and MANYLORA_* variables like every other setting): bearer-token auth, TLS and
mutual TLS of the server, and for services that call others, how they call.

All off by default: no key file means no authentication, no certificate means plaintext.
Settings hold file paths only; keys, certificates and tokens are read from those files when
the service starts, so `repr` of a config shows no secret.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from services.common.channels import (
    ChannelSecurity,
    MintedServiceToken,
    TokenSource,
    token_from_file,
)
from services.common.config import ConfigError
from services.common.tls import (
    ClientTls,
    ServerTls,
    TlsFileError,
    check_ca,
    check_cert_and_key,
    read_file,
)
from services.common.tokens import SigningKeys


@dataclass(frozen=True)
class ServerSecurityConfig:
    auth_key_file: str = field(
        default="",
        metadata={
            "help": "file of token signing keys, one a line (python -m services.common.token_cli "
            "new-key); given, every call but health checks needs 'authorization: Bearer TOKEN' "
            "with a scope its method accepts; empty = no authentication"
        },
    )
    tls_cert_file: str = field(
        default="",
        metadata={
            "help": "PEM certificate (chain) this service presents, as a server and, with "
            "--tls-ca-file, as a client of the services it calls; empty = plaintext"
        },
    )
    tls_key_file: str = field(default="", metadata={"help": "PEM private key of --tls-cert-file"})
    tls_client_ca_file: str = field(
        default="",
        metadata={
            "help": "PEM CA that signs clients' certificates; given = mutual TLS: a client "
            "without such a certificate is refused at the handshake"
        },
    )

    def check_security(self) -> None:
        """Files that are missing, unreadable or do not go together: `ConfigError` naming
        the flag."""
        check_tls_pair(self.tls_cert_file, self.tls_key_file)
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ConfigError(
                "tls_client_ca_file", "mutual TLS needs --tls-cert-file and --tls-key-file too"
            )
        if self.tls_client_ca_file:
            check_tls_setting("tls_client_ca_file", lambda: check_ca(self.tls_client_ca_file))
        self.signing_keys()

    def signing_keys(self) -> SigningKeys | None:
        if not self.auth_key_file:
            return None
        try:
            return SigningKeys.from_file(self.auth_key_file)
        except OSError as exc:
            raise ConfigError(
                "auth_key_file", f"cannot read {self.auth_key_file}: {exc.strerror or exc}"
            ) from None
        except ValueError as exc:
            raise ConfigError("auth_key_file", f"{self.auth_key_file}: {exc}") from None

    def server_tls(self) -> ServerTls | None:
        if not self.tls_cert_file:
            return None
        return ServerTls(self.tls_cert_file, self.tls_key_file, self.tls_client_ca_file)


@dataclass(frozen=True)
class CallerSecurityConfig(ServerSecurityConfig):
    """A service that calls others (the router calls workers and the store, a worker the
    store): how it verifies them and the token it sends."""

    tls_ca_file: str = field(
        default="",
        metadata={
            "help": "PEM CA that signs the certificates of the services this one calls; given "
            "= those calls use TLS (presenting --tls-cert-file when set); empty = plaintext"
        },
    )
    service_token_file: str = field(
        default="",
        metadata={
            "help": "file holding the bearer token (scope service) sent on calls to other "
            "services; empty = one minted from --auth-key-file, or none without a key"
        },
    )

    def check_security(self) -> None:
        super().check_security()
        if self.tls_ca_file:
            check_tls_setting("tls_ca_file", lambda: check_ca(self.tls_ca_file))
        self.outbound_token("check")

    def outbound_token(self, subject: str) -> TokenSource | None:
        if self.service_token_file:
            try:
                return token_from_file(self.service_token_file)
            except OSError as exc:
                raise ConfigError(
                    "service_token_file", f"cannot read {self.service_token_file}: {exc.strerror}"
                ) from None
            except ValueError as exc:
                raise ConfigError(
                    "service_token_file", f"{self.service_token_file}: {exc}"
                ) from None
        keys = self.signing_keys()
        return None if keys is None else MintedServiceToken(keys, subject)

    def channel_security(self, subject: str) -> ChannelSecurity:
        """What this service's calls to others use; `subject` names it in their logs."""
        tls = None
        if self.tls_ca_file:
            tls = ClientTls(self.tls_ca_file, self.tls_cert_file, self.tls_key_file)
        return ChannelSecurity(tls, self.outbound_token(subject))


def check_tls_pair(cert_file: str, key_file: str) -> None:
    """--tls-cert-file and --tls-key-file: both or neither, readable PEM, and a key that
    matches its certificate; `ConfigError` naming the flag."""
    if bool(cert_file) != bool(key_file):
        missing = "tls_key_file" if cert_file else "tls_cert_file"
        raise ConfigError(missing, "TLS needs both --tls-cert-file and --tls-key-file")
    if not cert_file:
        return
    check_tls_setting("tls_cert_file", lambda: read_file(cert_file, "certificate"))
    check_tls_setting("tls_key_file", lambda: read_file(key_file, "private key"))
    check_tls_setting("tls_key_file", lambda: check_cert_and_key(cert_file, key_file))


def check_tls_setting(field_name: str, check: Callable[[], object]) -> None:
    """Run `check`; a `TlsFileError` becomes a `ConfigError` naming `field_name`'s flag."""
    try:
        check()
    except TlsFileError as exc:
        raise ConfigError(field_name, str(exc)) from None
