"""numpy arrays and scalars as `.npy`; imported only when a numpy type is first materialized."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from flowcore.exceptions import MaterializerError
from flowcore.materializers._base import Materializer

__all__ = ["NumpyMaterializer"]

_ARRAY_FILE = "array.npy"
_SCALAR_FILE = "scalar.npy"


class NumpyMaterializer(Materializer, builtin=True):
    """A numpy array (or scalar) as a `.npy` file, without pickle.

    Object arrays and ndarray subclasses (masked arrays, matrices) are refused, so they fall
    back to cloudpickle rather than come back changed.
    """

    ASSOCIATED_TYPES = (np.ndarray, np.generic)

    def save(self, data: Any, uri: str) -> None:
        if isinstance(data, np.generic):
            name = _SCALAR_FILE
        elif type(data) is np.ndarray:
            name = _ARRAY_FILE
        else:
            raise MaterializerError(
                f"cannot store {type(data).__qualname__}: only numpy.ndarray and numpy scalars"
            )
        # allow_pickle=False: object dtypes raise here, and loading never unpickles.
        np.save(os.path.join(uri, name), data, allow_pickle=False)

    def load(self, data_type: type, uri: str) -> Any:
        scalar = os.path.join(uri, _SCALAR_FILE)
        if os.path.exists(scalar):
            return np.load(scalar, allow_pickle=False)[()]
        return np.load(os.path.join(uri, _ARRAY_FILE), allow_pickle=False)
