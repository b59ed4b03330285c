"""The agent's one error tree. Every error the agent raises to a caller is one of these.

    AgentError                      anything this package raises on purpose
    +-- ConfigError                 the configuration file is missing, unreadable or wrong
    +-- DocumentError               a body that is not a Scheduled Events document
    +-- ImdsError                   talking to the Instance Metadata Service failed
    |   +-- ImdsRequestRejected     a 4xx that retrying cannot fix (400, 403, 405, ...)
    |   +-- ImdsUnavailable         transient failures outlasted the retry budget
    |   +-- ImdsResponseInvalid     a 2xx whose body is not what the endpoint promises
    +-- OperationCancelled          the stop flag was set while we waited
    +-- HookError                   a hook or hook directory that may not run (permissions)
    +-- StateError                  the state store cannot be opened or written
    +-- IllegalTransition           a lifecycle move the transition table forbids (a bug)

Errors carry their facts as attributes, and their messages say what failed, on which object,
the value seen and, where there is one, a hint.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(AgentError):
    """The configuration is wrong; ``problems`` lists each one as ``key.path: message``."""

    def __init__(self, source: str, problems: list[str]) -> None:
        lines = "\n".join(f"  {problem}" for problem in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{lines}")
        self.source = source
        self.problems = problems


class DocumentError(AgentError):
    """The body is not a Scheduled Events document; ``path`` names the offending part."""

    def __init__(self, message: str, *, path: str = "$") -> None:
        super().__init__(f"not a Scheduled Events document: {path}: {message}")
        self.path = path
        self.reason = message


class ImdsError(AgentError):
    """A request to IMDS failed. ``url`` is the request's URL without host secrets."""

    def __init__(self, message: str, *, url: str, status: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status = status


class ImdsRequestRejected(ImdsError):
    """IMDS answered a 4xx that is not transient: the request itself is wrong."""


class ImdsUnavailable(ImdsError):
    """IMDS kept failing transiently (404, 410, 429, 5xx, timeouts, resets) past the budget."""

    def __init__(
        self,
        message: str,
        *,
        url: str,
        status: int | None = None,
        attempts: int = 1,
        cause: str = "",
    ) -> None:
        super().__init__(message, url=url, status=status)
        self.attempts = attempts
        self.cause = cause  # the last failure, without counts: "503 Service Unavailable"


class ImdsResponseInvalid(ImdsError):
    """IMDS answered 2xx with a body that is not what the endpoint promises."""


class OperationCancelled(AgentError):
    """The stop flag was set while an operation waited (for a retry, say)."""


class ApprovalWithdrawn(AgentError):
    """Between two tries of an approval POST, the decision changed: no more tries."""


class HookError(AgentError):
    """A hook or hook directory that the agent refuses to run; ``path`` names it."""

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


class StateError(AgentError):
    """The state store cannot be opened or written; ``path`` names the database."""

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


class IllegalTransition(AgentError):
    """A lifecycle move the transition table does not allow: a bug, never an input problem."""

    def __init__(self, event_id: str, state: str, trigger: str) -> None:
        super().__init__(f"event {event_id}: no transition from state {state!r} on {trigger!r}")
        self.event_id = event_id
        self.state = state
        self.trigger = trigger
