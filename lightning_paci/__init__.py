"""lightning_paci: pipeline-parallel training for Lightning with the PACI schedule.

``import lightning_paci`` registers the Lightning strategy names ``"paci"``, ``"pipe_1f1b"`` and
``"pipe_gpipe"`` (Lightning 2.6 has no entry point for third-party strategies).
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_paci.p2p import PipelineError
from lightning_paci.plan import Action, Plan
from lightning_paci.schedules import PlanSpec, build_plan
from lightning_paci.strategy import PACIStrategy

PACIStrategy.register_strategies(StrategyRegistry)

__all__ = ["Action", "PACIStrategy", "PipelineError", "Plan", "PlanSpec", "build_plan"]
