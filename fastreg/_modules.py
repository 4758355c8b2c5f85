"""The fastreg half of the nn.Dropout drop-ins (Dropout, Dropout1d/2d/3d)."""

from fastreg import _args


class DropoutModule:
    """Mixed in before nn.Dropout or nn.Dropout1d/2d/3d, whose p and inplace it keeps: the
    mask mode and the generator (plain attributes, so the state dict stays torch's), and a
    forward through the class's functional form, ``_function``."""

    _function = None

    def __init__(self, p=0.5, inplace=False, *, mask="bits", generator=None):
        super().__init__(_args.check_probability(p), inplace)  # also rejects NaN
        _args.check_mask_mode(mask)
        self.mask = mask
        self.generator = _args.check_generator(generator)

    def forward(self, input):
        return type(self)._function(input, self.p, self.training, self.inplace, mask=self.mask,
                                    generator=self.generator)

    def extra_repr(self):
        return f"{super().extra_repr()}, mask={self.mask!r}"
