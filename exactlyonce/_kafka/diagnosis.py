"""Why a client could not bootstrap: a TLS handshake and a SASL exchange replayed with the client's settings."""

from __future__ import annotations

import contextlib
import functools
import socket
import ssl
from collections.abc import Iterable, Mapping
from typing import Any

import kafka.errors

from exactlyonce.errors import ConfigurationError, ExactlyOnceError, TransientError

__all__ = ["bootstrap_failure", "sasl_problem", "tls_problem"]

_TLS_PROTOCOLS = ("SSL", "SASL_SSL")
_SASL_PROTOCOLS = ("SASL_PLAINTEXT", "SASL_SSL")
#: The mechanisms the diagnosis can replay (user name and password only).
_PASSWORD_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_PROBE_TIMEOUT_S = 5.0


def bootstrap_failure(servers: str, config: Mapping[str, Any], setting: str, exc: BaseException) -> ExactlyOnceError:
    """The error to raise when a client could not bootstrap: say why, if TLS or SASL is the reason.

    kafka-python only times out; the handshake error it met is in its log (a
    SASL failure not even there: kafka-python 3.0 drops the broker's last
    answer when the broker closes the connection right after it). With TLS
    on, one handshake with the same settings finds a certificate that does not
    verify (or TLS settings that do not load); then one SASL exchange with the
    same settings finds credentials the broker refuses, a mechanism it does
    not enable, or a listener that requires SASL from a client that does not
    speak it. Those are ConfigurationErrors, since retrying cannot fix them;
    anything else stays a TransientError, with a hint about a protocol
    mismatch.
    """
    problem = tls_problem(servers, config)
    if problem is not None:
        return ConfigurationError(
            f"{problem}. Check {setting}: ssl_cafile must name the CA that signed the broker's certificate, "
            "and the certificate must be issued for the address you connect to (ssl_check_hostname)"
        )
    problem = sasl_problem(servers, config)
    if problem is not None:
        return ConfigurationError(f"{problem}. Check {setting}")
    protocol = config.get("security_protocol", "PLAINTEXT")
    return TransientError(
        f"no Kafka broker answers at {servers} with security_protocol={protocol!r} ({exc}); if the broker's "
        "listener uses TLS, set security_protocol='SSL' (or 'SASL_SSL') in consumer_config and producer_config"
    )


def _tls_context(config: Mapping[str, Any]) -> ssl.SSLContext:
    """The client's TLS context, built by kafka-python from the same settings.

    Raises ImportError or AttributeError for another kafka-python layout, and
    OSError or ssl.SSLError for settings that do not load.
    """
    from kafka.net.transport import KafkaSSLTransport

    settings = {**KafkaSSLTransport.DEFAULT_CONFIG,
                **{k: v for k, v in config.items() if k in KafkaSSLTransport.DEFAULT_CONFIG}}
    context: ssl.SSLContext = KafkaSSLTransport._build_ssl_context(settings)
    return context


def _addresses(servers: str) -> Iterable[tuple[str, str, int]]:
    """``(as given, host, port)`` per bootstrap server; malformed ones are left out."""
    for server in servers.split(","):
        host, _, port = server.strip().rpartition(":")
        with contextlib.suppress(ValueError):
            yield server.strip(), host.strip("[]"), int(port)


def tls_problem(servers: str, config: Mapping[str, Any]) -> str | None:
    """Handshake with each bootstrap server as the client would; the first TLS failure, or ``None``."""
    if config.get("security_protocol", "PLAINTEXT") not in _TLS_PROTOCOLS:
        return None
    try:
        context = _tls_context(config)
    except (ImportError, AttributeError):
        return None  # another kafka-python layout: no diagnosis
    except (OSError, ssl.SSLError) as exc:
        return f"the TLS settings do not load: {exc}"
    for server, host, port in _addresses(servers):
        try:
            with socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S) as sock, \
                    context.wrap_socket(sock, server_hostname=host):
                pass
        except ssl.SSLCertVerificationError as exc:
            return f"TLS certificate verification failed for {server}: {exc.verify_message}"
        except ssl.SSLError as exc:
            return f"TLS handshake with {server} failed: {exc}"
        except OSError:
            continue
    return None


def _exchange(sock: socket.socket, codec: Any, request: Any) -> Any:
    """Send one request over ``sock`` and return the broker's response."""
    codec.send_request(request)
    sock.sendall(codec.send_bytes())
    while True:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("the broker closed the connection")
        for _, response in codec.receive_bytes(data):
            return response


def sasl_problem(servers: str, config: Mapping[str, Any]) -> str | None:
    """One SASL exchange with each bootstrap server as the client would; the first refusal, or ``None``.

    A SASL client (PLAIN or SCRAM) authenticates with its own credentials:
    the broker's refusal, or a mechanism the broker does not enable, is the
    problem. A client without SASL only asks which mechanisms the listener
    enables: a listener that names some requires SASL. No answer, or an
    answer the diagnosis does not understand, is no diagnosis.
    """
    protocol = config.get("security_protocol", "PLAINTEXT")
    mechanism = config.get("sasl_mechanism") or "PLAIN"
    if protocol in _SASL_PROTOCOLS and mechanism not in _PASSWORD_MECHANISMS:
        return None  # GSSAPI, OAUTHBEARER, ...: not replayed here
    try:
        from kafka.net.sasl import get_sasl_mechanism
        from kafka.protocol.parser import KafkaProtocol
        from kafka.protocol.sasl import SaslAuthenticateRequest, SaslHandshakeRequest

        context = _tls_context(config) if protocol in _TLS_PROTOCOLS else None
    except (ImportError, AttributeError, OSError, ssl.SSLError):
        return None  # another kafka-python layout, or TLS settings tls_problem reports

    for server, host, port in _addresses(servers):
        try:
            with contextlib.ExitStack() as stack:
                sock = stack.enter_context(socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S))
                if context is not None:
                    sock = stack.enter_context(context.wrap_socket(sock, server_hostname=host))
                codec = KafkaProtocol(client_id="exactlyonce-diagnosis")
                call = functools.partial(_exchange, sock, codec)
                answer = call(SaslHandshakeRequest(mechanism=mechanism, version=1))
                enabled = ", ".join(answer.mechanisms) or "none"
                if protocol not in _SASL_PROTOCOLS:
                    if answer.mechanisms:
                        wanted = "SASL_SSL" if protocol in _TLS_PROTOCOLS else "SASL_PLAINTEXT"
                        return (f"the listener at {server} requires SASL authentication (mechanisms: {enabled}) "
                                f"but security_protocol={protocol!r}: set security_protocol={wanted!r}, "
                                "sasl_mechanism, sasl_plain_username and sasl_plain_password")
                    continue
                if answer.error_code:
                    return (f"the broker at {server} does not enable SASL mechanism {mechanism!r} "
                            f"(it enables: {enabled}); set sasl_mechanism to one of those")
                user = config.get("sasl_plain_username")
                client = get_sasl_mechanism(mechanism)(
                    host=host, sasl_mechanism=mechanism, sasl_plain_username=user,
                    sasl_plain_password=config.get("sasl_plain_password"))
                while not client.is_done():
                    reply = call(SaslAuthenticateRequest(auth_bytes=client.auth_bytes(), version=1))
                    if reply.error_code:
                        reason = reply.error_message or kafka.errors.for_code(reply.error_code).__name__
                        return (f"SASL authentication failed at {server} (mechanism {mechanism}, user {user!r}): "
                                f"{reason}; sasl_plain_username and sasl_plain_password must be credentials "
                                "the broker knows")
                    client.receive(reply.auth_bytes)
                if not client.is_authenticated():
                    return (f"SASL authentication failed at {server} (mechanism {mechanism}, user {user!r}): "
                            "the broker's final answer did not verify")
        except (OSError, ValueError, kafka.errors.KafkaError):
            continue
    return None
