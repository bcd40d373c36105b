"""A GPT LightningModule in the shape of the paper's reference model (nanoGPT).

Pre-LN transformer blocks (causal self-attention, GELU MLP, dropout), learned position
embeddings, an untied LM head; AdamW with betas (0.9, 0.95), weight decay 0.1 on matrices only,
linear warm-up then cosine decay to 10% of the peak learning rate.

training_step and validation_step are written for one device. A pipeline strategy splits the
module by itself, and relies on its shape: the root holds no parameters, and its children are
registered in execution order, each mapping one tensor to one tensor::

    embed (B, T) -> (B, T, C)  ->  blocks[0..L-1] (B, T, C)  ->  ln_f  ->  lm_head (B, T, V)

The LM head is untied from the token embedding on purpose: with the embedding on the first
stage and the head on the last, a tied weight would have to live on two stages at once.

Launch: python recipes/pretrain_gpt.py (see recipes/README.md).
"""

from __future__ import annotations

import math
from functools import partial

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} must be a multiple of n_head={n_head}")
        self.n_head = n_head
        self.dropout = dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_size)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = nn.GELU()
        self.proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(self.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LN residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Embedding(nn.Module):
    """Token plus learned position embedding, then dropout: (B, T) token ids -> (B, T, C)."""

    def __init__(self, vocab_size: int, block_size: int, n_embd: int, dropout: float) -> None:
        super().__init__()
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.size(1)
        if T > self.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size={self.block_size}")
        pos = torch.arange(T, device=idx.device)
        return self.drop(self.wte(idx) + self.wpe(pos))


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate: linear warm-up, then cosine down to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class GPT(L.LightningModule):
    """Decoder-only transformer language model; the batch is ``(x, y)``, both (B, T) token ids.

    Args:
        vocab_size: tokens in the vocabulary; the recipe takes it from the data module.
        block_size: context length T.
        n_layer, n_head, n_embd: depth, attention heads, width C.
        dropout: on embeddings, attention weights and residual branches.
        bias: biases in Linear and LayerNorm layers (GPT-2 has them).
        lr: peak learning rate.
        min_lr_ratio: the cosine decay ends at ``min_lr_ratio * lr``.
        warmup_fraction: share of ``max_steps`` spent in linear warm-up.
        max_steps: optimizer steps of the whole run, the length of the schedule.
        betas, weight_decay: AdamW settings; weight decay applies to matrices only (not to
            biases or LayerNorm gains).
    """

    def __init__(
        self,
        vocab_size: int,
        block_size: int = 128,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
        bias: bool = True,
        lr: float = 2e-3,
        min_lr_ratio: float = 0.1,
        warmup_fraction: float = 0.05,
        max_steps: int = 600,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.1,
    ) -> None:
        super().__init__()
        betas = tuple(float(b) for b in betas)
        self.save_hyperparameters()  # records betas as the tuple above
        # Registration order is execution order (the pipeline partitioner reads it).
        self.embed = Embedding(vocab_size, block_size, n_embd, dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, bias) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        # Mean validation loss per token; exp of it is the validation perplexity.
        self.val_nll = MeanMetric()
        self.apply(self._init_weights)
        # GPT-2: scale the init of the projections that feed the residual stream by 1/sqrt(2L).
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)  # (B, T, C)
        for block in self.blocks:
            x = block(x)  # (B, T, C)
        return self.lm_head(self.ln_f(x))  # (B, T, V)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @staticmethod
    def _loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self._loss(self(x), y)
        hp = self.hparams
        lr = hp.lr * lr_factor(self.global_step, self._warmup_steps(), hp.max_steps, hp.min_lr_ratio)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/ppl", loss.detach().exp())
        self.log("train/lr", lr)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        loss = self._loss(self(x), y)
        self.val_nll.update(loss, weight=y.numel())

    def on_validation_epoch_end(self) -> None:
        nll = self.val_nll.compute()
        self.val_nll.reset()
        # sync_dist: the standard form for epoch-level values; the metric is already reduced.
        self.log("val/loss", nll, prog_bar=True, sync_dist=True)
        self.log("val/ppl", nll.exp(), prog_bar=True, sync_dist=True)

    def _warmup_steps(self) -> int:
        return max(1, round(self.hparams.warmup_fraction * self.hparams.max_steps))

    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": hp.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=hp.betas)
        schedule = partial(
            lr_factor, warmup_steps=self._warmup_steps(), max_steps=hp.max_steps, min_ratio=hp.min_lr_ratio
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
