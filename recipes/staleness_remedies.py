"""Remedies for PACI's stale micro-batch, as the one-process replay applies them (recipes/replay_gpt.py).

In PACI stage i < N-1 forwards the first N-1-i micro-batches of the next batch before its own
optimizer step, and their backward runs after it: their gradient mixes activations of the old
weights with the new weights (the "stale" micro-batches; for N=2 one micro-batch in m at stage 0).
A remedy sees each backward of a stage, told whether the stage stepped between that micro-batch's
forward and its backward, and may change the stage's accumulated gradient before the step.

Notation for one stage and one optimizer window t (the backwards between two of its steps), every
gradient already carrying the loss's 1/a scale:
    F_t  sum of the fresh micro-batches' gradients (k_t of them)
    S_t  sum of the stale micro-batches' gradients (s_t of them; 0 or N-1-i)
    g_t  the gradient the stage's optimizer steps on (plain PACI: g_t = F_t + S_t)

Both remedies are per stage and per parameter: no weight copy, no message to another stage.
"""

from __future__ import annotations

import torch

REMEDIES = ("error_feedback", "drop_stale", "drop_stale_all")
# remedies that judge a micro-batch stale at every stage by its origin (stage 0 forwarded it before a
# step that precedes its backward there), not by the stage's own steps: a diagnostic, not a remedy
BY_ORIGIN = {"drop_stale_all"}


class _Window:
    """Splits a stage's accumulated gradient into its fresh and stale parts as the backwards run.

    The replay keeps the stale part as its own copy for clarity; ErrorFeedback's docstring gives
    the in-place form that needs only its one buffer e."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params = params
        self.stale = [None] * len(params)  # S_t, or None while no stale backward ran in the window
        self.fresh_count = self.stale_count = 0
        self._before = None

    def before_backward(self) -> None:
        self._before = [None if p.grad is None else p.grad.clone() for p in self.params]

    def after_backward(self, stale: bool) -> None:
        if not stale:
            self.fresh_count += 1
            return
        self.stale_count += 1
        for n, (p, before) in enumerate(zip(self.params, self._before)):
            if p.grad is None:
                continue
            part = p.grad if before is None else p.grad - before
            self.stale[n] = part.clone() if self.stale[n] is None else self.stale[n] + part

    def reset(self) -> None:
        self.stale = [None] * len(self.params)
        self.fresh_count = self.stale_count = 0


class ErrorFeedback(_Window):
    """Error feedback on the stale micro-batches' gradient, one gradient-sized buffer e per stage:

        g_t     = F_t + S_t + e_t
        e_{t+1} = s_t * (F_t / k_t - S_t / s_t)      (e_{t+1} = 0 when the window had no stale one)

    The error is measured against the fresh gradient direction of the same window: F_t / k_t is
    the fresh estimate of one micro-batch's gradient at the weights the step is taken from, S_t / s_t
    what the stale micro-batch gave instead. Fed back one step later, the stale contributions sum
    (telescoping) to the fresh estimates over the run, as compression error feedback sums to the
    uncompressed gradient. e_0 = 0; the buffer persists across drains (it is optimizer-like state).

    Memory: e is one tensor per parameter of the stage (the stage's parameter count in the
    gradient's dtype), and nothing else: for s_t = 1 with k fresh micro-batches known from the plan,
    at the stale backward (grad = S_t) do e <- -(e + (k+1) grad)/k, then grad <- -k (grad + e)
    (= S_t + e_t); at the step e <- e + grad/k, which leaves e = F_t/k - S_t. The replay computes the
    same with a separate copy of S_t (the reference form, simpler to read).
    """

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        super().__init__(params)
        self.error = [None] * len(params)

    def before_step(self) -> None:
        k, s = self.fresh_count, self.stale_count
        for n, p in enumerate(self.params):
            if p.grad is None:
                continue
            total = p.grad.clone()  # F_t + S_t
            if self.error[n] is not None:
                p.grad.add_(self.error[n])
            if s and k:
                stale = self.stale[n] if self.stale[n] is not None else torch.zeros_like(total)
                fresh = total - stale
                self.error[n] = fresh / k * s - stale
            else:
                self.error[n] = None
        self.reset()


class DropStale(_Window):
    """Drop the stale micro-batches' gradient and give the fresh ones their weight:

        g_t = F_t * (k_t + s_t) / k_t

    No buffer. The step then sees no stale gradient at all, at the cost of s_t/(k_t+s_t) of the
    stage's data in that step (1/m at stage 0 for N=2); later stages keep every micro-batch.

    ``drop_stale_all`` (a diagnostic) drops the same micro-batches at every stage: the later stages'
    gradients of them are consistent but computed on activations of stage 0's pre-step weights. The
    run is then synchronous training on the other micro-batches (12 of 16 sequences at m=4)."""

    def before_step(self) -> None:
        k, s = self.fresh_count, self.stale_count
        if s and k:
            for n, p in enumerate(self.params):
                if p.grad is None:
                    continue
                if self.stale[n] is not None:
                    p.grad.sub_(self.stale[n])
                p.grad.mul_((k + s) / k)
        self.reset()


def make_remedy(name: str | None, params: list[torch.nn.Parameter]):
    if name is None:
        return None
    if name == "error_feedback":
        return ErrorFeedback(params)
    if name in ("drop_stale", "drop_stale_all"):
        return DropStale(params)
    raise ValueError(f"remedy {name!r}: choose one of {REMEDIES} or leave it unset")
