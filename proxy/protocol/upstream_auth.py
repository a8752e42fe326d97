"""Upstream authentication, sans I/O: the proxy's answers to the server's Authentication* requests.

Cleartext password, md5 and SCRAM-SHA-256 (RFC 5802 / RFC 7677, through the `scramp` library, with
SASLprep), and SCRAM-SHA-256-PLUS with `tls-server-end-point` channel binding (RFC 5929 section 4)
when TLS is on. `channel_binding` and `require_auth` mean what they mean in libpq ("Database
Connection Control Functions: Parameter Key Words"): AuthenticationOk is accepted only once a method
the configuration allows has completed, so a server (or anyone in the path) cannot skip proving that it
knows the password, e.g. by answering the SCRAM client-final with AuthenticationOk.

Source: Postgres documentation, "Message Flow: Start-up" and "SASL Authentication".
"""

from __future__ import annotations

import enum
import hashlib

import scramp
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from proxy.protocol import errors, messages

SCRAM = "SCRAM-SHA-256"
SCRAM_PLUS = "SCRAM-SHA-256-PLUS"
CHANNEL_BINDING_TYPE = "tls-server-end-point"
# Authentication request codes the proxy does not implement, by the require_auth name of their method.
_UNSUPPORTED = {7: "gss", 8: "gss", 9: "sspi"}


class UpstreamAuthError(Exception):
    """Authentication with the upstream server cannot go on. `sqlstate`: 28000 (a method the
    configuration forbids, or a server that cannot prove it knows the password), 28P01 (no usable
    password), 08P01 (requests out of order), 0A000 (a method the proxy does not implement)."""

    def __init__(self, sqlstate: str, text: str) -> None:
        super().__init__(text)
        self.sqlstate = sqlstate


class AuthState(enum.Enum):
    """Where the exchange stands; AuthenticationOk is accepted in NOTHING_ASKED (if `none` is allowed),
    PASSWORD_SENT and SASL_VERIFIED only."""

    NOTHING_ASKED = "no authentication requested yet"
    PASSWORD_SENT = "password sent"
    SASL_FIRST_SENT = "SCRAM client-first sent"
    SASL_FINAL_SENT = "SCRAM client-final sent"
    SASL_VERIFIED = "SCRAM server signature verified"
    DONE = "authenticated"


def tls_server_end_point(certificate_der: bytes) -> bytes | None:
    """Channel-binding data for `tls-server-end-point`: the hash of the server's certificate with its
    signature's hash function, SHA-256 for MD5 and SHA-1 (RFC 5929 section 4.1); None when the
    signature has no hash function (Ed25519), as then no binding is defined."""
    algorithm = x509.load_der_x509_certificate(certificate_der).signature_hash_algorithm
    if algorithm is None:
        return None
    if isinstance(algorithm, (hashes.MD5, hashes.SHA1)):
        algorithm = hashes.SHA256()
    return hashlib.new(algorithm.name, certificate_der).digest()


def allowed_methods(require_auth: str | None) -> set[str]:
    """The methods `require_auth` allows (libpq's syntax: a comma list, or a comma list of `!method`)."""
    every = {"password", "md5", "gss", "sspi", "scram-sha-256", "none"}
    if require_auth is None:
        return every
    methods = {item.strip() for item in require_auth.split(",")}
    if all(method.startswith("!") for method in methods):
        return every - {method[1:] for method in methods}
    return methods


class UpstreamAuth:
    """One authentication exchange, fed the server's Authentication* requests in order.

    `channel_binding_data` is `tls_server_end_point()` of the server's certificate, or None without TLS;
    `channel_binding` is "disable", "prefer" or "require"; `require_auth` is libpq's list or None.
    """

    def __init__(self, user: str, password: str | None, channel_binding_data: bytes | None,
                 require_auth: str | None = None, channel_binding: str = "prefer") -> None:
        self._user = user
        self._password = password
        self._binding_data = channel_binding_data if channel_binding != "disable" else None
        self._channel_binding = channel_binding
        self._require_auth = require_auth
        self._allowed = allowed_methods(require_auth)
        self._scram: scramp.ScramClient | None = None
        self.state = AuthState.NOTHING_ASKED
        self.mechanism: str | None = None

    def respond(self, code: int, data: bytes) -> bytes | None:
        """The message to send for one AuthenticationRequest (`code`, and the bytes after it), or None
        when there is nothing to send; for AuthenticationOk (code 0) see `finish`. Raises
        UpstreamAuthError."""
        if code == messages.AUTH_OK:
            self.finish()
            return None
        if code in (messages.AUTH_CLEARTEXT_PASSWORD, messages.AUTH_MD5_PASSWORD):
            return self._password_message(code, data)
        if code == messages.AUTH_SASL:
            return self._sasl_initial(data)
        if code == messages.AUTH_SASL_CONTINUE:
            return self._sasl_continue(data)
        if code == messages.AUTH_SASL_FINAL:
            self._sasl_final(data)
            return None
        if code in _UNSUPPORTED:
            self._check_allowed(_UNSUPPORTED[code], f"requested {_UNSUPPORTED[code]} authentication")
        raise UpstreamAuthError(errors.FEATURE_NOT_SUPPORTED, f"upstream authentication method {code} is not supported")

    def finish(self) -> None:
        """AuthenticationOk arrived: accept it only when an allowed method has completed."""
        if self.state is AuthState.NOTHING_ASKED:
            self._check_allowed("none", "did not ask for authentication")
            self._check_binding_used()
        elif self.state in (AuthState.SASL_FIRST_SENT, AuthState.SASL_FINAL_SENT):
            raise UpstreamAuthError(
                errors.INVALID_AUTHORIZATION,
                "upstream server sent AuthenticationOk before completing SCRAM, so it did not prove it knows the password",
            )
        elif self.state is AuthState.DONE:
            raise UpstreamAuthError(errors.PROTOCOL_VIOLATION, "upstream server sent AuthenticationOk twice")
        self.state = AuthState.DONE

    # -- one method each -----------------------------------------------------------------------

    def _check_allowed(self, method: str, what: str) -> None:
        if method not in self._allowed:
            raise UpstreamAuthError(
                errors.INVALID_AUTHORIZATION, f"upstream server {what}, but upstream.require_auth is {self._require_auth!r}"
            )

    def _check_binding_used(self) -> None:
        if self._channel_binding == "require" and self.mechanism != SCRAM_PLUS:
            raise UpstreamAuthError(
                errors.INVALID_AUTHORIZATION,
                "upstream.channel_binding is 'require', but the server authenticated without channel binding",
            )

    def _expect(self, state: AuthState, request: str) -> None:
        if self.state is not state:
            raise UpstreamAuthError(errors.PROTOCOL_VIOLATION, f"upstream server sent {request} out of order ({self.state.value})")

    def _usable_password(self) -> str:
        if self._password is None:
            raise UpstreamAuthError(errors.INVALID_PASSWORD, "upstream server asks for a password and none is configured")
        return self._password

    def _password_message(self, code: int, data: bytes) -> bytes:
        cleartext = code == messages.AUTH_CLEARTEXT_PASSWORD
        self._check_allowed("password" if cleartext else "md5", "requested a cleartext password" if cleartext else "requested md5")
        self._check_binding_used()
        self._expect(AuthState.NOTHING_ASKED, "a password request")
        password = self._usable_password()
        self.state = AuthState.PASSWORD_SENT
        if cleartext:
            return messages.password_message(password)
        inner = hashlib.md5((password + self._user).encode()).hexdigest()
        return messages.password_message("md5" + hashlib.md5(inner.encode() + data[:4]).hexdigest())

    def _sasl_initial(self, data: bytes) -> bytes:
        self._check_allowed("scram-sha-256", "requested SASL (SCRAM-SHA-256)")
        self._expect(AuthState.NOTHING_ASKED, "AuthenticationSASL")
        offered = {name.decode(errors="replace") for name in data.split(b"\0") if name}
        if self._binding_data is not None and SCRAM_PLUS in offered:
            self.mechanism = SCRAM_PLUS
        elif SCRAM in offered:
            self.mechanism = SCRAM
        else:
            raise UpstreamAuthError(errors.FEATURE_NOT_SUPPORTED, "upstream server offers no supported SASL mechanism")
        self._check_binding_used()
        binding = (CHANNEL_BINDING_TYPE, self._binding_data) if self._binding_data is not None else None
        try:
            self._scram = scramp.ScramClient([self.mechanism], self._user, self._usable_password(), binding)
            first = self._scram.get_client_first()
        except scramp.ScramException as exc:
            raise UpstreamAuthError(errors.INVALID_PASSWORD, f"the upstream user or password cannot be used with SCRAM: {exc}") from exc
        self.state = AuthState.SASL_FIRST_SENT
        return messages.sasl_initial_response(self.mechanism, first.encode())

    def _sasl_continue(self, data: bytes) -> bytes:
        self._expect(AuthState.SASL_FIRST_SENT, "AuthenticationSASLContinue")
        assert self._scram is not None
        try:
            self._scram.set_server_first(data.decode())
            final = self._scram.get_client_final()
        except (scramp.ScramException, UnicodeDecodeError, KeyError, ValueError) as exc:
            raise UpstreamAuthError(errors.PROTOCOL_VIOLATION, f"upstream server sent an invalid SCRAM server-first message: {exc}") from exc
        self.state = AuthState.SASL_FINAL_SENT
        return messages.sasl_response(final.encode())

    def _sasl_final(self, data: bytes) -> None:
        self._expect(AuthState.SASL_FINAL_SENT, "AuthenticationSASLFinal")
        assert self._scram is not None
        try:
            self._scram.set_server_final(data.decode())
        except (scramp.ScramException, UnicodeDecodeError, KeyError, ValueError) as exc:
            raise UpstreamAuthError(
                errors.INVALID_AUTHORIZATION, "upstream server's SCRAM signature does not verify: it did not prove it knows the password"
            ) from exc
        self.state = AuthState.SASL_VERIFIED
