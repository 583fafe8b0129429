"""Which torch device a run uses: ``"auto"`` (CUDA when torch sees a GPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.

Low in the import graph (errors only; torch imported when called): the runners, training and the
benchmarks resolve devices the same way, with the same one-line errors.
"""

from __future__ import annotations

from .errors import BackendUnavailableError, ConfigError


def resolve_device(device: str):  # -> torch.device
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(
            f"device {device!r} requested but torch sees no CUDA GPU here; use --device cpu (or install a CUDA build of torch)"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise BackendUnavailableError(
            f"device {device!r} requested but torch sees {torch.cuda.device_count()} CUDA GPU(s) (cuda:0 to "
            f"cuda:{torch.cuda.device_count() - 1}); pick one of them or set CUDA_VISIBLE_DEVICES"
        )
    if dev.type == "cuda" and dev.index is None:
        # A bare "cuda" names the current GPU; say which, so that the runner's device equals the
        # device of the tensors it returns (torch.device("cuda") != torch.device("cuda:0")).
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev
