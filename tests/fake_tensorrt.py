"""A RECORDING FAKE of the ``tensorrt`` Python module, for tests only.

It mimics the slice of the TensorRT 10.x / 11.x Python API that tilefeet's TensorRT runner calls
and records every call in order, so tests can check the call *sequence* (flags, profile shapes,
timing cache, tensor addresses, stream). It builds nothing and computes nothing: passing tests
against it is not evidence that real TensorRT accepts these calls. Where it can, it is strict in
the way TensorRT is: the parser really reads the ONNX file (and its external weights), and an
unknown ``BuilderFlag`` is an ``AttributeError``, as it is on TensorRT 11 for ``FP16``.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any


class FakeTensorRT:
    """Stands in for ``import tensorrt``; ``major`` 10 has the weak-typing builder flags, 11 does not."""

    def __init__(self, major: int = 10):
        self.__version__ = f"{major}.99.0-fake"
        self.calls: list[tuple[Any, ...]] = []
        self.builds = 0
        names = ["TF32", "FP16", "BF16", "INT8"] if major < 11 else ["TF32"]
        self.BuilderFlag = enum.Enum("BuilderFlag", names)
        self.NetworkDefinitionCreationFlag = enum.IntEnum(
            "NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 1 if major < 11 else 0}
        )
        self.MemoryPoolType = enum.Enum("MemoryPoolType", ["WORKSPACE"])
        self.TensorIOMode = enum.Enum("TensorIOMode", ["INPUT", "OUTPUT"])
        self.DataType = enum.Enum("DataType", ["FLOAT", "HALF", "BF16"])
        self.Logger = _logger_class()

    def record(self, *call: Any) -> None:
        self.calls.append(call)

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def Builder(self, logger: Any) -> _Builder:
        self.record("Builder")
        return _Builder(self)

    def OnnxParser(self, network: Any, logger: Any) -> _Parser:
        self.record("OnnxParser")
        return _Parser(self, network)

    def Runtime(self, logger: Any) -> _Runtime:
        self.record("Runtime")
        return _Runtime(self)


def _logger_class():
    class Logger:
        WARNING = 2

        def __init__(self, severity: int = 2):
            self.severity = severity

    return Logger


class _Network:
    def __init__(self, flags: int):
        self.flags = flags
        self.inputs: list[SimpleNamespace] = []
        self.initializer_types: set[str] = set()

    def get_input(self, i: int) -> SimpleNamespace:
        return self.inputs[i]


class _Builder:
    def __init__(self, trt: FakeTensorRT):
        self.trt = trt

    def create_network(self, flags: int) -> _Network:
        self.trt.record("create_network", flags)
        return _Network(flags)

    def create_builder_config(self) -> _Config:
        self.trt.record("create_builder_config")
        return _Config(self.trt)

    def create_optimization_profile(self) -> _Profile:
        self.trt.record("create_optimization_profile")
        return _Profile(self.trt)

    def build_serialized_network(self, network: _Network, config: _Config) -> bytes:
        self.trt.record("build_serialized_network")
        self.trt.builds += 1
        doc = {
            "input": network.inputs[0].name,
            "flags": network.flags,
            "set_flags": sorted(config.flags),
            "initializer_types": sorted(network.initializer_types),
            "profiles": config.profiles,
        }
        return b"FAKE-PLAN" + json.dumps(doc).encode()


class _Parser:
    def __init__(self, trt: FakeTensorRT, network: _Network):
        self.trt, self.network = trt, network
        self.num_errors = 0

    def parse_from_file(self, path: str) -> bool:
        import onnx

        self.trt.record("parse_from_file", path)
        model = onnx.load(path)  # loads the external weights too: a missing data file fails here
        self.network.inputs = [SimpleNamespace(name=i.name) for i in model.graph.input]
        self.network.initializer_types = {onnx.TensorProto.DataType.Name(t.data_type) for t in model.graph.initializer}
        return True

    def get_error(self, i: int) -> str:
        return ""


class _Profile:
    def __init__(self, trt: FakeTensorRT):
        self.trt = trt
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, name: str, min: tuple, opt: tuple, max: tuple) -> None:
        self.trt.record("set_shape", name, tuple(min), tuple(opt), tuple(max))
        self.shapes[name] = (tuple(min), tuple(opt), tuple(max))


class _TimingCache:
    def __init__(self, blob: bytes):
        self.blob = blob

    def serialize(self) -> bytes:
        return self.blob + b"+"  # grows by one byte per build: tests can see it was saved and reused


class _Config:
    def __init__(self, trt: FakeTensorRT):
        self.trt = trt
        self.flags: set[str] = {"TF32"}  # TensorRT enables TF32 by default
        self.profiles: list[dict[str, list]] = []
        self.timing: _TimingCache | None = None

    def set_memory_pool_limit(self, pool: Any, size: int) -> None:
        self.trt.record("set_memory_pool_limit", pool.name, size)

    def set_flag(self, flag: Any) -> None:
        self.trt.record("set_flag", flag.name)
        self.flags.add(flag.name)

    def clear_flag(self, flag: Any) -> None:
        self.trt.record("clear_flag", flag.name)
        self.flags.discard(flag.name)

    def add_optimization_profile(self, profile: _Profile) -> int:
        self.trt.record("add_optimization_profile")
        self.profiles.append({k: [list(s) for s in v] for k, v in profile.shapes.items()})
        return len(self.profiles) - 1

    def create_timing_cache(self, blob: bytes) -> _TimingCache:
        self.trt.record("create_timing_cache", bytes(blob))
        return _TimingCache(bytes(blob))

    def set_timing_cache(self, cache: _TimingCache, ignore_mismatch: bool) -> bool:
        self.trt.record("set_timing_cache", ignore_mismatch)
        self.timing = cache
        return True

    def get_timing_cache(self) -> _TimingCache:
        self.trt.record("get_timing_cache")
        return self.timing


class _Runtime:
    def __init__(self, trt: FakeTensorRT):
        self.trt = trt

    def deserialize_cuda_engine(self, plan: bytes) -> _Engine | None:
        self.trt.record("deserialize_cuda_engine", len(plan))
        if not plan.startswith(b"FAKE-PLAN"):
            return None
        return _Engine(self.trt, json.loads(plan[len(b"FAKE-PLAN") :]))


class _Engine:
    """An engine with the I/O the plan's ONNX graph had: one float32 input, one float32 output."""

    def __init__(self, trt: FakeTensorRT, doc: dict):
        self.trt, self.doc = trt, doc
        self.io = [(doc["input"], trt.TensorIOMode.INPUT), ("probabilities", trt.TensorIOMode.OUTPUT)]

    @property
    def num_io_tensors(self) -> int:
        return len(self.io)

    def get_tensor_name(self, i: int) -> str:
        return self.io[i][0]

    def get_tensor_mode(self, name: str) -> Any:
        return dict(self.io)[name]

    def get_tensor_dtype(self, name: str) -> Any:
        return self.trt.DataType.FLOAT

    def create_execution_context(self) -> _Context:
        self.trt.record("create_execution_context")
        return _Context(self.trt)


class _Context:
    def __init__(self, trt: FakeTensorRT):
        self.trt = trt
        self.addresses: dict[str, int] = {}

    def set_input_shape(self, name: str, shape: tuple) -> bool:
        self.trt.record("set_input_shape", name, tuple(shape))
        return True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.trt.record("set_tensor_address", name, ptr)
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        self.trt.record("execute_async_v3", stream_handle)
        return True


def fake_plan_doc(path: Path) -> dict:
    """What the fake 'built' into a plan file (its input name, flags, profile, graph types)."""
    blob = Path(path).read_bytes()
    assert blob.startswith(b"FAKE-PLAN")
    return json.loads(blob[len(b"FAKE-PLAN") :])
