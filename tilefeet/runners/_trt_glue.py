"""The parts of the TensorRT runner that need no TensorRT: profile shapes, how precision is set
for a TensorRT version, plan cache keys, and the I/O binding logic. Plain values and functions,
tested on any machine (``tests/test_tensorrt_glue.py``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from ..errors import BackendUnavailableError, ConfigError, InvalidEngineError

Shape = tuple[int, int, int, int]  #: (batch, channels, height, width)
Typing = Literal["auto", "weak", "strong"]


# --------------------------------------------------------------------------- optimization profile


@dataclass(frozen=True)
class Profile:
    """The input shapes a plan accepts (``min``..``max``, per axis) and the one it is tuned for."""

    min: Shape
    opt: Shape
    max: Shape

    def covers(self, shape: Sequence[int]) -> bool:
        return all(lo <= s <= hi for lo, s, hi in zip(self.min, shape, self.max)) and len(shape) == 4

    def describe(self) -> str:
        if self.min == self.opt == self.max:
            return _fmt(self.opt)
        return f"min {_fmt(self.min)}, opt {_fmt(self.opt)}, max {_fmt(self.max)}"


def make_profile(
    *,
    channels: int,
    divisor: int,
    batch: int,
    tile: tuple[int, int],
    min: str | Shape | None = None,
    opt: str | Shape | None = None,
    max: str | Shape | None = None,
) -> Profile:
    """A profile from the simple form (``batch`` and ``tile``: the one shape tilefeet's runners use,
    so min = opt = max) or from explicit ``min``/``opt``/``max`` shapes (``"BxHxW"``, ``"BxS"``),
    any of which default to the simple form's shape."""
    fixed: Shape = (batch, channels, *tile)
    shapes = [
        fixed if s is None else (parse_shape(s, channels) if isinstance(s, str) else tuple(s)) for s in (min, opt, max)
    ]
    profile = Profile(*shapes)  # type: ignore[arg-type]
    _check_profile(profile, channels, divisor)
    return profile


def parse_shape(text: str, channels: int) -> Shape:
    """``"8x1024x768"`` (batch × height × width) or ``"8x1024"`` (square tiles) → ``(8, C, 1024, 768)``."""
    parts = [p for p in re.split(r"[x×,]", text.strip().lower()) if p]
    try:
        n = [int(p) for p in parts]
    except ValueError:
        n = []
    if len(n) == 2:
        n.append(n[1])
    if len(n) != 3:
        raise ConfigError(
            f"cannot read the shape {text!r}; write BATCHxHEIGHTxWIDTH (8x1024x1024) or BATCHxSIDE (8x1024)"
        )
    return (n[0], channels, n[1], n[2])


def _check_profile(p: Profile, channels: int, divisor: int) -> None:
    for name, shape in (("min", p.min), ("opt", p.opt), ("max", p.max)):
        if len(shape) != 4 or min(shape) < 1 or shape[1] != channels:
            raise ConfigError(
                f"profile {name} shape {shape} must be 4 positive sizes (batch, {channels}, height, width)"
            )
        if shape[2] % divisor or shape[3] % divisor:
            raise ConfigError(
                f"profile {name} tile {shape[2]}x{shape[3]} must be a multiple of the network's divisor {divisor}"
            )
    if not (all(a <= b for a, b in zip(p.min, p.opt)) and all(a <= b for a, b in zip(p.opt, p.max))):
        raise ConfigError(f"profile shapes must grow from min to opt to max on every axis, got {p.describe()}")


def _fmt(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


# ----------------------------------------------------------------------------------- precision


@dataclass(frozen=True)
class PrecisionMode:
    """How a plan gets its precision on the TensorRT at hand.

    TensorRT 10 is weakly typed by default: the graph is fp32 and builder flags (``FP16``, ``BF16``)
    let TensorRT pick reduced-precision kernels. TensorRT 11 removed those flags: every network is
    strongly typed and computes in the types the ONNX graph declares, so reduced precision must be
    exported into the graph (:func:`tilefeet.runners.onnx_export.export_onnx`).
    """

    precision: str  #: what the user asked for
    strongly_typed: bool
    onnx_precision: str  #: which export to parse
    set_flags: tuple[str, ...] = ()  #: ``BuilderFlag`` names to set
    clear_flags: tuple[str, ...] = ()  #: ``BuilderFlag`` names to clear

    def describe(self) -> str:
        if self.strongly_typed:
            return f"strongly typed, {self.precision} from the {self.onnx_precision} ONNX graph"
        flags = ", ".join(f"BuilderFlag.{f}" for f in self.set_flags) or "no precision flags"
        return f"weakly typed, {flags} on the fp32 ONNX graph"


def precision_mode(
    precision: str, *, trt_version: str, has_flag: Callable[[str], bool], typing: Typing = "auto", tf32: bool = False
) -> PrecisionMode:
    """Choose weak (builder flags) or strong typing for ``precision`` on a TensorRT version.

    ``has_flag(name)`` says whether ``tensorrt.BuilderFlag`` has ``name`` (the feature test, which
    also covers 10.x point releases). ``auto``: builder flags where they exist (10.x), strong typing
    where they do not (11.x). fp32 clears ``TF32`` (on by default in TensorRT) unless ``tf32``.
    """
    if precision not in ("fp32", "fp16", "bf16"):
        raise ConfigError(f"unknown precision {precision!r}; use fp32, fp16 or bf16")
    if typing not in ("auto", "weak", "strong"):
        raise ConfigError(f"unknown typing {typing!r}; use auto, weak or strong")
    weak_possible = precision == "fp32" or has_flag(precision.upper())
    if typing == "weak" and not weak_possible:
        raise ConfigError(
            f"TensorRT {trt_version} has no BuilderFlag.{precision.upper()} (TensorRT 11 is strongly typed only); "
            "use typing 'strong' or 'auto'"
        )
    strong = typing == "strong" or (typing == "auto" and not (has_flag("FP16") and weak_possible))
    clear = ("TF32",) if precision == "fp32" and not tf32 and has_flag("TF32") else ()
    if strong:
        return PrecisionMode(precision, True, precision, (), clear)
    flags = () if precision == "fp32" else (precision.upper(),)
    return PrecisionMode(precision, False, "fp32", flags, clear)


# ----------------------------------------------------------------------------------- plan cache


@dataclass(frozen=True)
class DeviceInfo:
    """The GPU a plan is built for: plans only run on the GPU model and TensorRT that built them."""

    name: str  #: e.g. "NVIDIA H200"
    capability: tuple[int, int]  #: compute capability, e.g. (9, 0)

    @classmethod
    def of(cls, device: Any) -> DeviceInfo:
        import torch

        return cls(torch.cuda.get_device_name(device), tuple(torch.cuda.get_device_capability(device)))  # type: ignore[arg-type]

    @property
    def sm(self) -> str:
        return f"sm{self.capability[0]}{self.capability[1]}"


@dataclass(frozen=True)
class PlanKey:
    """Everything a serialized plan depends on. Two builds with equal keys are interchangeable."""

    device: DeviceInfo
    trt_version: str
    onnx_sha256: str
    profile: Profile
    precision: str
    strongly_typed: bool
    tf32: bool = False

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()

    def filename(self, engine_name: str) -> str:
        parts = (_slug(engine_name), _slug(self.device.name), self.device.sm, f"trt{self.trt_version}", self.precision)
        return f"{'-'.join(parts)}-{self.digest()[:16]}.plan"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> PlanKey:
        d = json.loads(text)
        dev = DeviceInfo(d["device"]["name"], tuple(d["device"]["capability"]))  # type: ignore[arg-type]
        prof = Profile(*(tuple(d["profile"][k]) for k in ("min", "opt", "max")))  # type: ignore[arg-type]
        return cls(
            dev, d["trt_version"], d["onnx_sha256"], prof, d["precision"], d["strongly_typed"], d.get("tf32", False)
        )

    def same_but_profile(self, other: PlanKey) -> bool:
        return replace(self, profile=other.profile) == other


def plan_path(cache_root: Path, key: PlanKey, engine_name: str) -> Path:
    return cache_root / "tensorrt" / key.filename(engine_name)


def find_covering_plan(cache_root: Path, key: PlanKey) -> tuple[Path, PlanKey] | None:
    """A cached plan equal to ``key`` in all but its profile, whose profile spans ``key``'s
    min..max: what a wide ``build-engine --min/--opt/--max`` build leaves for later runs to use.
    Among several, the one tuned (opt) closest to ``key``'s opt shape."""
    found = []
    for meta in sorted((cache_root / "tensorrt").glob("*.json")):
        plan = meta.with_suffix(".plan")
        try:
            other = PlanKey.from_json(meta.read_text())
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if (
            plan.is_file()
            and key.same_but_profile(other)
            and other.profile.covers(key.profile.min)
            and other.profile.covers(key.profile.max)
        ):
            distance = sum(abs(a - b) for a, b in zip(other.profile.opt, key.profile.opt))
            found.append((distance, str(plan), other))
    if not found:
        return None
    _, best, other = min(found, key=lambda t: (t[0], t[1]))
    return Path(best), other


def timing_cache_path(cache_root: Path, device: DeviceInfo, trt_version: str) -> Path:
    """One timing cache per GPU model and TensorRT version, shared by every plan built there."""
    return cache_root / "tensorrt" / f"timing-{_slug(device.name)}-{device.sm}-trt{trt_version}.cache"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "x"


def parse_size(text: str | int) -> int:
    """``"4GiB"``, ``"512MiB"``, ``"2G"`` or a number of bytes → bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*", text.lower())
    if not m:
        raise ConfigError(f"cannot read the size {text!r}; write e.g. 4GiB, 512MiB or a number of bytes")
    scale = 1024 ** " kmgt".index(m.group(2) or " ")
    return int(float(m.group(1)) * scale)


# ---------------------------------------------------------------------------------- I/O binding


@dataclass(frozen=True)
class IOTensor:
    name: str
    is_input: bool
    dtype: str  #: TensorRT's DataType name, e.g. "FLOAT"


@dataclass(frozen=True)
class IOBinding:
    """The engine's one input and one output (tilefeet's graphs have exactly these)."""

    input: str
    output: str


def resolve_io(tensors: Sequence[IOTensor]) -> IOBinding:
    """Check an engine's I/O against the runner contract: one float32 input, one float32 output."""
    inputs = [t for t in tensors if t.is_input]
    outputs = [t for t in tensors if not t.is_input]
    if len(inputs) != 1 or len(outputs) != 1:
        raise InvalidEngineError(
            f"a tilefeet plan has one input and one output; this one has inputs {[t.name for t in inputs]} and outputs "
            f"{[t.name for t in outputs]}: delete it and rebuild"
        )
    for t in (*inputs, *outputs):
        if t.dtype != "FLOAT":
            raise InvalidEngineError(
                f"plan tensor {t.name!r} is {t.dtype}, expected FLOAT (float32 I/O): delete the plan and rebuild"
            )
    return IOBinding(inputs[0].name, outputs[0].name)


def enqueue(context: Any, io: IOBinding, x: Any, out: Any, stream_handle: int) -> None:
    """Point the execution context at ``x`` and ``out`` (device tensors, contiguous) and enqueue
    one inference on the CUDA stream ``stream_handle``: no copies, no host synchronization."""
    for name, tensor in ((io.input, x), (io.output, out)):
        if not context.set_tensor_address(name, tensor.data_ptr()):
            raise BackendUnavailableError(f"TensorRT refused the address of tensor {name!r}")
    if not context.execute_async_v3(stream_handle):
        raise BackendUnavailableError(
            "TensorRT could not enqueue the inference (execute_async_v3 returned False; see its log above)"
        )
