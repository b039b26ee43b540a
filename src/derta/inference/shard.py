"""Data-parallel evaluation: under torchrun / accelerate launch, batch k belongs to process k % world."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass


def launched_processes() -> str | None:
    """None in a single process; under torchrun / accelerate launch (WORLD_SIZE > 1), "gpu", or "cpu" on a machine
    without an accelerator (accelerate then needs to be told: it would otherwise run each process alone)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch

    accel = getattr(torch, "accelerator", None)
    return "gpu" if (accel.is_available() if accel is not None else torch.cuda.is_available()) else "cpu"


@dataclass
class Shard:
    """This process's share of a data-parallel run: batch k belongs to rank k % world.

    From the launcher's environment (torchrun, accelerate launch: WORLD_SIZE > 1); `state` is accelerate's
    PartialState then (it joins the process group: gloo on CPU, nccl on GPUs). One process: rank 0 of 1.
    """

    rank: int = 0
    world: int = 1
    state: object = None

    @classmethod
    def from_env(cls) -> Shard:
        if not launched_processes():
            return cls()
        from accelerate import PartialState

        state = PartialState(cpu=launched_processes() == "cpu")
        return cls(state.process_index, state.num_processes, state)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> str | None:
        return None if self.state is None else str(self.state.device)

    def mine(self, k: int) -> bool:
        return k % self.world == self.rank

    def wait(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def gather(self, items: list) -> list:
        """Every process's `items`, concatenated (rank order); the list itself on one process."""
        if self.state is None:
            return items
        from accelerate.utils import gather_object

        return gather_object(items)


def leave_process_group(finished: bool) -> None:
    """Tear down the process group this process joined (torchrun, accelerate launch), if any, before it exits.

    Left to interpreter shutdown, gloo's threads can be destroyed while still joinable, which aborts the process
    ("terminate called without an active exception", SIGABRT) after its work is done. A run that `finished`
    waits for the others first, so no process leaves while another still talks to it; a failed one leaves at once.
    """
    torch = sys.modules.get("torch")  # a command that never imported torch joined no group
    if torch is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    if finished:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()
