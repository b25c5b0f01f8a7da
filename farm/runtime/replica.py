"""The replica actor: one ``RowProcessor`` (one model copy) pinned to the GPU(s) Ray assigned it."""

from __future__ import annotations

import os
import socket
from typing import Any

import ray

from farm.config import JobSpec
from farm.records import Outcome


class Replica:
    """Loads the model once in ``__init__``; ``process`` is called concurrently (threaded actor) to overlap rows."""

    def __init__(self, job: JobSpec, name: str) -> None:
        from farm import secrets
        from farm.worker import RowProcessor

        secrets.remember(job.model_dump(mode="json"))  # replica logs are scrubbed of the job's secrets too
        secrets.install_log_filter()
        self.gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        device = "cuda" if self.gpu_ids and _cuda_available() else "cpu"
        self.name = name
        self.node_id = ray.get_runtime_context().get_node_id()
        self.node = f"{socket.gethostname()}:{self.node_id[:8]}"
        self.processor = RowProcessor(job, replica=name, device=device)

    def info(self) -> dict[str, Any]:
        return {
            "replica": self.name,
            "node": self.node,
            "node_id": self.node_id,
            "gpu_ids": self.gpu_ids,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "pid": os.getpid(),
            "device": self.processor.device,
            "fingerprint": self.processor.backend.fingerprint(),
            "model": self.processor.backend.describe(),
        }

    def process(self, task: dict[str, Any]) -> Outcome:
        outcome = self.processor.process(task)
        outcome.record.set(node=self.node, gpu_ids=",".join(self.gpu_ids))
        return outcome

    def ping(self) -> str:
        """Answers while the process lives (the pool probes a replica that stopped answering)."""
        return self.node_id

    def stats(self) -> dict[str, float]:
        return self.processor.stats()


def _cuda_available() -> bool:
    """Whether this node has an NVIDIA driver, without importing torch (seconds per replica on a small CPU).

    Fake GPUs (``ray.init(num_gpus=N)`` on a CPU machine) have GPU ids but no driver: replicas then run on CPU.
    """
    return os.path.exists("/proc/driver/nvidia/version") or os.environ.get("FARM_ASSUME_CUDA") == "1"


RemoteReplica = ray.remote(Replica)
