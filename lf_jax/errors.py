"""Expected failures: one-line messages for the user, exit status 2 from the CLI.

Anything else is a bug and keeps its traceback.
"""


class LfJaxError(Exception):
    """An expected failure whose message says what went wrong and where."""


class UserInputError(LfJaxError, ValueError):
    """Bad input from the user: the message names the field and the value."""


class TrainingDivergedError(LfJaxError, FloatingPointError):
    """A NaN or Inf loss: the message names the step and the task."""
