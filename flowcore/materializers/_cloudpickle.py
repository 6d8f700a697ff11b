"""The fallback materializer: cloudpickle, loadable only under the same Python major.minor."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

from flowcore.exceptions import ArtifactLoadError
from flowcore.materializers._base import Materializer

__all__ = ["PICKLE_FILE", "CloudpickleMaterializer"]

PICKLE_FILE = "artifact.pkl"
_METADATA_FILE = "metadata.json"


def _python_version() -> str:
    return "{}.{}.{}".format(*sys.version_info[:3])


class CloudpickleMaterializer(Materializer, builtin=True):
    """Stores any picklable value with cloudpickle, for values no other materializer handles.

    A pickle is neither portable across Python versions nor safe to load from an untrusted
    source; the local artifact store signs it and checks the signature before loading.
    """

    def save(self, data: Any, uri: str) -> None:
        import cloudpickle

        with open(os.path.join(uri, PICKLE_FILE), "wb") as f:
            cloudpickle.dump(data, f)
        with open(os.path.join(uri, _METADATA_FILE), "w", encoding="utf-8") as f:
            json.dump({"python_version": _python_version()}, f)

    def load(self, data_type: type, uri: str) -> Any:
        return self.load_checked(data_type, uri, None)

    def load_checked(
        self, data_type: type, uri: str, check: Callable[[bytes], None] | None
    ) -> Any:
        """Load like `load`, first passing the pickle's bytes to `check` (which may raise).

        Reading the bytes once and checking those same bytes leaves no window in which the
        file could be swapped between the check and the unpickling.
        """
        with open(os.path.join(uri, PICKLE_FILE), "rb") as f:
            payload = f.read()
        if check is not None:
            check(payload)
        self._check_python_version(uri)
        import cloudpickle

        return cloudpickle.loads(payload)

    @staticmethod
    def _check_python_version(uri: str) -> None:
        try:
            with open(os.path.join(uri, _METADATA_FILE), encoding="utf-8") as f:
                saved = str(json.load(f)["python_version"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ArtifactLoadError(
                f"pickled artifact at {uri} has no readable {_METADATA_FILE} ({exc})"
            ) from exc
        if saved.split(".")[:2] != _python_version().split(".")[:2]:
            raise ArtifactLoadError(
                f"the artifact at {uri} was pickled under Python {saved} and cannot be loaded "
                f"under Python {_python_version()}; load it with Python "
                f"{'.'.join(saved.split('.')[:2])}, or give the output a materializer that "
                "does not pickle"
            )
