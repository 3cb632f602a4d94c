"""The agent's one exception tree. HTTP statuses are mapped once (agent.api.errors), CLI
exit codes once (agent.cli); every message is one line a person can act on.

    AgentError
    ├── SettingsError          a setting is invalid                      (exit 2)
    ├── ListenerError          the API socket cannot be set up
    ├── InferenceError         the runtime cannot serve a request
    │   ├── ModelLoadFailed    the file would not load                   (503)
    │   ├── QueueFull          too many requests for one model           (429 + Retry-After)
    │   ├── PromptTooLong      prompt does not fit the context window    (400)
    │   ├── ChatNotSupported   no chat template for this model           (400)
    │   ├── TaskNotSupported   the model cannot serve this route         (400)
    │   ├── InvalidSampling    a sampling parameter the model cannot honour (400, names it)
    │   ├── Stopping           the agent is shutting down                (503)
    │   └── GenerationFailed   llama.cpp failed a decode step            (503)
    ├── QuantizeError          the quantizer refused or failed (`models quantize`)
    ├── SecurityError
    │   ├── PolicyError        the RBAC policy file is invalid (file:line: field: why)
    │   ├── DeviceKeyError     a key file is missing, unsafe or unreadable
    │   ├── AuditError         the audit log cannot do what was asked
    │   │   ├── AuditClosedError   append() after close()
    │   │   └── AuditUnavailable   audited work refused: backlog, writer failing, disk low (503)
    │   └── TokenError
    │       ├── InvalidToken   malformed, unknown, or wrong secret       (401)
    │       ├── ExpiredToken   past its expiry                           (401)
    │       ├── RevokedToken   revoked                                   (401)
    │       ├── TokenAttemptsExceeded  too many failures from one peer   (429)
    │       ├── TokenNotFound  no token has that name
    │       └── TokenExists    a token with that name exists
    └── ClientError            the CLI could not get an answer from the daemon
        ├── AgentUnavailable   nothing answers on the socket
        └── DaemonError        the daemon answered with an error (its status and message)

The registry has its own tree (`registry.errors.RegistryError`), since it never imports
the agent; both are handled wherever agent errors are.
"""

from __future__ import annotations

__all__ = [
    "AgentError",
    "AgentUnavailable",
    "AuditClosedError",
    "AuditError",
    "AuditUnavailable",
    "ChatNotSupported",
    "ClientError",
    "DaemonError",
    "DeviceKeyError",
    "ExpiredToken",
    "GenerationFailed",
    "InferenceError",
    "InvalidSampling",
    "InvalidToken",
    "ListenerError",
    "ModelLoadFailed",
    "PolicyError",
    "PromptTooLong",
    "QuantizeError",
    "QueueFull",
    "RevokedToken",
    "SecurityError",
    "SettingsError",
    "Stopping",
    "TaskNotSupported",
    "TokenAttemptsExceeded",
    "TokenError",
    "TokenExists",
    "TokenNotFound",
]


class AgentError(Exception):
    """Root of every error the agent raises on purpose; `str()` is the one line shown."""


class SettingsError(AgentError):
    """A setting is invalid: names the key, where it came from and what is allowed."""


class ListenerError(AgentError):
    """The API socket cannot be set up; the message says what to do."""


class InferenceError(AgentError):
    """The runtime cannot serve a request; the API maps each subclass to one status."""


class ModelLoadFailed(InferenceError):
    """The model's file would not load (or does not fit the memory budget)."""


class QueueFull(InferenceError):
    """Too many requests are waiting for one model; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PromptTooLong(InferenceError):
    """The prompt does not fit the model's context window."""


class ChatNotSupported(InferenceError):
    """No chat template is known for this model."""


class TaskNotSupported(InferenceError):
    """The model's task cannot serve this route (e.g. chat with an embedding model)."""


class InvalidSampling(InferenceError):
    """A sampling parameter the model cannot honour as given (a token id outside its
    vocabulary, a JSON schema that has no grammar); `param` names the field."""

    def __init__(self, message: str, param: str = "sampling") -> None:
        super().__init__(message)
        self.param = param


class Stopping(InferenceError):
    """The agent is shutting down."""


class GenerationFailed(InferenceError):
    """llama.cpp failed a decode step (not a request error: every sequence in it fails)."""


class QuantizeError(AgentError):
    """The quantizer refused or failed; the message says why."""


class SecurityError(AgentError):
    """Base of identity, policy, key, audit and token errors."""


class PolicyError(SecurityError):
    """The RBAC policy file is invalid: '<file>:<line>: <field>: <why>' per problem."""


class DeviceKeyError(SecurityError):
    """A key file cannot be used; the message says which file and why (never key bytes)."""


class AuditError(SecurityError):
    """The audit log cannot do what was asked."""


class AuditClosedError(AuditError):
    """The log was closed: nothing more can be appended."""


class AuditUnavailable(AuditError):
    """Work that must be audited is refused for now: the audit backlog is full, the writer
    cannot write, or the disk is below its watermark; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TokenError(SecurityError):
    """Base of API token errors."""


class InvalidToken(TokenError):
    """Malformed, unknown, or the secret does not match."""


class ExpiredToken(TokenError):
    """The token's expiry has passed."""


class RevokedToken(TokenError):
    """The token was revoked."""


class TokenAttemptsExceeded(TokenError):
    """Too many failed token attempts from one peer: refused without hashing until the
    window passes (a peer guessing secrets kept both Argon2 slots busy for everyone)."""

    def __init__(self, message: str, retry_after: int = 60) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TokenNotFound(TokenError):
    """No token has that name."""


class TokenExists(TokenError):
    """A token with that name already exists."""


class ClientError(AgentError):
    """The CLI could not get what it asked of the daemon."""


class AgentUnavailable(ClientError):
    """Nothing answers on the socket (not running, wrong path, or no permission)."""


class DaemonError(ClientError):
    """The daemon answered with an error; the message is its own."""

    def __init__(self, status: int, message: str, *, param: str | None = None) -> None:
        super().__init__(f"{message} (HTTP {status})")
        self.status = status
        self.param = param  # the request field it refused, if it named one (a usage error)
