"""Tiny random-config Hugging Face language models (nothing downloaded), trained as users write it:
``self.model(input_ids=x, labels=x).loss``; and the single-process references their pipeline runs are
checked against.

- ``hf_reference``: ordinary training of the whole model (flush schedules must match it).
- ``hf_replay``: one process executes a plan's actions stage by stage, like tests/reference.py's
  replay, but for any model: a stage's forward runs the user's whole forward for real, swaps the
  previous stage's output in at the stage's first module (a forward pre-hook) and stops at the next
  stage's first module. It uses neither hollow.py nor the runtime, only the partition's unit names.
  With ``tied_lag``: GPT-2's ``wte`` (first stage) and ``lm_head`` (last stage) as PACI's tied copies
  (tests/tied_replay.py).
"""

from __future__ import annotations

import os

import lightning as L
import torch
from lightning.pytorch import LightningModule
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from lightning_paci.plan import Plan
from tests.models import adamw
from tests.tied_replay import TiedReplay

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tiny configs only: nothing may be fetched

KINDS = ("gpt2", "gpt2-tied", "llama", "qwen2")
VOCAB = 100  # tests/models.token_data draws ids below 32


def make_hf(kind: str) -> nn.Module:
    """2-4 layers, hidden 32, vocab 100, no dropout (the references draw no random numbers)."""
    import transformers as tf

    if kind.startswith("gpt2"):
        config = tf.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=4, n_head=2, resid_pdrop=0.0,
                               embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=kind == "gpt2-tied")
        return tf.GPT2LMHeadModel(config)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  tie_word_embeddings=False)
    if kind == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    if kind == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    raise ValueError(f"unknown model kind {kind!r}; choose one of {KINDS}")


class LitHF(LightningModule):
    """What a user writes around a Hugging Face causal LM for one device."""

    def __init__(self, kind: str = "gpt2", dtype: torch.dtype = torch.float64, lr: float = 1e-2,
                 sched: bool = False) -> None:
        super().__init__()
        self.model = make_hf(kind).to(dtype)
        self.lr, self.sched = lr, sched

    def training_step(self, batch, batch_idx):
        x, _ = batch
        loss = self.model(input_ids=x, labels=x).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return adamw(self.parameters(), self.lr, self.sched)


def fresh_hf(kind: str) -> LitHF:
    L.seed_everything(0, verbose=False)  # the same initial weights as tests/pipeline_script.py --hf
    return LitHF(kind)


def hf_reference(kind: str, data: list) -> dict:
    """Whole-batch training; the pipeline's mean of equal micro-batch token means is the same loss."""
    lit = fresh_hf(kind)
    opt = lit.configure_optimizers()
    for x, _ in data:
        lit.model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return lit.state_dict()


class _Stop(BaseException):
    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.tensors = tensors


def _stage_forward(lit: LitHF, entry: str | None, exit_: str | None, received: list, x: torch.Tensor):
    """The user's forward for real with ``received`` swapped in at ``entry`` and a stop at ``exit_``:
    (loss, None) on the last stage, else (None, the tensors ``exit_`` takes). The prefix runs without
    grad, so gradients reach only this stage's parameters and the received leaves."""
    handles = []

    def enter(module, args, kwargs):
        flat, spec = tree_flatten((args, kwargs))
        slots = [k for k, t in enumerate(flat) if isinstance(t, torch.Tensor)]
        assert len(slots) == len(received), f"{entry} takes {len(slots)} tensors, {len(received)} arrived"
        for k, t in zip(slots, received):
            flat[k] = t
        torch.set_grad_enabled(True)
        return tree_unflatten(flat, spec)

    def leave(module, args, kwargs):
        raise _Stop([t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)])

    if entry is not None:
        handles.append(lit.get_submodule(entry).register_forward_pre_hook(enter, with_kwargs=True))
    if exit_ is not None:
        handles.append(lit.get_submodule(exit_).register_forward_pre_hook(leave, with_kwargs=True))
    try:
        with torch.set_grad_enabled(entry is None):
            return lit.model(input_ids=x, labels=x).loss, None
    except _Stop as stop:
        return None, stop.tensors
    finally:
        for h in handles:
            h.remove()


def hf_replay(kind: str, plan: Plan, stage_units: list[list[str]], entries: list[str | None], data: list,
              tied_lag: int | None = None) -> dict:
    """PACI's semantics in one process (see tests/reference.py ``_replay``): each stage's own
    optimizer steps at its S actions; a backward uses the stage's current weights."""
    lit = fresh_hf(kind)
    m, n = plan.micro_batches, plan.n_stages
    holder, tied = None, None
    if tied_lag is not None:
        owner = lit.model.transformer.wte.weight
        lit.model.lm_head.weight = holder = nn.Parameter(owner.detach().clone())  # the last stage's copy
        tied = TiedReplay(owner, holder, 0, n - 1, tied_lag)
    windows = [0] * n
    stages = []
    for units in stage_units:
        params = [p for u in units for p in lit.get_submodule(u).parameters() if p is not holder]
        aliases = [nn.Parameter(p.data) for p in params]
        stages.append((params, aliases, torch.optim.AdamW(aliases, lr=1e-2, weight_decay=0.1)))
    micro = {k * m + part: xs for k, (x, _) in enumerate(data) for part, xs in enumerate(x.chunk(m))}
    sent, grads, saved = [{} for _ in range(n)], [{} for _ in range(n)], [{} for _ in range(n)]
    cursor = [0] * n
    while any(cursor[i] < len(plan.stages[i]) for i in range(n)):
        progressed = False
        for i in range(n):
            while cursor[i] < len(plan.stages[i]):
                action = plan.stages[i][cursor[i]]
                j = action.micro_batch
                if action.kind == "F":
                    if i > 0 and j not in sent[i - 1]:
                        break
                    inp = [t.detach().requires_grad_(t.requires_grad) for t in sent[i - 1][j]] if i > 0 else []
                    exit_ = entries[i + 1] if i + 1 < n else None
                    loss, out = _stage_forward(lit, entries[i], exit_, inp, micro[j])
                    out = [loss / plan.accumulation] if out is None else out
                    sent[i][j], saved[i][j] = out, (inp, out)
                elif action.kind == "B":
                    if i < n - 1 and j not in grads[i + 1]:
                        break
                    inp, out = saved[i].pop(j)
                    pairs = [(o, g) for o, g in zip([o for o in out if o.requires_grad],
                                                    grads[i + 1].pop(j) if i < n - 1 else [None])]
                    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
                    grads[i][j] = [t.grad if t.grad is not None else torch.zeros_like(t)
                                   for t in inp if t.requires_grad]
                else:
                    w = windows[i]
                    if tied is not None and not tied.ready(i, w):
                        break
                    if tied is not None:
                        tied.before_step(i, w)
                    params, aliases, opt = stages[i]
                    for p, a in zip(params, aliases):
                        a.grad = p.grad
                    opt.step()
                    for p, a in zip(params, aliases):
                        p.grad = a.grad = None
                    if tied is not None:
                        tied.after_step(i, w)
                    windows[i] += 1
                cursor[i] += 1
                progressed = True
        assert progressed, "plan deadlocked in replay"
    if tied is not None:
        tied.drained()  # the drain leaves the copies equal
    return lit.state_dict()
