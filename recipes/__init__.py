"""GPT pretraining recipe for lightning_paci: model, data, Hydra entry point and sweep comparison.

    python recipes/pretrain_gpt.py                      # PACI, 2 stages, CPU, embedded corpus
    python recipes/pretrain_gpt.py -m strategy=paci,pipe_1f1b,pipe_gpipe strategy.micro_batches=4,8
    tensorboard --logdir runs/
    python recipes/compare.py runs/<sweep>

See recipes/README.md.
"""
