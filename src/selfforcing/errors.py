"""User-facing errors.

Anything raised as :class:`SelfForcingError` is a problem with the user's input
(a path, a prompt, a config value). The CLI prints its message and exits with
status 2 instead of showing a traceback from deep inside the library.
"""


class SelfForcingError(ValueError):
    """Bad input from the user, with a message that names the problem."""
