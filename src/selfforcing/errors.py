"""User-facing errors.

Anything raised as :class:`SelfForcingError` is a problem with the user's input
(a path, a prompt, a config value). The CLI prints its message and exits with
status 2 instead of showing a traceback from deep inside the library.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path


class SelfForcingError(ValueError):
    """Bad input from the user, with a message that names the problem."""


class DamagedFileError(SelfForcingError):
    """A file that cannot be read back: missing, truncated, corrupt, or not what it claims."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"cannot read {path}: {reason}")
        self.path = Path(path)


# What a failed ``torch.load(weights_only=True)`` means. Its own error depends on the bytes it
# met (UnpicklingError, IndexError, KeyError, ...) and may advise ``weights_only=False``, which
# would run code from the file: never repeat that.
NOT_TENSORS = "not a file of plain tensors (damaged, or holding Python objects, which are never unpickled)"


@contextlib.contextmanager
def reading(path: str | Path, unparsable: str | None = None) -> Iterator[None]:
    """Turn whatever the reader of ``path`` raises (a truncated safetensors header, a corrupt zip,
    an I/O error) into a :class:`DamagedFileError` naming the file. Readers raise their own
    exception types with multi-line messages; the user needs the file's name and one reason
    (``unparsable``, when given, for a file the reader cannot parse), and no warnings about the
    bytes the reader met. Wrap only the read itself, so that a bug elsewhere is not reported as
    a bad file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except SelfForcingError:
        raise
    except Exception as e:
        reason = describe(e) if isinstance(e, OSError) or unparsable is None else unparsable
        raise DamagedFileError(path, reason) from e


def describe(error: BaseException) -> str:
    """A one-line reason: an I/O error's own, else the first sentence of the message."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error).strip()
    first = text.splitlines()[0].split(". ")[0] if text else type(error).__name__
    return first if len(first) <= 200 else first[:197] + "..."
