"""Former home of the blob format, kept so that existing imports keep working: everything
here is :mod:`kvtc_store.codec.format` (import from there)."""

from .format import *
from .format import (  # noqa: F401 - private names some callers use
    _PREFIX,
    __all__,
    _read_header,
)
