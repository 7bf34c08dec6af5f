"""Training and evaluation of DiffDIS: the paper's DIS5K fine-tuning recipe and its scoring protocol.

Commands: ``python training/train.py`` (also under ``accelerate launch``), ``python training/evaluate.py``
and ``python training/synthetic.py`` (a toy dataset and a tiny model for a smoke run); installed, this
folder is the package ``diffdis_training`` and the first two are ``diffdis-train`` and ``diffdis-evaluate``.
Modules: ``data`` (DIS5K-layout datasets, edge maps, augmentation, CutMix), ``recipe`` (pyramid noise and
the one-step x0 loss, on the pipeline's own ``predict_x0``), ``metrics`` (the authors' test_score.py
protocol on pysodmetrics). Imports inside the package are relative, so it works under either name; a
command run as a file re-runs itself as its package's module (``runpy``), as ``python -m`` would.
"""
