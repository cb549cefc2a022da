"""A run's processes: the device and torchrun process group (Dist), the DDP / FSDP2 wrapping,
and the stop on SIGINT / SIGTERM / SIGHUP that every rank agrees on (StopRequest)."""

from __future__ import annotations

import os
import signal
import threading
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import TrainError


def pick_device(name: str) -> torch.device:
    """cfg.device with auto resolved; "cuda" is the rank's own GPU (torchrun's LOCAL_RANK), chosen
    before NCCL starts and made current (NCCL and Triton launch on the current device)."""
    dev = name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError(f"device {dev}: torch sees no CUDA GPU here (use --device cpu or auto)")
    if dev == "cuda":
        dev = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if dev.startswith("cuda"):
        count = torch.cuda.device_count()
        if torch.device(dev).index >= count:
            raise TrainError(f"device {dev}: torch sees {count} CUDA GPU{'s' * (count > 1)} here "
                             f"(cuda:0 to cuda:{count - 1})")
        torch.cuda.set_device(dev)
    return torch.device(dev)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device_type: str) -> "Dist":
        """torchrun's RANK / WORLD_SIZE; a process group (nccl or gloo) if world > 1."""
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size())

    def all_sum(self, values: list[float], device) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self):
        if self.world > 1:
            dist.barrier()


def wrap(model: torch.nn.Module, world: int, device: torch.device, fsdp: bool, ignore=()) -> torch.nn.Module:
    """The model as the ranks train it: itself alone, DDP, or FSDP2-sharded (in place). DDP leaves
    the parameters named in `ignore` out of its buckets (sparse gradients: the caller averages them;
    they start equal on every rank, as every rank initialises or loads the same weights)."""
    if world == 1:
        return model
    if not fsdp:
        ids = [device.index] if device.type == "cuda" else None
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(ignore))
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    # TimeMix returns views (e.g. v_first); the model never updates them in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    # Units that gather their parameters: each block's time mix and Meta-State layer (one at a
    # time, a lower peak than whole blocks); the root holds emb, the norms and head.
    for block in model.blocks:
        fully_shard(block.att)
        fully_shard(block.meta)
    fully_shard(model)
    return model


class TrainInterrupted(KeyboardInterrupt):
    """A signal stopped the run after a checkpoint of the step reached was saved. A
    KeyboardInterrupt, so that a caller's `except Exception` does not carry on as if training
    had finished. .signal: its name; .result: what `Trainer.fit` returns."""

    def __init__(self, signal_name: str, result: dict):
        super().__init__(f"{signal_name} at step {result['step']}: checkpoint {result['checkpoint']}")
        self.signal, self.result = signal_name, result


class StopRequest:
    """SIGINT (Ctrl-C), SIGTERM (a scheduler's preemption) and SIGHUP (a closed terminal) during
    `Trainer.fit`: the step in progress finishes, a checkpoint is saved and the run stops
    (TrainInterrupted), so that `resume="auto"` continues it exactly. A second Ctrl-C stops at
    once, unsaved. A signal the process ignores (SIG_IGN, as nohup sets SIGHUP) stays ignored."""

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))

    def __init__(self, announce: bool):
        self.announce, self.received, self._previous = announce, set(), {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # Python's handlers live there only
            for s in self.SIGNALS:
                if signal.getsignal(s) is not signal.SIG_IGN:
                    self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received.add(signum)
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if self.announce:  # os.write: a print here could re-enter a write the signal interrupted
            again = " (Ctrl-C again: stop at once, unsaved)" if signum == signal.SIGINT else ""
            os.write(2, f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint and "
                        f"stopping{again}\n".encode())

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: not set from Python

    def agreed(self, ranks: Dist, device) -> str | None:
        """The signal that stops the run, decided alike on every rank (a signal may reach only some);
        None to go on."""
        flags = ranks.all_sum([float(s in self.received) for s in self.SIGNALS], device)
        got = [s for s, f in zip(self.SIGNALS, flags) if f]
        return signal.Signals(got[-1]).name if got else None
