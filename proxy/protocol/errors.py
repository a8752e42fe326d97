"""SQLSTATE codes the proxy uses, and the ProtocolViolation exception for malformed input."""

# Class 08: connection exception
CONNECTION_FAILURE = "08006"
PROTOCOL_VIOLATION = "08P01"
# Class 0A: feature not supported
FEATURE_NOT_SUPPORTED = "0A000"
# Class 22: data exception
CHARACTER_NOT_IN_REPERTOIRE = "22021"
# Class 25: invalid transaction state
IN_FAILED_TRANSACTION = "25P02"
IDLE_IN_TRANSACTION_TIMEOUT = "25P03"
IDLE_SESSION_TIMEOUT = "57P05"

# The Postgres routine (field R) that raises the timeouts' and terminations' FATALs the proxy imitates.
INTERRUPTS = "ProcessInterrupts"
# Class 26: invalid SQL statement name
INVALID_STATEMENT_NAME = "26000"
# Class 28: invalid authorization specification
INVALID_AUTHORIZATION = "28000"
INVALID_PASSWORD = "28P01"
# Class 3D: invalid catalog name
INVALID_CATALOG_NAME = "3D000"
# Class 42: syntax error or access rule violation
INSUFFICIENT_PRIVILEGE = "42501"
DUPLICATE_PREPARED_STATEMENT = "42P05"
SYNTAX_ERROR = "42601"
UNDEFINED_OBJECT = "42704"
# Class 53: insufficient resources
TOO_MANY_CONNECTIONS = "53300"
CONFIGURATION_LIMIT_EXCEEDED = "53400"
# Class 54: program limit exceeded
PROGRAM_LIMIT_EXCEEDED = "54000"
STATEMENT_TOO_COMPLEX = "54001"
# Class 55: object not in prerequisite state
OBJECT_NOT_IN_PREREQUISITE_STATE = "55000"
# Class 57: operator intervention
ADMIN_SHUTDOWN = "57P01"
CANNOT_CONNECT_NOW = "57P03"
QUERY_CANCELED = "57014"
# Class XX: internal error
INTERNAL_ERROR = "XX000"


class ProtocolViolation(Exception):
    """Bytes from a peer that do not follow the protocol; reported as SQLSTATE 08P01. `routine` (field R)
    names the Postgres function that ends a session the same way, where the proxy imitates it."""

    def __init__(self, message: str, routine: str | None = None) -> None:
        super().__init__(message)
        self.routine = routine


class UpstreamProtocolViolation(Exception):
    """The server sent what the queue of what it owes cannot explain: the proxy lost track of its
    replies, reported to the client as XX000 (the client did nothing wrong)."""
