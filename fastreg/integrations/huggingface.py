"""fastreg in Hugging Face's ``transformers.Trainer``: :class:`FastregCallback`.

::

    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[FastregCallback(l2=1e-4, dropout="bits")])

It swaps the model's dropout for fastreg's when the Trainer is made
(``fastreg.replace_dropout(model, mask=dropout, functional=True)``) and adds the gradient
of ``l1 * sum|w| + l2 * sum w**2`` once per optimizer step.

How the penalty gets in, and why there: Trainer has no callback between the last
backward of an optimizer step and the gradient clipping, and the gradients reach
``on_pre_optimizer_step`` already clipped (when ``max_grad_norm > 0``) or still
multiplied by the fp16 loss scale (when not). So the callback writes the penalty's
gradient, times the loss scale of the step, into ``.grad`` in ``on_step_begin``: after
the previous step's ``zero_grad`` and before the step's first micro-batch. The
micro-batches' backward passes accumulate onto it, DDP averages it with the rest (every
rank adds the same), and the Trainer's unscaling, clipping and optimizer step treat it
as they treat the loss's gradient: what a loop that adds the penalty to the loss of the
step gives, independently of how the Trainer normalizes the loss for gradient
accumulation (``num_items_in_batch``, ``compute_loss_func``, ``average_tokens_across_devices``).
"""

from fastreg.integrations._common import Settings, require

transformers = require("transformers", "transformers", "fastreg.integrations.huggingface")

__all__ = ["FastregCallback", "trainer_no_decay"]


def trainer_no_decay(model):
    """An ``exclude(name, param)`` that leaves out what Trainer's weight decay leaves out:
    the parameters not named by ``Trainer.get_decay_parameter_names(model)`` (biases and
    LayerNorm/RMSNorm weights, by layer type and by name)."""
    decay = frozenset(transformers.Trainer.get_decay_parameter_names(None, model))
    return lambda name, param: name not in decay


class FastregCallback(transformers.TrainerCallback):
    """A ``TrainerCallback``: fastreg's dropout in the model, and an L1/L2 penalty counted
    once per optimizer step.

    Args:
        l1, l2: the penalty's coefficients (``l1 * sum|w| + l2 * sum w**2``, no 1/2
            factor); both None (or 0): no penalty.
        exclude: which parameters the penalty leaves out: ``"trainer"`` (default): those
            that Trainer's weight decay leaves out (:func:`trainer_no_decay`); or what
            ``fastreg.penalty`` takes (None, ``"bias_and_norm"``, a callable).
        dropout: the mask mode of the swapped dropout (``"bits"``, ``"bool"``,
            ``"recompute"``), or None to leave the model's dropout alone.
        functional: also route the model's ``F.dropout`` calls (Hugging Face's attention
            functions) to fastreg (``replace_dropout(..., functional=True)``).
        log_key: the name of the penalty's value in the Trainer's logs (the value at the
            weights of the logging step); None: not logged.

    Also supported: the Trainer's fp16 (with its gradient scaler) and bf16, gradient
    accumulation, gradient clipping, DDP, checkpoints and resuming (the swap keeps the
    state dict of ``nn.Dropout``). Not supported: DeepSpeed and FSDP, which keep the
    gradients themselves.
    """

    def __init__(
        self,
        l1=None,
        l2=None,
        *,
        exclude="trainer",
        dropout="bits",
        functional=True,
        log_key="penalty",
    ):
        self.settings = Settings(
            "FastregCallback", l1, l2, exclude, dropout, functional, own_rules=("trainer",)
        )
        if log_key is not None and not isinstance(log_key, str):
            raise TypeError(
                f"FastregCallback(): log_key must be a str or None, but got "
                f"{type(log_key).__name__}"
            )
        self.log_key = log_key
        self._excludes = {}  # id(model) -> (model, exclude): the "trainer" rule per model

    @property
    def l1(self):
        return self.settings.l1

    @property
    def l2(self):
        return self.settings.l2

    def exclude_for(self, model):
        """The ``exclude`` that the callback passes to fastreg for ``model``."""
        if self.settings.exclude != "trainer":
            return self.settings.exclude
        entry = self._excludes.get(id(model))
        if entry is None or entry[0] is not model:
            entry = self._excludes[id(model)] = (model, trainer_no_decay(model))
        return entry[1]

    # The swap: when the Trainer is made (before the accelerator wraps the model), or at
    # the start of training for a callback added later.
    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.settings.swap(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.settings.swap(model)

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not self.settings.penalized:
            return
        scaler = getattr(optimizer, "scaler", None)
        scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else 1.0
        self.settings.add_grad(model, self.exclude_for(model), scale)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if self.log_key is None or not self.settings.penalized or logs is None or model is None:
            return
        if "loss" not in logs:  # evaluation metrics, the end-of-training summary
            return
        value = self.settings.value(model, self.exclude_for(model))
        logs[self.log_key] = value
        # Trainer.log appends a copy of the logs to the history before the callbacks run
        if (
            state.log_history
            and state.log_history[-1].get("step") == state.global_step
            and "loss" in state.log_history[-1]
        ):
            state.log_history[-1][self.log_key] = value
