"""The error a user fixes by changing an input: commands print it without a traceback."""


class SetupError(ValueError):
    """Bad config, missing file or incompatible checkpoint; the message names the key or path."""
