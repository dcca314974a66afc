"""The run's one ``accelerate.Accelerator``, in a single process as under ``accelerate launch``.

It does autocast (``mixed_precision`` "no", "bf16", "fp16"), the GradScaler (fp16 on CUDA only:
accelerate makes none on CPU, where fp16 autocast does not run either), gradient accumulation
(``accumulate`` + ``backward``, which divides the loss; DDP skips the all-reduce on the
accumulating micro-batches), clipping (``clip_grad_norm_``, after unscaling), the DDP wrapper
with several processes, and the checkpoint state (``save_state``/``load_state``: network,
optimizer, LR schedule, scaler, RNG states per process and the loop's registered
:class:`~.progress.Progress`).

Only the LyCORIS network's weights go into the state (``model.safetensors``): the
save/load hooks replace the prepared module's full state dict (the frozen denoiser included)
by the network's own. The LR schedule steps once per optimizer step, whatever the number of
processes (``step_scheduler_with_optimizer=False``: the loop steps it itself, as before).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from .checkpoint import (
    NETWORK_FILE,
    Checkpoint,
    CheckpointError,
    abandon_checkpoint,
    begin_checkpoint,
    checkpoint_at,
    finish_checkpoint,
    load_state,
    staging_state,
)
from .progress import Progress

logger = logging.getLogger(__name__)


def launched_distributed() -> bool:
    """Whether this process is one of several (``accelerate launch``/``torchrun``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def new_accelerator(precision: str, grad_accum: int, device: torch.device | None) -> Any:
    """An Accelerator for one run. `device`: where the model is (None when distributed:
    the model is then loaded onto the accelerator's device)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    if launched_distributed():
        cpu = not torch.cuda.is_available()  # without a GPU only cpu=True forms a gloo group
    else:
        # accelerate keeps one process-wide state that refuses another precision or device;
        # a single process (ComfyUI, tests) runs many trainings, each with its own settings
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        cpu = device is not None and device.type == "cpu"
    if precision == "fp16" and cpu:
        logger.warning("mixed_precision fp16 does not autocast on CPU: training in fp32; use bf16")
    return Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=grad_accum,
        cpu=cpu,
        device_placement=False,  # the model stays where it was loaded
        step_scheduler_with_optimizer=False,
    )


class Trainable(torch.nn.Module):
    """Denoiser + LyCORIS network as one module (DDP needs the trainable parameters inside
    the module whose forward it runs; lycoris keeps its modules outside the denoiser)."""

    def __init__(self, denoiser: torch.nn.Module, net: torch.nn.Module):
        super().__init__()
        self.denoiser = denoiser
        self.net = net

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.denoiser(*args, **kwargs)


class Engine:
    """The accelerator with the run's prepared module, optimizer and LR schedule."""

    def __init__(
        self,
        accelerator: Any,
        denoiser: torch.nn.Module,
        net: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        progress: Progress,
    ):
        self.accelerator = accelerator
        self.net = net
        self.model, self.optimizer, self.scheduler = accelerator.prepare(
            Trainable(denoiser, net), optimizer, scheduler
        )
        accelerator.register_for_checkpointing(progress)
        accelerator.register_save_state_pre_hook(self._save_network)
        accelerator.register_load_state_pre_hook(self._load_network)

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def gather_state(self, generator: torch.Generator) -> torch.Tensor:
        """Every process's state of its own `generator`, [processes, bytes] on the CPU."""
        state = generator.get_state()[None].to(self.accelerator.device)
        return self.accelerator.gather(state).cpu()

    # ------------------------------------------------------------------ checkpoint state
    def _save_network(self, models: list, weights: list, output_dir: str) -> None:
        weights[:] = [{k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}]

    def _load_network(self, models: list, input_dir: str) -> None:
        from safetensors.torch import load_file

        models.clear()  # the network is loaded here, not the whole prepared module
        self.net.load_state_dict(load_file(str(Path(input_dir) / NETWORK_FILE)))

    def save(
        self,
        folder: Path,
        step: int,
        adapter: dict[str, torch.Tensor],
        metadata: dict[str, str],
        spec: dict[str, Any],
    ) -> Checkpoint:
        """Checkpoint `step` under `folder`: every process writes its part of the state into
        one temporary folder, then the main process adds adapter + spec and renames it."""
        ckpt = checkpoint_at(folder, step)
        if ckpt.path.exists():  # the same step written again (e.g. cancel right after a save)
            return ckpt
        if self.is_main:
            begin_checkpoint(folder, step)
        self.barrier()
        try:
            self.accelerator.save_state(str(staging_state(folder, step)))
            self.barrier()
            if self.is_main:
                finish_checkpoint(folder, step, adapter, metadata, spec)
        except BaseException:
            if self.is_main:
                abandon_checkpoint(folder, step)
            raise
        self.barrier()
        return ckpt

    def load(self, ckpt: Checkpoint) -> None:
        """Restore network, optimizer, schedule, scaler, RNG states and progress."""
        # accelerate unpickles registered objects in full; the progress file must first read
        # back with weights_only=True (plain data), so a foreign checkpoint cannot run code
        load_state(ckpt)
        try:
            self.accelerator.load_state(str(ckpt.state))
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(
                f"{ckpt.state}: cannot be restored ({exc}); resume from an earlier checkpoint, "
                "with the same config and number of processes as the run that wrote it"
            ) from None
