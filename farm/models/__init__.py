"""Video backends behind one contract (``farm.models.base.Backend``), looked up by name."""

from __future__ import annotations

import importlib

from farm.config import SpecError
from farm.models.base import Backend
from farm.types import GenerationRequest, ModelSpec, ReplicaResources

# name -> "module:Class"; imported lazily so that e.g. the `still` baseline never imports diffusers.
BACKENDS: dict[str, str] = {
    "lynx": "farm.models.lynx.backend:LynxBackend",
    "still": "farm.models.still:StillBackend",
    "simulated": "farm.models.simulated:SimulatedBackend",
}


def backend_class(name: str) -> type[Backend]:
    try:
        target = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown model backend {name!r}; choose one of {sorted(BACKENDS)}") from None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def build_backend(spec: ModelSpec) -> Backend:
    """Construct (not load) the backend a job's model section names; a setting it refuses is a ``SpecError``."""
    cls = backend_class(spec.backend)
    try:
        return cls(spec)
    except SpecError:
        raise
    except ValueError as exc:  # the backend's checks of variant, options and weights name the setting
        raise SpecError(str(exc)) from None


__all__ = [
    "BACKENDS",
    "Backend",
    "GenerationRequest",
    "ModelSpec",
    "ReplicaResources",
    "backend_class",
    "build_backend",
]
