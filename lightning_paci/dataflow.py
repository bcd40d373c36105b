"""Running every stage's program in dependency order: the one loop the simulator and the transport check share.

Each stage works through its own program in order, and an item can run only once what it depends on
has happened (a neighbour's action ended, a message was matched). ``advance`` sweeps the stages,
moving each as far as its next item allows, and repeats until a sweep moves nothing; then every
program is finished, or the stages short of their end wait on each other (a deadlock). What an item
depends on and what running it means is the caller's: ``simulate.run_plan`` times actions,
``comm.check_transport`` posts and matches messages. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def advance(programs: Sequence[Sequence[Any]], step: Callable[[int, int, Any], bool],
            settle: Callable[[], bool] | None = None) -> list[int]:
    """Run ``programs`` (one per stage) as far as their dependencies allow; return each stage's cursor.

    ``step(stage, index, item)`` either runs the item and returns True, or returns False when the
    item must wait (it is offered again after something else moved). ``settle()``, called after each
    sweep, completes what needs both ends at once (a send and its receive) and returns True if it
    completed anything. A stage whose cursor is short of its program's length is stuck there.
    """
    cursor = [0] * len(programs)
    moved = True
    while moved:
        moved = False
        for i, program in enumerate(programs):
            while cursor[i] < len(program) and step(i, cursor[i], program[cursor[i]]):
                cursor[i] += 1
                moved = True
        if settle is not None and settle():
            moved = True
    return cursor
