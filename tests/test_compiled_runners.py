"""Many compiled runners of one network class in one process (found on the H200: the GPU tests'
ninth ``torch.compile`` runner failed with "recompile limit exceeded").

Dynamo caches graphs per code object, so every runner of a class (each precision, batch size, tile)
adds an entry to the same ``forward``'s cache; with ``fullgraph=True`` the ninth is a hard failure.
The runner raises the limit before compiling. Checked here with dynamo's ``eager`` backend (no C++
compiler, a fraction of a second per compile) under the process's real dynamo, config restored."""

from __future__ import annotations

import pytest
import torch

from tilefeet.runners.torch_runner import COMPILED_PER_PROCESS, _room_for_compiled_runners

# torch._dynamo is imported by the tests that use it (the fixture below): importing it costs a
# second, and every pytest-xdist worker imports every test module while collecting.

RUNNERS = 12  # more than dynamo's default of 8


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.conv(x))


def compile_runners() -> None:
    """RUNNERS compiled networks of one class, each at its own batch size, as runners build them."""
    for batch in range(1, RUNNERS + 1):
        net = torch.compile(Net(), backend="eager", dynamic=False, fullgraph=True)
        with torch.inference_mode():
            y = net(torch.zeros(batch, 1, 8, 8))
        assert y.shape == (batch, 2, 8, 8)


@pytest.fixture
def fresh_dynamo():
    import torch._dynamo

    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=8, accumulated_recompile_limit=256):
        yield
    torch._dynamo.reset()


def test_dynamos_default_limit_fails_the_ninth_runner(fresh_dynamo):
    """What the runner guards against: without it, the ninth compile of one class fails."""
    with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):
        compile_runners()


def test_a_process_holds_many_compiled_runners_of_one_class(fresh_dynamo):
    _room_for_compiled_runners()
    assert torch._dynamo.config.recompile_limit == COMPILED_PER_PROCESS
    compile_runners()
    _room_for_compiled_runners()  # raising is idempotent and never lowers a larger limit
    torch._dynamo.config.recompile_limit = 2 * COMPILED_PER_PROCESS
    _room_for_compiled_runners()
    assert torch._dynamo.config.recompile_limit == 2 * COMPILED_PER_PROCESS
