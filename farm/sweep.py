"""Parameter grids: a job's ``sweep:`` maps parameter names to lists, and the job runs the cross product with every
manifest row (README "Sweeps").

Each combination is a ``Config`` with a stable ``config_id``: a readable label plus a short digest of its values
(``g5.0-ip1.0-s42-3fa2c1``), the same in every run and on every machine. A row's record for a config is filed under
``<row id>__<config_id>`` and carries ``row_id`` and ``config_id``. Sampling parameters and ``seed`` vary per row;
``variant``, ``options.<name>`` (backend options such as ``options.step_cache``) and ``lora.<i>.scale`` (the
strength of the job's ``i``-th LoRA, ``model.weights.lora``) change the model, so configs are grouped by model
settings and each group runs with its own replicas in turn: no replica reloads weights per row.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any

from farm.fingerprints import canonical, digest
from farm.params import SAMPLING_FIELDS

ROW_PARAMS = (*SAMPLING_FIELDS, "fps", "seed")
MODEL_PARAMS = ("variant",)
OPTION_PREFIX = "options."
LORA_SCALE = re.compile(r"^lora\.(\d+)\.scale$")  # lora.<i>.scale: the i-th entry of model.weights.lora
ABBREVIATIONS = {
    "guidance_scale": "g",
    "guidance_scale_i": "gi",
    "ip_scale": "ip",
    "ref_scale": "ref",
    "num_inference_steps": "steps",
    "num_frames": "f",
    "height": "h",
    "width": "w",
    "fps": "fps",
    "seed": "s",
    "variant": "",
}
LABEL_CHARS = re.compile(r"[^A-Za-z0-9.]+")


@dataclass(frozen=True)
class Config:
    """One combination of the grid: ``values`` maps each swept parameter to its value here."""

    id: str
    values: dict[str, Any]

    def row_values(self) -> dict[str, Any]:
        """What overrides each manifest row's own values (sampling parameters, seed)."""
        return {k: v for k, v in self.values.items() if k in ROW_PARAMS}

    def model_values(self) -> dict[str, Any]:
        """What changes the model: ``variant`` and backend options (without their ``options.`` prefix)."""
        out = {k: v for k, v in self.values.items() if k in MODEL_PARAMS or LORA_SCALE.match(k)}
        out.update({k[len(OPTION_PREFIX) :]: v for k, v in self.values.items() if k.startswith(OPTION_PREFIX)})
        return out


def check_sweep(sweep: dict[str, Any]) -> None:
    """``ValueError`` naming the key and the fix for a parameter that cannot be swept or an empty list."""
    from farm.config import did_you_mean

    for name, values in sweep.items():
        swept = name in ROW_PARAMS or name in MODEL_PARAMS or name.startswith(OPTION_PREFIX) or LORA_SCALE.match(name)
        if not swept:
            known = [*ROW_PARAMS, *MODEL_PARAMS, "lora.0.scale"]
            raise ValueError(
                f"sweep.{name}: not a parameter that can be swept{did_you_mean(name, known)}; sweep a sampling "
                f"parameter, seed, variant, a backend option as options.<name> (e.g. options.step_cache) or a "
                f"LoRA's strength as lora.<i>.scale"
            )
        if not isinstance(values, list) or not values:
            raise ValueError(f"sweep.{name}: give a non-empty list of values, e.g. {name}: [3.0, 5.0]")


def expand(sweep: dict[str, list[Any]]) -> list[Config]:
    """The cross product, in the spec's key order (the last key varies fastest); [] for no sweep."""
    if not sweep:
        return []
    names = list(sweep)
    return [_config(dict(zip(names, combo))) for combo in itertools.product(*(sweep[n] for n in names))]


def _config(values: dict[str, Any]) -> Config:
    return Config(id=f"{label(values)}-{digest(values)[:6]}", values=values)


def label(values: dict[str, Any]) -> str:
    """``g5.0-ip1.0-s42``: each value after its parameter's short name; values that are not numbers or words (a
    step-cache mapping) get a 4-digit digest."""
    parts = []
    for name, value in values.items():
        lora = LORA_SCALE.match(name)
        short = f"lora{lora.group(1)}x" if lora else None
        short = short or ABBREVIATIONS.get(name, name.removeprefix(OPTION_PREFIX).replace("_", ""))
        parts.append(short + _shown(value))
    return LABEL_CHARS.sub("-", "-".join(parts)).strip("-")[:80] or "config"


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (int, str)) and len(str(value)) <= 16:
        return str(value)
    return digest(value)[:4]


def model_groups(configs: list[Config]) -> list[list[Config]]:
    """Configs grouped by the model they need (same variant and backend options), in first-seen order."""
    groups: dict[str, list[Config]] = {}
    for config in configs:
        groups.setdefault(canonical(config.model_values()), []).append(config)
    return list(groups.values())
