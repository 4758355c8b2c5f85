"""What the framework callbacks share: the checked arguments, the dropout swap (once per
model), the penalty's gradient step and the import of an optional framework with an
error that names the package to install."""

import importlib
import weakref

import torch
from torch import nn

from fastreg import _checks, _params
from fastreg.dropout import replace_dropout
from fastreg.penalty import penalty, penalty_grad_


def require(module, package, what):
    """`import module`, or an ImportError that says which package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{what} needs {package} (pip install {package}): {error}") from error


class Settings:
    """The checked arguments of a callback: the penalty's coefficients and exclude rule
    (`own_rules`: strings the callback resolves itself), and the dropout swap."""

    def __init__(self, owner, l1, l2, exclude, dropout, functional, own_rules=()):
        self.owner = owner
        self.l1 = _checks.check_optional_coefficient(l1, "l1", owner) or 0.0
        self.l2 = _checks.check_optional_coefficient(l2, "l2", owner) or 0.0
        if not (isinstance(exclude, str) and exclude in own_rules):
            _params.check_exclude(exclude, nn.Module(), owner)
        self.exclude = exclude
        if dropout is not None:
            _checks.check_mask_mode(dropout)
        if not isinstance(functional, bool):
            raise TypeError(
                f"{owner}(): functional must be a bool, but got {type(functional).__name__}"
            )
        self.dropout, self.functional = dropout, functional
        self._swapped = weakref.WeakSet()

    @property
    def penalized(self):
        return bool(self.l1 or self.l2)

    def swap(self, model):
        """replace_dropout(model, mask=dropout, functional=functional), once per model: a
        later call (a second fit, a resume) does nothing. dropout=None leaves it alone."""
        if self.dropout is None or model in self._swapped:
            return
        replace_dropout(model, mask=self.dropout, functional=self.functional)
        self._swapped.add(model)

    def add_grad(self, model, exclude, scale=1.0):
        """Adds `scale` times the penalty's gradient into the parameters' .grad."""
        if self.penalized:
            penalty_grad_(model, l1=self.l1 * scale, l2=self.l2 * scale, exclude=exclude)

    def value(self, model, exclude):
        """The penalty at the current weights, as a float."""
        with torch.no_grad():
            return penalty(model, l1=self.l1, l2=self.l2, exclude=exclude).item()
