"""fastreg in PyTorch Lightning: :class:`FastregCallback`.

::

    trainer = lightning.Trainer(callbacks=[FastregCallback(l2=1e-4, dropout="bits")], ...)

It swaps the LightningModule's dropout for fastreg's at ``setup``
(``fastreg.replace_dropout(module, mask=dropout, functional=True)``) and adds the gradient
of ``l1 * sum|w| + l2 * sum w**2`` in ``on_before_optimizer_step``. Lightning calls that
hook once per optimizer step, after the last micro-batch of an accumulation, after the
mixed-precision plugin has unscaled the gradients (fp16) and DDP has averaged them, and
before it clips them: there the penalty's gradient is added once, unscaled, and clipped
with the loss's, as a loop that adds the penalty to the loss would have it.

Imports ``lightning`` (or, failing that, ``pytorch_lightning``).
"""

import importlib

from fastreg import _params
from fastreg.integrations._common import Settings

try:
    pl = importlib.import_module("lightning.pytorch")
except ImportError:
    try:
        pl = importlib.import_module("pytorch_lightning")
    except ImportError as error:
        raise ImportError(
            f"fastreg.integrations.lightning needs lightning (pip install lightning): {error}"
        ) from error

__all__ = ["FastregCallback"]


class FastregCallback(pl.Callback):
    """A Lightning ``Callback``: fastreg's dropout in the LightningModule, and an L1/L2
    penalty counted once per optimizer step.

    Args:
        l1, l2: the penalty's coefficients (``l1 * sum|w| + l2 * sum w**2``, no 1/2
            factor); both None (or 0): no penalty.
        exclude: which parameters the penalty leaves out, as ``fastreg.penalty`` takes it:
            ``"bias_and_norm"`` (default: biases and normalization layers, what Hugging
            Face's Trainer and timm keep out of weight decay), None, or a callable
            ``(name, param) -> bool``. Only the parameters of the optimizer that steps are
            penalized (each optimizer its own, with several).
        dropout: the mask mode of the swapped dropout (``"bits"``, ``"bool"``,
            ``"recompute"``), or None to leave the module's dropout alone.
        functional: also route the module's ``F.dropout`` calls to fastreg.
        log_key: the name under which the penalty's value (at the weights of the step) is
            logged with ``LightningModule.log`` each step; None: not logged.
    """

    def __init__(
        self,
        l1=None,
        l2=None,
        *,
        exclude="bias_and_norm",
        dropout="bits",
        functional=True,
        log_key="penalty",
    ):
        self.settings = Settings("FastregCallback", l1, l2, exclude, dropout, functional)
        if log_key is not None and not isinstance(log_key, str):
            raise TypeError(
                f"FastregCallback(): log_key must be a str or None, but got "
                f"{type(log_key).__name__}"
            )
        self.log_key = log_key

    @property
    def l1(self):
        return self.settings.l1

    @property
    def l2(self):
        return self.settings.l2

    def setup(self, trainer, pl_module, stage):
        self.settings.swap(pl_module)

    def selection(self, pl_module, optimizer):
        """The parameters the penalty takes at a step of `optimizer`."""
        stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
        return [
            p
            for _, p in _params.module_params(pl_module, self.settings.exclude)
            if id(p) in stepped
        ]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not self.settings.penalized:
            return
        params = self.selection(pl_module, optimizer)
        if self.log_key is not None:
            pl_module.log(
                self.log_key,
                self.settings.value(params, None),
                on_step=True,
                on_epoch=False,
                prog_bar=False,
            )
        self.settings.add_grad(params, None)
