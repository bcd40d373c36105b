"""Registering ``"paci"``, ``"pipe_1f1b"`` and ``"pipe_gpipe"`` with Lightning without importing it first.

Lightning 2.6 fills its ``StrategyRegistry`` only from its own modules, so the names exist once
``lightning_paci.strategy`` has run (it registers them at its end) or something registers them for it.
``import lightning_paci`` must make that happen, yet ``import lightning_paci.simulate`` (which runs the
package's ``__init__`` first) must not load torch. So: if ``lightning.pytorch`` is loaded already,
register now; otherwise a finder on ``sys.meta_path`` waits for ``lightning.pytorch`` and registers
right after that module has run, before any ``Trainer(strategy="paci")`` can look the name up.
The same moment makes ``MyModule.load_from_checkpoint(<pipeline checkpoint directory>)`` say what to do
(``explain_directory_loads``), however Lightning came to be loaded first.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

LIGHTNING = "lightning.pytorch"
STRATEGY_MODULE = "lightning_paci.strategy"
META_FILE = "meta.pt"  # what marks a pipeline checkpoint directory (checkpoint.py writes it)


def _make_strategy(**params: Any) -> Any:
    # By name, as __init__'s lazy attributes: the entry point into the torch half, not an import arrow
    # (the strategy's own imports reach this module, through checkpoint.py's META_FILE).
    return importlib.import_module(STRATEGY_MODULE).PACIStrategy(**params)


def _register() -> None:
    """Register the names now, with a factory that imports the strategy module when a Trainer asks for
    one: importing it here could meet a lightning_paci module still half-imported (``import
    lightning_paci.runtime`` loads Lightning, whose loading brings us here, and the strategy imports
    the runtime). ``lightning_paci.strategy`` registers its class under the same names at its end."""
    explain_directory_loads()
    if STRATEGY_MODULE in sys.modules:
        return  # it registers itself at its end
    from lightning.pytorch.strategies import StrategyRegistry

    from lightning_paci.schedules import STRATEGY_NAMES

    for schedule, name in STRATEGY_NAMES.items():
        if name not in StrategyRegistry:
            StrategyRegistry.register(name, _make_strategy, description=f"pipeline parallel, {schedule} schedule",
                                      schedule=schedule)


def explain_directory_loads() -> None:
    """Make ``MyModule.load_from_checkpoint(<pipeline checkpoint directory>)`` say what to do instead
    of a bare IsADirectoryError (wraps the loader Lightning's ``_load_from_checkpoint`` calls)."""
    from lightning.pytorch.core import saving  # loaded: this runs once Lightning is

    load = saving.pl_load
    if getattr(load, "explains_pipeline_checkpoints", False):
        return

    def pl_load(path_or_url: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(path_or_url, (str, Path)) and (Path(path_or_url) / META_FILE).is_file():
            raise IsADirectoryError(
                f"{path_or_url} is a lightning_paci pipeline checkpoint, a directory with each stage's "
                "tensors: write it as one ordinary Lightning checkpoint with "
                f"lightning_paci.consolidate({str(path_or_url)!r}, 'model.ckpt'), then load that file "
                "(resuming a pipeline run takes the directory as it is: trainer.fit(ckpt_path=...))")
        return load(path_or_url, *args, **kwargs)

    pl_load.explains_pipeline_checkpoints = True  # type: ignore[attr-defined]
    saving.pl_load = pl_load


class _ThenImportStrategy(importlib.abc.Loader):
    """Runs ``lightning.pytorch`` with its own loader, then imports the strategy module."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        _register()

    def __getattr__(self, name: str) -> Any:  # resource readers, is_package, ... of the real loader
        return getattr(self.loader, name)


class _WhenLightningLoads(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != LIGHTNING:
            return None
        sys.meta_path.remove(self)  # once; and let the other finders locate the real module
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenImportStrategy(spec.loader)
        return spec


def register_strategies_when_lightning_loads() -> None:
    if LIGHTNING in sys.modules:
        _register()
    elif not any(isinstance(f, _WhenLightningLoads) for f in sys.meta_path):
        sys.meta_path.insert(0, _WhenLightningLoads())
