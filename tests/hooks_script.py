"""A pipeline run that records Lightning's backward/step hooks and predicts (tests/test_hooks_predict.py).

    python tests/hooks_script.py --schedule 1f1b --steps 3 --clip 0.05 --predict --out /tmp/run

Every process writes ``calls_rank{r}.json`` (its stage and the hook calls it saw, in order); rank 0
writes ``predictions.pt`` (what ``trainer.predict`` returned in the main process) and, after a
spawned fit, ``direct.pt``: the main process's trained model applied to the same batches directly.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import BasePredictionWriter  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from lightning.pytorch.utilities import grad_norm  # noqa: E402

from lightning_paci import PACIStrategy  # noqa: E402
from tests.models import LitTiny, loader  # noqa: E402


class HookedTiny(LitTiny):
    """LitTiny plus the hooks a user writes to watch gradients; ``calls`` lists them in call order."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls: list = []

    def _own_grad_norms(self) -> dict[str, float]:
        return {n: p.grad.norm().item() for n, p in self.named_parameters()
                if p.grad is not None and not p.is_meta}

    def on_before_backward(self, loss) -> None:
        self.calls.append(["on_before_backward", loss.item()])

    def on_after_backward(self) -> None:
        self.calls.append(["on_after_backward", self._own_grad_norms()])

    def on_before_optimizer_step(self, optimizer) -> None:
        norms = grad_norm(self, norm_type=2)  # Lightning's own utility, logged as its docs show
        self.log_dict(norms)
        self.calls.append(["on_before_optimizer_step", {k: float(v) for k, v in norms.items()}])

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        self.calls.append(["configure_gradient_clipping", gradient_clip_val, gradient_clip_algorithm])
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def predict_step(self, batch, batch_idx):
        x, _ = batch
        return self.model(x)  # (B, T, vocab)


class CallbackHooks(L.Callback):
    """The callback side of the same hooks; Lightning calls it before the module's."""

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        pl_module.calls.append(["callback.on_before_backward"])

    def on_after_backward(self, trainer, pl_module) -> None:
        pl_module.calls.append(["callback.on_after_backward"])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        pl_module.calls.append(["callback.on_before_optimizer_step"])

    def on_fit_end(self, trainer, pl_module) -> None:
        out = Path(trainer.default_root_dir)
        out.mkdir(parents=True, exist_ok=True)
        stage = getattr(trainer.strategy, "stage", 0)
        (out / f"calls_rank{trainer.global_rank}.json").write_text(json.dumps({"stage": stage,
                                                                             "calls": pl_module.calls}))


class Writer(BasePredictionWriter):
    """Writes each batch's predictions with the writing rank in the file name."""

    def __init__(self, out: Path) -> None:
        super().__init__(write_interval="batch")
        self.out = out

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx) -> None:
        torch.save(prediction, self.out / f"written_rank{trainer.global_rank}_batch{batch_idx}.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--schedule", default="1f1b")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--clip", type=float, default=0.0, help="gradient_clip_val, by value")
    parser.add_argument("--start-method", default="popen")
    parser.add_argument("--predict", action="store_true", help="trainer.predict after fit")
    parser.add_argument("--return-predictions", action="store_true", help="pass return_predictions=True")
    parser.add_argument("--writer", action="store_true", help="a BasePredictionWriter callback")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    L.seed_everything(0, verbose=False)
    model = HookedTiny(dtype=torch.float64)
    strategy = PACIStrategy(schedule=args.schedule, micro_batches=args.micro_batches, timeout_s=60,
                            start_method=args.start_method)
    callbacks = [CallbackHooks()] + ([Writer(out)] if args.writer else [])
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=args.steps, max_epochs=-1,
        callbacks=callbacks, gradient_clip_val=args.clip or None, gradient_clip_algorithm="value",
        use_distributed_sampler=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1, default_root_dir=out,
        logger=TensorBoardLogger(out, name="tb"))
    trainer.fit(model, loader(8, n=8 * args.steps))
    if args.start_method == "popen":
        torch.save(trainer.strategy.lightning_module_state_dict(), out / f"stage{trainer.strategy.stage}.pt")
    if not args.predict:
        return
    data = loader(8, n=16, seed=1)
    kwargs = {"return_predictions": True} if args.return_predictions else {}
    predictions = trainer.predict(model, data, **kwargs)
    if trainer.global_rank != 0:
        return
    torch.save(predictions, out / "predictions.pt")
    if args.start_method != "popen":  # the main process holds the whole trained model
        model.eval()
        with torch.no_grad():
            torch.save([model.predict_step(b, i) for i, b in enumerate(data)], out / "direct.pt")


if __name__ == "__main__":
    main()
