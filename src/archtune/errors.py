"""User errors: every problem names the key (or file:line) and the fix.

The CLI turns a UserError into one message and exit code 2 (no traceback unless --debug).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Problem:
    key: str  # config key (dotted) or "file:line"
    message: str
    fix: str = ""

    def to_dict(self) -> dict:
        return {"key": self.key, "message": self.message, "fix": self.fix}

    def __str__(self) -> str:
        text = f"{self.key}: {self.message}"
        return f"{text}\n  fix: {self.fix}" if self.fix else text


@dataclass
class UserError(Exception):
    """One or more problems the user can fix; raised once with all of them gathered."""

    problems: list[Problem] = field(default_factory=list)

    @classmethod
    def single(cls, key: str, message: str, fix: str = "") -> "UserError":
        return cls([Problem(key, message, fix)])

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)


class RunStopped(Exception):
    """A training run that ended early on purpose (a signal, a non-finite loss): the CLI prints
    `message`, no traceback, and exits with `exit_code` (not 2: the config was fine)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.message, self.exit_code = message, exit_code
