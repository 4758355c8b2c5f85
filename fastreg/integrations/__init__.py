"""fastreg in training frameworks: one object to hand to the framework's trainer that
swaps the model's dropout for fastreg's and adds an L1/L2 penalty, counted once per
optimizer step, whatever the precision, gradient accumulation, clipping or data
parallelism.

* ``fastreg.integrations.huggingface.FastregCallback``: a ``transformers.TrainerCallback``
  (docs/integrations-huggingface.md);
* ``fastreg.integrations.lightning.FastregCallback``: a ``lightning.pytorch.Callback``
  (docs/integrations-lightning.md).

Importing this package imports no framework: each submodule imports its own when it is
imported, and raises an ImportError naming the package to install when it is missing.
timm, torchvision and PEFT models need nothing of this package: ``fastreg.replace_dropout``
works on them as they come (docs/integrations-timm-peft.md).
"""

__all__ = ["huggingface", "lightning"]


def __getattr__(name):
    if name in __all__:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
