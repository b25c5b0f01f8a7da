"""The replica actor: one ``RowProcessor`` (one model copy) pinned to the GPU(s) Ray assigned it."""

from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
import traceback
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
        _log_to_stderr()
        secrets.install_log_filter()
        self.gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        device = "cuda" if self.gpu_ids and _cuda_available() else "cpu"
        self.name = name
        self.node_id = ray.get_runtime_context().get_node_id()
        self.node = f"{socket.gethostname()}:{self.node_id[:8]}"
        try:
            self.processor = RowProcessor(job, replica=name, device=device)
        except Exception as exc:  # noqa: BLE001 - the loader's one line goes to the driver, the rest to a file
            raise start_failure(name, self.node, exc) from None

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


def _log_to_stderr() -> None:
    """The replica's ``farm`` log lines (model-load phases) on its stderr, which Ray forwards to the driver's
    terminal prefixed with the actor; Python would drop INFO lines of a logger without a handler."""
    logger = logging.getLogger("farm")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


class ReplicaStartError(RuntimeError):
    """A replica could not load its model. The message is the loader's own line (``MissingWeightsFile: ...``) and
    where the full traceback is; the pool shows it to the user as it is."""


def start_failure(name: str, node: str, exc: BaseException) -> ReplicaStartError:
    """Write ``exc``'s traceback to a log file on this node, send everything the dying process prints after it
    there too (Ray's creation-task report, native abort dumps: otherwise forwarded to the driver's terminal), and
    return the one-line error for the driver."""
    path = _log_path(name)
    try:
        with open(path, "a") as fh:
            traceback.print_exception(exc, file=fh)
        _redirect_output(path)
        where = f"full traceback in {path} on {node}"
    except OSError as err:
        where = f"no log file ({err})"
    first = (str(exc).strip().splitlines() or [""])[0]
    return ReplicaStartError(f"{type(exc).__name__}: {first} ({where})")


def _log_path(name: str) -> str:
    """Beside this worker's own Ray log (its stderr), else in the temp folder; not named ``worker*``, so Ray's log
    monitor does not forward it to the driver."""
    try:
        folder = os.path.dirname(os.readlink("/proc/self/fd/2"))
    except OSError:
        folder = ""
    if not folder or not os.path.isdir(folder):
        folder = tempfile.gettempdir()
    return os.path.join(folder, f"farm-{name}-{os.getpid()}.log")


def _redirect_output(path: str) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _cuda_available() -> bool:
    """Whether this node has an NVIDIA driver, without importing torch (seconds per replica on a small CPU).

    Fake GPUs (``ray.init(num_gpus=N)`` on a CPU machine) have GPU ids but no driver: replicas then run on CPU.
    """
    return os.path.exists("/proc/driver/nvidia/version") or os.environ.get("FARM_ASSUME_CUDA") == "1"


RemoteReplica = ray.remote(Replica)
