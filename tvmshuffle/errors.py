"""The one exception type that reaches users as a one-line message (exit code 2)."""


class UserError(Exception):
    """Bad input from the user: a file, a model name, a flag, an op we cannot import.

    The CLI prints ``tvmshuffle: error: <message>`` and exits with code 2, without a
    traceback (``--verbose`` shows it). The message must name the file, op or flag.
    """
