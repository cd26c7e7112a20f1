"""Exceptions raised by msa (mirrors of include/msa/error.h).

They live in pure Python so that they have docstrings and so that ``msa._C`` can raise them by
name; ``msa`` re-exports them.
"""


class Error(RuntimeError):
    """Base class of everything the msa library raises."""


class ArgumentError(Error, ValueError):
    """A bad argument. ``.argument`` names it (e.g. ``"qi"``, ``"cu_seqlens_k"``, ``"topk"``)."""

    def __init__(self, message="", argument=""):
        super().__init__(message)
        self.argument = argument


class NotSupportedError(Error, NotImplementedError):
    """The operation exists in the API but not on the backend where the tensors live."""
