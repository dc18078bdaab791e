"""One line, with the fix, for errors torch raises mid-run whose cause is the data rather than the code.

The CLI prints these instead of a traceback (``LIGHTNING_TRICKS_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

from lightning_tricks.errors import error_chain


def explain_runtime_error(err: BaseException) -> str | None:
    """The one-line explanation of ``err`` (or of what caused it), ``None`` for an error not known here.

    Examples:
        >>> explain_runtime_error(ValueError("Expected more than 1 value per channel when training, got input "
        ...                                  "size torch.Size([1, 8])"))[:52]
        'a training batch of one sample reached a BatchNorm l'
    """
    for cause in error_chain(err):
        message = str(cause).strip()
        if isinstance(cause, ValueError) and "Expected more than 1 value per channel when training" in message:
            return (f"a training batch of one sample reached a BatchNorm layer ({message.splitlines()[0]}): batch "
                    "statistics need at least 2 values per channel. Drop the last incomplete batch "
                    "(DataLoader(..., drop_last=True)) or choose a batch size that does not leave a single sample.")
    return None


__all__ = ["explain_runtime_error"]
