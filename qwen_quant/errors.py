"""One exception type for bad input: the CLIs print its message as one line and exit with code 2."""


class UserError(Exception):
    """Bad input from the user. The message is one line that says what to do."""
