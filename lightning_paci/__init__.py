"""lightning_paci: pipeline-parallel training for Lightning with the PACI schedule.

``import lightning_paci`` registers the Lightning strategy names ``"paci"``, ``"pipe_1f1b"`` and
``"pipe_gpipe"`` (Lightning 2.6 has no entry point for third-party strategies).

The planning core (``plan``, ``schedules``, ``simulate``, ``timeline``) imports no torch, and neither does
this file: the registration runs at once if Lightning is already loaded, else right after
``lightning.pytorch`` finishes loading (see ``_registration``); ``PACIStrategy`` and friends are
imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from lightning_paci._registration import register_strategies_when_lightning_loads
from lightning_paci.plan import Action, Plan
from lightning_paci.schedules import PlanSpec, build_plan

register_strategies_when_lightning_loads()

# Public names that need torch, and the module each lives in (PEP 562 lazy attributes).
_LAZY = {"PACIStrategy": "lightning_paci.strategy", "PipelineError": "lightning_paci.p2p",
         "consolidate": "lightning_paci.checkpoint"}

__all__ = ["Action", "PACIStrategy", "PipelineError", "Plan", "PlanSpec", "build_plan", "consolidate"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_paci' has no attribute {name!r}")
