"""The one base class for problems with what a user gave: a file, a flag, a config field, a request.

    raise NotFound(f"{path}: no such checkpoint directory")
    try: ...
    except UserError as e:                 # every CLI: one line on stderr, exit status 2
        return report(e)

Each stage subclasses UserError for its own kind (CheckpointError, ConfigError, ShardError,
ConversationError, SFTError, ExportError, RequestError, ...); the message names the file, line
or field at fault and, where there is one, the fix. Errors that are bugs stay ordinary
exceptions and keep their tracebacks.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


class UserError(ValueError):
    """Bad input; the message names it. CLIs print it and exit 2, the server answers 4xx."""


class NotFound(UserError, FileNotFoundError):
    """A path the user named that does not exist (still a FileNotFoundError for callers)."""


def checked_choice(what: str, value: str, choices: Sequence[str]) -> str:
    """`value` if it is one of `choices`, else a UserError naming `what` (a flag, a setting) and
    the choices: "attention 'bogus': expected auto, sdpa, flash, xformers"."""
    if value not in choices:
        raise UserError(f"{what} {value!r}: expected {', '.join(choices)}")
    return value


def report(error: BaseException, prefix: str = "error") -> int:
    """Prints `error: <message>` on stderr and returns the CLI exit status for bad input (2)."""
    print(f"{prefix}: {error}", file=sys.stderr)
    return 2
