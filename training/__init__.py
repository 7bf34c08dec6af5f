"""Training and evaluation of DiffDIS: the paper's DIS5K fine-tuning recipe and its scoring protocol.

Scripts: ``python training/train.py`` (also under ``accelerate launch``) and ``python training/evaluate.py``.
Modules: ``data`` (DIS5K-layout datasets, edge maps, augmentation, CutMix), ``recipe`` (pyramid noise and
the one-step x0 loss), ``metrics`` (the authors' test_score.py protocol on pysodmetrics).
"""
