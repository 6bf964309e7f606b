"""Errors caused by the user's input (files, URLs, config): the CLI prints them as one line, exit 2."""


class UserError(Exception):
    """Bad input. The message names the file or config field and says what was expected."""
