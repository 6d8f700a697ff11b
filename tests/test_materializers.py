"""Materializers: registry look-ups, exact round-trips, refusals, the fallback and hashing."""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from flowcore.exceptions import ArtifactLoadError, MaterializerError
from flowcore.materializers import (
    BuiltInContainerMaterializer,
    BuiltInMaterializer,
    BytesMaterializer,
    CloudpickleMaterializer,
    DataclassMaterializer,
    Materializer,
    NumpyMaterializer,
    PathMaterializer,
    PydanticMaterializer,
    content_hash_of,
    hash_directory,
    materializer_for,
    remember_type,
    resolve_materializer,
    save_with_fallback,
    type_from_name,
)

REPO = Path(__file__).resolve().parent.parent


class Point(BaseModel):
    x: int
    tags: list[str] = []


@dataclasses.dataclass
class Config:
    lr: float
    layers: list[int]
    name: str = "net"


@dataclasses.dataclass
class Holder:
    lock: Any


class Color(enum.IntEnum):
    RED = 1


def _roundtrip(materializer: type[Materializer], value: Any, tmp_path: Path,
               data_type: type | None = None) -> Any:
    uri = tmp_path / "artifact"
    uri.mkdir(parents=True)
    materializer().save(value, str(uri))
    return materializer().load(data_type or type(value), str(uri))


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=60, check=False)


@pytest.mark.parametrize(
    ("data_type", "expected"),
    [
        (type(None), BuiltInMaterializer),
        (bool, BuiltInMaterializer),
        (int, BuiltInMaterializer),
        (float, BuiltInMaterializer),
        (str, BuiltInMaterializer),
        (bytes, BytesMaterializer),
        (list, BuiltInContainerMaterializer),
        (dict, BuiltInContainerMaterializer),
        (tuple, BuiltInContainerMaterializer),
        (set, BuiltInContainerMaterializer),
        (list[int], BuiltInContainerMaterializer),
        (Path, PathMaterializer),
        (type(Path("x")), PathMaterializer),
        (Point, PydanticMaterializer),
        (Config, DataclassMaterializer),
        (np.ndarray, NumpyMaterializer),
        (np.float64, NumpyMaterializer),
        (threading.Lock, CloudpickleMaterializer),
        (object, CloudpickleMaterializer),
    ],
)
def test_materializer_for_builtin_types(data_type: Any, expected: type[Materializer]) -> None:
    """Each built-in type maps to its built-in materializer, anything else to cloudpickle."""
    assert materializer_for(data_type) is expected


def test_registration_nearest_in_mro_and_later_wins() -> None:
    """A subclass registers for its types; the nearest MRO entry and the latest class win."""

    class Base:
        pass

    class Child(Base):
        pass

    class BaseMaterializer(Materializer):
        ASSOCIATED_TYPES = (Base,)

    assert materializer_for(Child) is BaseMaterializer

    class ChildMaterializer(Materializer):
        ASSOCIATED_TYPES = (Child,)

    assert materializer_for(Child) is ChildMaterializer
    assert materializer_for(Base) is BaseMaterializer

    class NewerBaseMaterializer(Materializer):
        ASSOCIATED_TYPES = (Base,)

    assert materializer_for(Base) is NewerBaseMaterializer


def test_importing_materializers_does_not_import_numpy() -> None:
    """`import flowcore.materializers` leaves numpy unimported until a numpy type is looked up."""
    proc = _run_python(
        "import sys, flowcore.materializers as m\n"
        "assert 'numpy' not in sys.modules, 'numpy imported eagerly'\n"
        "assert m.materializer_for(int) is m.BuiltInMaterializer\n"
        "assert 'numpy' not in sys.modules, 'numpy imported by a lookup of int'\n"
        "import numpy\n"
        "print(m.materializer_for(numpy.ndarray).__name__)\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "NumpyMaterializer"


def test_user_materializer_beats_lazily_loaded_builtin() -> None:
    """A user's materializer for numpy arrays, registered first, is not replaced by the built-in."""
    proc = _run_python(
        "import numpy as np\n"
        "from flowcore.materializers import Materializer, materializer_for\n"
        "class Mine(Materializer):\n"
        "    ASSOCIATED_TYPES = (np.ndarray,)\n"
        "print(materializer_for(np.ndarray).__name__, materializer_for(np.int64).__name__)\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["Mine", "NumpyMaterializer"]


def test_resolve_materializer_accepts_class_and_import_path() -> None:
    """A Materializer class or its import path resolves to the class."""
    assert resolve_materializer(BytesMaterializer, where="x") is BytesMaterializer
    path = "flowcore.materializers._builtin.BytesMaterializer"
    assert resolve_materializer(path, where="x") is BytesMaterializer
    lazy = "flowcore.materializers._numpy.NumpyMaterializer"
    assert resolve_materializer(lazy, where="x") is NumpyMaterializer


@pytest.mark.parametrize(
    "spec",
    ["no_such_package.mod.Mat", "flowcore.materializers.NoSuchMaterializer", "NoDots",
     "flowcore.exceptions.FlowcoreError", dict],
)
def test_resolve_materializer_errors_name_where(spec: Any) -> None:
    """A bad path or a class that is no Materializer raises MaterializerError naming `where`."""
    where = "pipeline 'p', step 's', output 'o'"
    with pytest.raises(MaterializerError, match=r"pipeline 'p', step 's', output 'o'"):
        resolve_materializer(spec, where=where)


SIMPLE_VALUES: list[tuple[type[Materializer], Any]] = [
    (BuiltInMaterializer, None),
    (BuiltInMaterializer, True),
    (BuiltInMaterializer, -12345678901234567890),
    (BuiltInMaterializer, 1.5),
    (BuiltInMaterializer, "héllo\n"),
    (BytesMaterializer, b"\x00\xffbytes"),
    (BuiltInContainerMaterializer, [1, "a", None, [2.5, {"k": [True]}]]),
    (BuiltInContainerMaterializer, {"a": 1, "b": {"c": [1, 2]}}),
    (BuiltInContainerMaterializer, (1, "two", [3])),
    (BuiltInContainerMaterializer, {3, 1, "x"}),
    (BuiltInContainerMaterializer, frozenset({1, 2})),
    (BuiltInContainerMaterializer, ()),
    (PydanticMaterializer, Point(x=3, tags=["a"])),
    (DataclassMaterializer, Config(lr=0.1, layers=[3, 4])),
]


@pytest.mark.parametrize(("materializer", "value"), SIMPLE_VALUES)
def test_builtin_round_trip_is_exact(materializer: type[Materializer], value: Any,
                                     tmp_path: Path) -> None:
    """Every built-in gives back an equal value of the same type."""
    loaded = _roundtrip(materializer, value, tmp_path)
    assert loaded == value
    assert type(loaded) is type(value)


def test_numpy_round_trip_keeps_dtype_and_shape(tmp_path: Path) -> None:
    """Arrays come back with their dtype and shape, scalars as numpy scalars."""
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    loaded = _roundtrip(NumpyMaterializer, array, tmp_path / "a")
    assert loaded.dtype == np.float32 and loaded.shape == (3, 4)
    np.testing.assert_array_equal(loaded, array)
    scalar = _roundtrip(NumpyMaterializer, np.int16(7), tmp_path / "s")
    assert type(scalar) is np.int16 and scalar == 7


def test_path_materializer_copies_files_and_directories(tmp_path: Path) -> None:
    """A Path's file or directory content is copied into the artifact and returned as a Path."""
    src = tmp_path / "data"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("A")
    (src / "sub" / "b.txt").write_text("B")
    copy = _roundtrip(PathMaterializer, src, tmp_path / "d")
    assert isinstance(copy, Path) and copy != src
    assert (copy / "a.txt").read_text() == "A" and (copy / "sub" / "b.txt").read_text() == "B"
    single = _roundtrip(PathMaterializer, src / "a.txt", tmp_path / "f")
    assert single.name == "a.txt" and single.read_text() == "A"


@pytest.mark.parametrize(
    ("materializer", "value"),
    [
        (BuiltInContainerMaterializer, {1: "int key"}),
        (BuiltInContainerMaterializer, [(1, 2)]),
        (BuiltInContainerMaterializer, {"lock": threading.Lock()}),
        (BuiltInMaterializer, Color.RED),
        (DataclassMaterializer, Holder(lock=threading.Lock())),
        (DataclassMaterializer, Holder(lock=(1, 2))),
        (NumpyMaterializer, np.array([{"a": 1}], dtype=object)),
        (PathMaterializer, Path("/no/such/path/anywhere")),
    ],
)
def test_builtin_refuses_values_it_cannot_store_exactly(
    materializer: type[Materializer], value: Any, tmp_path: Path
) -> None:
    """A built-in raises rather than store a value that would come back different."""
    with pytest.raises(Exception):  # noqa: B017 - any error makes the store fall back
        materializer().save(value, str(tmp_path))


def test_fallback_to_cloudpickle_logs_a_warning(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """A failing built-in falls back to cloudpickle, with a warning naming the step and type."""
    value = {1: "int key"}
    with caplog.at_level(logging.WARNING, logger="flowcore"):
        used = save_with_fallback(value, BuiltInContainerMaterializer, str(tmp_path),
                                  label="step 'train', output 'output'")
    assert used is CloudpickleMaterializer
    assert CloudpickleMaterializer().load(dict, str(tmp_path)) == value
    assert "step 'train'" in caplog.text and "builtins.dict" in caplog.text


def test_unpicklable_value_raises_materializer_error(tmp_path: Path) -> None:
    """A value even cloudpickle cannot store raises MaterializerError naming step and type."""
    with pytest.raises(MaterializerError, match=r"step 's'.*_thread\.lock"):
        save_with_fallback(threading.Lock(), CloudpickleMaterializer, str(tmp_path),
                           label="step 's'")


def test_failing_user_materializer_does_not_fall_back(tmp_path: Path) -> None:
    """A user's materializer that fails raises MaterializerError instead of pickling silently."""

    class Broken(Materializer):
        def save(self, data: Any, uri: str) -> None:
            raise OSError("disk on fire")

    with pytest.raises(MaterializerError, match="disk on fire"):
        save_with_fallback(1, Broken, str(tmp_path), label="step 's'")


def test_cloudpickle_refuses_another_python_version(tmp_path: Path) -> None:
    """A pickle written under another Python major.minor raises ArtifactLoadError on load."""
    CloudpickleMaterializer().save({"a": 1}, str(tmp_path))
    meta = json.loads((tmp_path / "metadata.json").read_text())
    assert meta["python_version"] == "{}.{}.{}".format(*sys.version_info[:3])
    (tmp_path / "metadata.json").write_text(json.dumps({"python_version": "3.7.1"}))
    with pytest.raises(ArtifactLoadError, match=r"3\.7\.1"):
        CloudpickleMaterializer().load(dict, str(tmp_path))


def test_hash_directory_covers_names_and_contents(tmp_path: Path) -> None:
    """The hash changes with a file's name or content, not with creation order or reserved files."""

    def make(root: Path, files: dict[str, str]) -> str:
        for rel, text in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text)
        return hash_directory(str(root))

    base = make(tmp_path / "a", {"x.txt": "1", "d/y.txt": "2"})
    assert make(tmp_path / "b", {"d/y.txt": "2", "x.txt": "1"}) == base
    assert make(tmp_path / "c", {"x.txt": "1", "d/z.txt": "2"}) != base
    assert make(tmp_path / "e", {"x.txt": "1", "d/y.txt": "3"}) != base
    assert make(tmp_path / "f", {"x.txt": "1", "d/y.txt": "2", ".flowcore-sig": "s"}) == base
    assert make(tmp_path / "g", {"x.txt": "1", "d/y.txt": "2", "d/.flowcore-x": "s"}) != base


def test_content_hash_of_equal_values_is_equal() -> None:
    """Equal values hash equal and different values differ, also through the fallback."""
    assert content_hash_of({"a": [1, 2]}, BuiltInContainerMaterializer, dict) == content_hash_of(
        {"a": [1, 2]}, BuiltInContainerMaterializer, dict)
    assert content_hash_of([1], BuiltInContainerMaterializer, list) != content_hash_of(
        [2], BuiltInContainerMaterializer, list)
    fallback = content_hash_of({1: 2}, BuiltInContainerMaterializer, dict)
    assert fallback == content_hash_of({1: 2}, BuiltInContainerMaterializer, dict)


def test_equal_sets_hash_equal_whatever_their_order() -> None:
    """Sets are written in a canonical order, so equal sets give equal content hashes."""
    a = set(range(1000))
    b = set(reversed(range(1000)))
    assert content_hash_of(a, BuiltInContainerMaterializer, set) == content_hash_of(
        b, BuiltInContainerMaterializer, set)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


@settings(max_examples=60, deadline=None)
@given(value=json_values)
def test_json_values_round_trip_exactly(value: Any, tmp_path_factory: pytest.TempPathFactory
                                        ) -> None:
    """Any JSON value round-trips exactly through the materializer `materializer_for` picks."""
    materializer = materializer_for(type(value))
    loaded = _roundtrip(materializer, value, tmp_path_factory.mktemp("h"))
    assert loaded == value
    assert json.dumps(loaded) == json.dumps(value)


def test_type_from_name_finds_local_and_importable_types() -> None:
    """Types seen in this process come back by name, even local ones; others are imported."""

    class Local:
        pass

    name = remember_type(Local)
    assert "<locals>" in name and type_from_name(name) is Local
    assert type_from_name("builtins.int") is int
    assert type_from_name("builtins.NoneType") is type(None)
    assert type_from_name("collections.OrderedDict") is __import__("collections").OrderedDict
    assert type_from_name("no_such_module.Thing") is None
    assert type_from_name("tests.elsewhere.<locals>.Gone") is None


@pytest.mark.parametrize("value", [None, True, 0, -3, 2.5, "héllo", [1, "a", None],
                                   {"k": [1, 2]}, (1, 2), {3, 1, 2}, frozenset({"x"})])
def test_in_memory_files_hash_like_the_written_directory(value: Any) -> None:
    """A built-in materializer's files_for() gives the files save() writes, so the in-memory
    hash equals the hash of the written artifact directory."""
    from flowcore.materializers import content_hash_of, files_digest, materializer_for

    materializer = materializer_for(type(value))
    files = materializer.files_for(value)
    assert files is not None
    assert files_digest(files)[0] == content_hash_of(value, materializer, type(value))


def test_values_json_cannot_hold_have_no_in_memory_files() -> None:
    """files_for() declines what save() would refuse (so the store takes the slow path)."""
    from flowcore.materializers import materializer_for

    assert materializer_for(list).files_for([(1, 2)]) is None
    assert materializer_for(dict).files_for({1: "a"}) is None


def test_a_materializer_may_create_its_directory_itself(tmp_path: Path) -> None:
    """A user materializer that creates its artifact directory with os.mkdir works too."""
    from flowcore.materializers import Materializer, save_with_fallback

    class Box:
        def __init__(self, text: str) -> None:
            self.text = text

    class MkdirMaterializer(Materializer):
        ASSOCIATED_TYPES = (Box,)

        def save(self, data: Any, uri: str) -> None:
            os.mkdir(uri)
            with open(os.path.join(uri, "box.txt"), "w") as f:
                f.write(data.text)

        def load(self, data_type: type, uri: str) -> Any:
            with open(os.path.join(uri, "box.txt")) as f:
                return Box(f.read())

    uri = tmp_path / "artifact"
    uri.mkdir()
    used = save_with_fallback(Box("hi"), MkdirMaterializer, str(uri), label="step 's'")
    assert used is MkdirMaterializer
    assert MkdirMaterializer().load(Box, str(uri)).text == "hi"
