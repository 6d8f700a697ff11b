"""pydantic models as JSON; imported only when a model type is first materialized."""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel

from flowcore.exceptions import MaterializerError
from flowcore.materializers._base import Materializer

__all__ = ["PydanticMaterializer"]

_JSON_FILE = "model.json"


class PydanticMaterializer(Materializer, builtin=True):
    """A pydantic model, as `model_dump_json()`, read back with `data_type.model_validate_json`."""

    ASSOCIATED_TYPES = (BaseModel,)

    def save(self, data: Any, uri: str) -> None:
        if not isinstance(data, BaseModel):
            raise MaterializerError(f"cannot store {type(data).__qualname__}: not a pydantic model")
        with open(os.path.join(uri, _JSON_FILE), "w", encoding="utf-8") as f:
            f.write(data.model_dump_json())

    def load(self, data_type: type, uri: str) -> Any:
        if not (isinstance(data_type, type) and issubclass(data_type, BaseModel)):
            raise MaterializerError(
                f"cannot rebuild the model stored at {uri}: its type {data_type.__qualname__} "
                "is not a pydantic model (is its module importable?)"
            )
        with open(os.path.join(uri, _JSON_FILE), encoding="utf-8") as f:
            return data_type.model_validate_json(f.read())
