"""Errors raised by curvhooks."""


class UnsupportedError(NotImplementedError):
    """A module, loss or argument that curvhooks cannot differentiate.

    The message names the module's path in the model, its class, the extension that needed it
    and what is supported.
    """
