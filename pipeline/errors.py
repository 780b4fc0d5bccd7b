"""The one exception type that means "the user made a mistake", and its kind for a param out of range."""

import difflib


class UserError(Exception):
    """A mistake in the user's input (file, param, flag).

    The CLI prints the message as one line on stderr and exits with code 1,
    without a traceback. The message must name the file, line, key or field.
    """


class ParamError(UserError):
    """A value out of its range; `key` (section.key) lets the loader say where it was set."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"{key} {problem}")
        self.key = key


def did_you_mean(word: str, known: list[str], prefix: str = "") -> str:
    """"; did you mean 'train.lr'?" for the closest known name (difflib), or "" when none is close."""
    close = difflib.get_close_matches(word, known, n=1)
    return f"; did you mean '{prefix}{close[0]}'?" if close else ""
