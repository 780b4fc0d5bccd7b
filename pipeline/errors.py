"""The one exception type that means "the user made a mistake"."""


class UserError(Exception):
    """A mistake in the user's input (file, param, flag).

    The CLI prints the message as one line on stderr and exits with code 1,
    without a traceback. The message must name the file, line, key or field.
    """
