"""A low-overhead training step: fused optimizer, optional ``torch.compile``, whole step in one CUDA graph.

An MLP autoencoder step launches ~100 small kernels; at batch 1,024 on an H100 Python and Lightning spend
longer launching them than the GPU spends running them. ``module.compile`` chooses how much of that to
remove:

* ``none`` (default): plain Lightning automatic optimization, eager kernels;
* ``model``: ``torch.compile`` of the network's forward (fewer, fused kernels; backward too);
* ``graph``: the whole step (forward, loss, backward, optimizer update) captured once in a CUDA graph and
  replayed for every batch of the same shape, one launch per step. Uses manual optimization and a
  capturable optimizer whose learning rate lives in a device tensor, so schedulers still take effect.
  Off CUDA the same step runs eagerly, which is what the CPU tests exercise.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import pytorch_lightning as pl
import torch

from exprae.errors import ConfigError

log = logging.getLogger(__name__)

CompileMode = Literal["none", "model", "graph"]
COMPILE_MODES = ("none", "model", "graph")
GRAPH_WARMUP_STEPS = 3  # eager steps before capture, on a side stream, as CUDA graph capture requires


def check_compile_mode(value: str) -> CompileMode:
    """Validate ``module.compile``."""
    if value not in COMPILE_MODES:
        raise ValueError(f"module.compile must be one of {list(COMPILE_MODES)}, got {value!r}")
    return value


def check_graph_supported(trainer: pl.Trainer) -> None:
    """Refuse ``module.compile=graph`` where its single captured step cannot run: several devices, 16-bit AMP."""
    if trainer.world_size > 1:
        raise ConfigError(
            "module.compile=graph captures a single-device step; with several devices use compile=none or model"
        )
    if str(trainer.precision).startswith("16"):
        raise ConfigError(
            f"module.compile=graph does not support precision={trainer.precision} (its grad scaler checks for "
            "infs on the host every step); use bf16-mixed or 32-true"
        )


def build_optimizer(
    factory: Callable[..., torch.optim.Optimizer],
    params: Iterable[torch.nn.Parameter],
    *,
    device: torch.device,
    capturable: bool = False,
) -> torch.optim.Optimizer:
    """Call the configured optimizer; on CUDA pick the fused kernel where the config leaves ``fused`` null.

    With ``capturable=True`` (a step captured in a CUDA graph) the optimizer keeps its step count on the
    device and its learning rate in a device tensor, which schedulers update in place.
    """
    fn = factory.func if isinstance(factory, functools.partial) else factory
    given = dict(factory.keywords) if isinstance(factory, functools.partial) else {}
    accepted = inspect.signature(fn).parameters
    name = getattr(fn, "__name__", repr(fn))
    kwargs: dict[str, Any] = {}
    if "fused" in accepted and given.get("fused") is None:
        kwargs["fused"] = device.type == "cuda"
    if capturable:
        if "capturable" not in accepted:
            raise ValueError(
                f"module.compile=graph needs an optimizer with a capturable mode (Adam, AdamW); got {name}"
            )
        kwargs["capturable"] = True
        lr = given.get("lr", accepted["lr"].default if "lr" in accepted else None)
        if isinstance(lr, (int, float)):
            kwargs["lr"] = torch.tensor(float(lr), device=device)
    return factory(params=params, **kwargs)


def count_optimizer_step(trainer: pl.Trainer) -> None:
    """Record one optimizer step with Lightning, as ``LightningOptimizer.step`` would.

    A replayed graph bypasses ``LightningOptimizer.step``; without this ``global_step`` (and with it
    ``max_steps``, checkpoint names and step-based logging) would stay at 0.
    """
    progress = trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
    progress.increment_ready()
    progress.increment_completed()


def step_epoch_schedulers(schedulers: Any, metrics: Mapping[str, Any], *, monitor: str) -> None:
    """Step epoch-interval schedulers at an epoch's end (Lightning leaves this to manual optimization)."""
    if schedulers is None:
        return
    for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            if monitor in metrics:  # absent on epochs without validation, as Lightning then skips it too
                scheduler.step(float(metrics[monitor]))
        else:
            scheduler.step()


class TrainStep:
    """One optimizer step on a dict batch (forward, loss, backward, update), eager or replayed from a CUDA graph.

    With ``graph=True`` the first :data:`GRAPH_WARMUP_STEPS` steps run eagerly on a side stream; the next
    batch is copied into static input tensors and the step is captured, then replayed (capture records
    kernels without running them), so the sequence of updates is the eager one. Every later batch of the
    captured shapes is copied into the static inputs and replays the graph. A batch of other shapes (an
    epoch's smaller last batch) runs eagerly on the same parameters, gradients and optimizer state.

    The graph reads and writes fixed addresses: the static inputs, the parameters, their ``.grad`` tensors
    and the optimizer state. This object holds the static tensors and the graph; gradients are never set to
    None after capture, so they stay where the graph writes them.
    """

    def __init__(
        self,
        loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        optimizer: torch.optim.Optimizer,
        *,
        graph: bool,
        backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
        warmup_steps: int = GRAPH_WARMUP_STEPS,
    ) -> None:
        self.loss_fn, self.optimizer, self.use_graph, self.warmup_steps = loss_fn, optimizer, graph, warmup_steps
        self.backward = backward  # eager steps: Lightning's manual_backward (DDP, precision hooks)
        self.eager_steps = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_batch: dict[str, torch.Tensor] = {}
        self.static_loss: torch.Tensor | None = None
        self._signature: tuple | None = None

    @staticmethod
    def signature(batch: Mapping[str, torch.Tensor]) -> tuple:
        """Keys, shapes, dtypes and aliasing (target is the input) of a batch: what a graph is valid for."""
        first_of: dict[int, str] = {}
        return tuple((k, tuple(v.shape), v.dtype, first_of.setdefault(id(v), k)) for k, v in sorted(batch.items()))

    def _body(self, batch: dict[str, torch.Tensor], backward: Callable[[torch.Tensor], None]) -> torch.Tensor:
        loss = self.loss_fn(batch)
        backward(loss)
        self.optimizer.step()
        return loss.detach()

    def _eager(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # Before capture gradients are dropped (capture then owns fresh ones); after, zeroed in place.
        self.optimizer.zero_grad(set_to_none=self.graph is None)
        self.eager_steps += 1
        return self._body(batch, self.backward)

    def _warmup(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        current = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            loss = self._eager(batch)
        current.wait_stream(side)
        return loss

    def _capture(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        clones: dict[int, torch.Tensor] = {}
        self.static_batch = {k: clones.setdefault(id(v), v.clone()) for k, v in batch.items()}
        self._signature = self.signature(batch)
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            # Plain backward: the graph path is single-device without a grad scaler (the module checks),
            # and Python hooks would run only once, at capture.
            self.static_loss = self._body(self.static_batch, torch.Tensor.backward)
        self.graph = graph
        self.graph.replay()  # capture ran nothing: this is the step for this batch
        return self.static_loss.clone()

    def _replay(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        copied: set[int] = set()
        for k, v in batch.items():
            if id(v) not in copied:
                self.static_batch[k].copy_(v, non_blocking=True)
                copied.add(id(v))
        self.graph.replay()
        return self.static_loss.clone()  # the next replay overwrites static_loss

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Take one optimizer step on ``batch``; return its (detached) loss, on the device, without a sync."""
        on_cuda = all(v.is_cuda for v in batch.values())
        if not (self.use_graph and on_cuda):
            return self._eager(batch)
        if self.graph is not None:
            return self._replay(batch) if self.signature(batch) == self._signature else self._eager(batch)
        if self.eager_steps < self.warmup_steps:
            return self._warmup(batch)
        return self._capture(batch)
