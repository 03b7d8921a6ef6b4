"""The base class of errors caused by user input (config, ids, paths, shapes).

The CLI prints these as one line and exits with status 2; anything else is a bug and
keeps its traceback.
"""


class UserInputError(ValueError):
    """Bad input from the user: the message names the field and the value."""
