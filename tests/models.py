"""Small models and data for the tests: a nanoGPT-shaped LightningModule written as for one device."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Block(nn.Module):
    def __init__(self, d: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            return x + self.mlp(self.ln(x))
        # The `extras` variant: a float mask that needs no gradient and a non-contiguous output
        # (strided as (B, C, T)) cross every stage boundary, as attention masks and permuted layouts do.
        if mask.requires_grad:
            raise RuntimeError("the mask arrived requiring grad: the stage boundary lost requires_grad=False")
        y = x + self.mlp(self.ln(x)) * mask
        return y.transpose(1, 2).contiguous().transpose(1, 2)


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 32, d: int = 16, n_layers: int = 4, block: int = 8,
                 dropout: float = 0.0, extras: bool = False) -> None:
        super().__init__()
        self.extras = extras
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, d), wpe=nn.Embedding(block, d), drop=nn.Dropout(dropout),
            h=nn.ModuleList([Block(d, dropout) for _ in range(n_layers)]), ln_f=nn.LayerNorm(d)))
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.size(1)
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        mask = torch.linspace(0.5, 1.0, t, dtype=x.dtype, device=idx.device)[:, None] if self.extras else None
        for block in self.transformer.h:
            x = block(x, mask)
        return self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab)


class LitTiny(LightningModule):
    """What a user writes for one device; nothing here knows about pipelines."""

    def __init__(self, n_layers: int = 4, lr: float = 1e-2, dtype: torch.dtype = torch.float32,
                 batch_format: str = "tuple", sched: bool = False, dropout: float = 0.0,
                 extras: bool = False) -> None:
        super().__init__()
        self.model = TinyGPT(n_layers=n_layers, dropout=dropout, extras=extras).to(dtype)
        self.lr, self.batch_format, self.sched = lr, batch_format, sched

    def _xy(self, batch):
        if self.batch_format == "dict":
            return batch["x"], batch["y"]
        return batch

    def training_step(self, batch, batch_idx):
        x, y = self._xy(batch)
        logits = self.model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        self.log("train_loss", loss, prog_bar=True)
        return {"loss": loss} if self.batch_format == "dict" else loss

    def validation_step(self, batch, batch_idx):
        x, y = self._xy(batch)
        loss = F.cross_entropy(self.model(x).flatten(0, 1), y.flatten())
        self.log("val_loss", loss, sync_dist=True)  # DDP's mean over replicas (no-op with one replica)

    def configure_optimizers(self):
        return adamw(self.parameters(), self.lr, self.sched)


def adamw(params, lr: float, sched: bool):
    """The test models' optimizer: AdamW, with a per-step LambdaLR when ``sched``."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    if not sched:
        return opt
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def token_data(n: int = 64, block: int = 8, vocab: int = 32, seed: int = 0, dtype=torch.long):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, vocab, (n, block + 1), generator=g)
    # A learnable rule: the next token is (token + 1) mod vocab half of the time.
    seq[:, 1:] = torch.where(torch.rand(n, block, generator=g) < 0.8, (seq[:, :-1] + 1) % vocab, seq[:, 1:])
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


class DictData(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def loader(batch_size: int = 8, n: int = 64, batch_format: str = "tuple", seed: int = 0,
           shuffle: bool = False) -> DataLoader:
    x, y = token_data(n, seed=seed)
    data = DictData(x, y) if batch_format == "dict" else TensorDataset(x, y)
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, drop_last=True)


class TwoOptimizers(LitTiny):
    def configure_optimizers(self):
        return [torch.optim.SGD(self.model.transformer.parameters(), lr=0.1),
                torch.optim.SGD(self.model.lm_head.parameters(), lr=0.1)]


class LitMeta(LitTiny):
    """LitTiny whose layers come in ``configure_model``, Lightning's hook for models too big for one
    process (built on the meta device under PACIStrategy; see lightning_paci/materialize.py)."""

    def __init__(self, n_layers: int = 4, **kwargs) -> None:
        super().__init__(n_layers=n_layers, **kwargs)
        self.n_layers, self.dtype_ = n_layers, kwargs.get("dtype", torch.float32)
        del self.model
        self.model = None

    def configure_model(self) -> None:
        if self.model is None:
            self.model = TinyGPT(n_layers=self.n_layers).to(self.dtype_)


class RandomMasking(LitTiny):
    """Draws a token mask in training_step, outside any module: stage 0 uses it on the inputs, the last
    stage on the labels, so both must draw the same mask for a micro-batch. Records what it drew."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.draws: list[list[float]] = []

    def training_step(self, batch, batch_idx):
        x, y = self._xy(batch)
        mask = torch.rand(x.shape) < 0.25
        noise = torch.randn(())
        self.draws.append([int(mask.sum()), float(noise)])
        logits = self.model(x.masked_fill(mask, 0))
        loss = F.cross_entropy(logits.flatten(0, 1), y.masked_fill(~mask, -100).flatten()) + 0 * noise
        self.log("train_loss", loss)
        return loss
