"""Ray Train's torch backend (``TorchTrainer``'s), driven from processes that never import torch, and the trainer.

``TorchTrainer`` hands its ``TorchConfig`` to Ray Train's controller, and unpickling it imports torch there
(about 0.35 GB in a long-lived process that only coordinates); importing ``TorchTrainer`` does the same in
the driver. ``DistributedTorch`` is the same backend for ``DataParallelTrainer``: each step that touches
torch (the rendezvous environment, ``init_process_group``, the CUDA device around the training function,
the teardown) runs Ray's own ``ray.train.torch.config`` function, imported inside the training workers.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import ray
from ray._private.worker import get_dashboard_url
from ray.train._internal.utils import get_address_and_port
from ray.train.backend import Backend, BackendConfig
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.train.v2._internal.util import TrainingFramework
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

logger = logging.getLogger(__name__)


def _in_worker(step: str, **kwargs: Any) -> Any:
    """Run one of Ray's torch backend steps (a function of ``ray.train.torch.config``) in this worker."""
    from ray.train.torch import config

    return getattr(config, step)(**kwargs)


def _set_master(addr: str, port: int) -> None:
    os.environ["MASTER_ADDR"] = addr
    os.environ["MASTER_PORT"] = str(port)


class _CudaDevice:
    """Around the training function: the worker's CUDA device as the current one (``TorchConfig``'s)."""

    def __enter__(self) -> None:
        from ray.train.torch.config import TorchConfigContextManager

        self._context = TorchConfigContextManager()
        self._context.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._context.__exit__(*exc)


class _Backend(Backend):
    share_cuda_visible_devices: bool = True

    def on_start(self, worker_group: Any, backend_config: DistributedTorch) -> None:
        """Rendezvous at rank 0's address, then ``init_process_group`` on every worker (env:// init)."""
        addr, port = worker_group.execute_single(0, get_address_and_port)
        worker_group.execute(_set_master, addr=addr, port=port)
        worker_group.execute(_in_worker, step="_set_torch_distributed_env_vars")
        setups = [
            worker_group.execute_single_async(
                rank,
                _in_worker,
                step="_setup_torch_process_group",
                backend=backend_config.backend,
                world_rank=rank,
                world_size=len(worker_group),
                init_method="env://",
                timeout_s=backend_config.timeout_s,
            )
            for rank in range(len(worker_group))
        ]
        ray.get(setups)

    def on_shutdown(self, worker_group: Any, backend_config: DistributedTorch) -> None:
        teardown = worker_group.execute_async(
            _in_worker, step="_shutdown_torch", destroy_process_group=len(worker_group) > 1
        )
        try:
            ray.get(teardown, timeout=30)
        except ray.exceptions.GetTimeoutError:
            logger.warning("torch process group shutdown timed out after 30 s")


@dataclass
class DistributedTorch(BackendConfig):
    """``TorchConfig`` for a torch-free driver: ``backend`` "gloo" (CPU) or "nccl" (GPU)."""

    backend: str = "gloo"
    timeout_s: int = 1800

    @property
    def backend_cls(self) -> type[Backend]:
        return _Backend

    @property
    def train_func_context(self) -> type[_CudaDevice]:
        return _CudaDevice

    @property
    def framework(self) -> TrainingFramework:
        return TrainingFramework.TORCH

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "timeout_s": self.timeout_s}


class Trainer(DataParallelTrainer):
    """``DataParallelTrainer`` that leaves out the placement-group cleaner on a cluster without a dashboard.

    The cleaner is a detached actor that asks the state API (served by the dashboard) whether the
    controller is alive, to free the workers' placement group if it died. Without a dashboard it can never
    find out: it logs a warning every few seconds for the whole run and holds a process (about 120 MB).
    """

    def _create_default_callbacks(self) -> list:
        callbacks = super()._create_default_callbacks()
        if get_dashboard_url():
            return callbacks
        return [c for c in callbacks if not isinstance(c, PlacementGroupCleanerCallback)]
