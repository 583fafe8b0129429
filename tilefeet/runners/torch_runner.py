"""The torch runner: eager by default; channels-last memory (oneDNN and cuDNN run 3×3 convolutions
much faster that way), reduced precision on request.

Options (``RunnerSpec.options``), each off unless said otherwise:

* ``channels_last`` (on): NHWC memory for the network and its inputs;
* ``compile``: ``torch.compile`` the network (``True`` or an inductor mode such as
  ``"max-autotune-no-cudagraphs"``), compiled once for the runner's fixed shape when it is built;
* ``cuda_graphs``: capture the (eager or compiled) network in a CUDA graph and replay it: the
  shapes are fixed, so one capture serves every batch and Python launch overhead disappears;
* ``tf32`` (CUDA): let fp32 convolutions use TF32. Off, because fp32 should mean fp32 (TF32 keeps
  10 mantissa bits, far from the 1e-4 the conformance suite asks of fp32);
* ``deterministic`` (on, CUDA): cuDNN algorithms that give bit-identical results run to run,
  which tilefeet's "same output whatever the block size" promise needs;
* ``threads`` (CPU): intra-op threads. oneDNN's rounding depends on the thread count, so runs
  that must agree bit for bit across processes (a local run and cluster workers) set it alike.

Thread count and cuDNN flags are process-wide: they are set under the runners' process-wide
:data:`~tilefeet.runners.TORCH_STATE_LOCK`, held for each call that relies on them, so runners
with other settings in the same process (other threads) never run under each other's. Both are
set for the call and restored after it: a run with ``threads=1`` leaves the process's count as it
found it, so a later run with the default rounds as a fresh process would. Without ``threads`` a
call runs at the process's count (:func:`process_threads`), not at the count its thread happens to
hold: ATen gives each thread the count once, when the thread first runs torch work, so dask's
long-lived pool threads kept a count that ``torch.set_num_threads`` had changed since.

The network is the bundle's: tilefeet's U-Net, or a foreign network loaded from its graph file
(a ``torch.export`` program or TorchScript: :func:`tilefeet.models.foreign.load_module`).
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..device import resolve_device
from ..errors import ConfigError
from . import TORCH_STATE_LOCK, Runner, RunnerSpec, check_options

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class TorchOptions:
    """The torch runner's options, validated once against the device."""

    channels_last: bool = True
    compile: str | None = None  #: inductor mode, or None for eager
    cuda_graphs: bool = False
    tf32: bool = False
    deterministic: bool = True

    @classmethod
    def from_spec(cls, spec: RunnerSpec, device: torch.device) -> TorchOptions:
        check_options(spec, {"channels_last", "compile", "cuda_graphs", "tf32", "deterministic", "threads"})
        comp = spec.option("compile", False)
        opts = cls(
            channels_last=bool(spec.option("channels_last", True)),
            compile=("default" if comp is True else str(comp)) if comp else None,
            cuda_graphs=bool(spec.option("cuda_graphs", False)),
            tf32=bool(spec.option("tf32", False)),
            deterministic=bool(spec.option("deterministic", True)),
        )
        if opts.cuda_graphs and device.type != "cuda":
            raise ConfigError(
                f"CUDA graphs need a CUDA device, not {device}; drop the cuda_graphs option or use --device cuda"
            )
        if opts.cuda_graphs and opts.compile in ("reduce-overhead", "max-autotune"):
            raise ConfigError(
                f"compile mode {opts.compile!r} captures CUDA graphs itself; with cuda_graphs use compile mode "
                "'default' or 'max-autotune-no-cudagraphs'"
            )
        return opts

    def describe(self) -> str:
        parts = [f"torch.compile({self.compile})" if self.compile else "eager"]
        parts += ["CUDA graph"] if self.cuda_graphs else []
        parts += ["channels-last"] if self.channels_last else []
        return ", ".join(parts)


class TorchRunner(Runner):
    name = "torch"

    def __init__(self, bundle: Any, spec: RunnerSpec, reason: str = ""):
        super().__init__(bundle, spec, reason)
        self._device = resolve_device(spec.device)
        self.dtype = _DTYPES.get(spec.precision)
        if self.dtype is None:
            raise ConfigError(f"unknown precision {spec.precision!r}; use fp32, fp16 or bf16")
        if self.dtype == torch.float16 and self._device.type == "cpu":
            raise ConfigError("fp16 is not supported by torch on the CPU; use --precision fp32 or bf16")
        self.options = TorchOptions.from_spec(spec, self._device)
        threads = spec.option("threads")
        # oneDNN's rounding depends on it, so equal specs must mean equal threads; set per call (_math).
        self.threads = int(threads) if threads and self._device.type == "cpu" else None
        self.channels_last = self.options.channels_last
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        model = bundle.build_model().to(self._device, dtype=self.dtype, memory_format=self.memory_format)
        self.model = model
        self._forward = self._build_forward()

    @property
    def device(self) -> torch.device:
        return self._device

    def describe(self) -> str:
        return f"{super().describe()}, {self.options.describe()}"

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), self._math():
            x = batch.to(self._device, dtype=self.dtype, memory_format=self.memory_format)
            return self._forward(x)

    # ------------------------------------------------------------------------------ building

    def _build_forward(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Eager, compiled, and/or graph-captured forward; compiled and captured ones are warmed up
        here, so the first block pays nothing and sees no compiler output."""
        opts = self.options
        if opts.compile is None and not opts.cuda_graphs:
            return lambda x: self.model(x).float()
        net = self.model
        if opts.compile is not None:
            _room_for_compiled_runners()
            net = torch.compile(self.model, mode=opts.compile, dynamic=False, fullgraph=True)
        example = torch.zeros(self._shape(), dtype=self.dtype, device=self._device).to(memory_format=self.memory_format)
        with torch.inference_mode(), self._math(), _compiler_noise_silenced():
            if opts.cuda_graphs:
                return _captured(net, example)
            net(example)
        return lambda x: net(x).float()

    def _shape(self) -> tuple[int, ...]:
        return (self.spec.batch_size, self.bundle.in_channels, *self.spec.tile)

    @contextlib.contextmanager
    def _math(self) -> Iterator[None]:
        """This runner's share of torch's process-wide state, under the process-wide lock, restored
        when the call returns."""
        with TORCH_STATE_LOCK:
            if self._device.type == "cpu":
                with _thread_count(self.threads):
                    yield
            elif self._device.type == "cuda":
                with _cudnn_math(tf32=self.options.tf32, deterministic=self.options.deterministic):
                    yield
            else:
                yield


#: Compiled graphs dynamo may keep per code object (a network class's ``forward``) in one process.
COMPILED_PER_PROCESS = 64


def _room_for_compiled_runners() -> None:
    """Let one process hold many compiled runners of one network class.

    Dynamo caches compiled graphs per *code object*, not per module: every runner of the same class
    (each precision, batch size, tile) adds an entry to one ``forward``'s cache, and past
    ``recompile_limit`` (8 by default) a ``fullgraph=True`` compile fails outright ("recompile limit
    exceeded"). A long-lived process (a Dask worker serving several engines and precisions, the GPU
    tests) reaches 8 quickly. Raised, never lowered: calling it again, from any thread, changes nothing."""
    import torch._dynamo

    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the name changed in torch 2.6
        if hasattr(config, name) and getattr(config, name) < COMPILED_PER_PROCESS:
            setattr(config, name, COMPILED_PER_PROCESS)
            break
    if getattr(config, "accumulated_recompile_limit", COMPILED_PER_PROCESS * 4) < COMPILED_PER_PROCESS * 4:
        config.accumulated_recompile_limit = COMPILED_PER_PROCESS * 4


def _captured(
    net: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``net`` captured in a CUDA graph for ``example``'s shape; the returned function copies its
    input into the graph's static input, replays on the current stream, and returns a *copy* of
    the static output (the next replay overwrites it, possibly while the caller still reads)."""
    device = example.device
    static_in = example.clone()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up off the capture: cuDNN autotuning, compilation, allocator
        for _ in range(3):
            net(static_in)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = net(static_in)
    return _GraphReplay(graph, static_in, static_out)


@dataclass(frozen=True)
class _GraphReplay:
    """A captured graph with its static input and output (kept alive together)."""

    graph: Any  # torch.cuda.CUDAGraph
    static_in: torch.Tensor
    static_out: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.static_in.copy_(x)
        self.graph.replay()
        return self.static_out.to(torch.float32, copy=True)


def process_threads() -> int:
    """torch's intra-op thread count for this process: the last ``torch.set_num_threads`` (or
    ``OMP_NUM_THREADS``, or the cores, at start), as a new thread sees it. A thread that already ran
    torch work keeps the count it saw then (ATen sets each thread's OpenMP count once), so the
    calling thread's own ``torch.get_num_threads()`` can be stale; a new thread's cannot."""
    seen: list[int] = []
    reader = threading.Thread(target=lambda: seen.append(torch.get_num_threads()), name="tilefeet-threads")
    reader.start()
    reader.join()
    return seen[0]


@contextlib.contextmanager
def _thread_count(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` (None: the process's count) for the duration
    of a call, then the process's count again (callers hold :data:`~tilefeet.runners.TORCH_STATE_LOCK`).

    ``torch.set_num_threads`` sets both the calling thread's count and the process's (the one new
    threads take), so restoring the calling thread's own count, possibly stale, would change the
    process's; restoring the process's count leaves the process as it was, and the thread current."""
    process, mine = process_threads(), torch.get_num_threads()
    wanted = process if threads is None else threads
    if wanted == mine == process:
        yield
        return
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(process)


@contextlib.contextmanager
def _cudnn_math(*, tf32: bool, deterministic: bool) -> Iterator[None]:
    """cuDNN's TF32 and determinism flags for the duration of a call, restored afterwards (they are
    process-wide: callers hold :data:`~tilefeet.runners.TORCH_STATE_LOCK`)."""
    cudnn: Any = torch.backends.cudnn
    # torch >= 2.9 has per-operator precision flags; mixing them with allow_tf32 is an error.
    holder, attr = (
        (cudnn.conv, "fp32_precision")
        if hasattr(getattr(cudnn, "conv", None), "fp32_precision")
        else (cudnn, "allow_tf32")
    )
    value = ("tf32" if tf32 else "ieee") if attr == "fp32_precision" else tf32
    old_value, old_deterministic = getattr(holder, attr), cudnn.deterministic
    try:
        setattr(holder, attr, value)
        cudnn.deterministic = deterministic
        yield
    finally:
        setattr(holder, attr, old_value)
        cudnn.deterministic = old_deterministic


@contextlib.contextmanager
def _compiler_noise_silenced() -> Iterator[None]:
    """Inductor imports ``torch.utils.mkldnn``, whose TorchScript classes warn that TorchScript is
    deprecated: torch's message to itself, which no user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`torch\.jit\.script_method` is deprecated", category=DeprecationWarning
        )
        yield
