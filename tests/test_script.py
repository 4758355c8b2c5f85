"""torch.jit.script of the dropout modules (fastreg/_modules.py): every class scripts, alone
and inside a model, and the scripted module gives the eager module's outputs and gradients
bit for bit for the same torch.manual_seed, in training and eval mode, before and after
torch.jit.save/load. Runs on both backends (FASTREG_BACKEND=reference too)."""

import io
import os
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import MASK_MODES, requires_extension
from torch import nn

import fastreg
from fastreg import _ops

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:FutureWarning",
    "ignore:`torch.jit.save` is deprecated:FutureWarning",
    "ignore:`torch.jit.load` is deprecated:FutureWarning",
)

CLASSES = {  # class: an input shape with a batch dimension
    fastreg.Dropout: (6, 10),
    fastreg.Dropout1d: (3, 4, 5),
    fastreg.Dropout2d: (2, 4, 3, 5),
    fastreg.Dropout3d: (2, 3, 2, 3, 4),
}


def script(module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.10+ deprecates TorchScript
        return torch.jit.script(module)


def save_and_load(scripted):
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(scripted, buffer)
        buffer.seek(0)
        return torch.jit.load(buffer)


def run(module, x, seed):
    """Output and input gradient of one training step after torch.manual_seed(seed)."""
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    out = module(x)
    g = torch.linspace(-1, 1, out.numel()).view(out.shape)
    (grad,) = torch.autograd.grad(out, x, g) if out.requires_grad else (torch.zeros_like(x),)
    return out.detach(), grad


@pytest.mark.parametrize("mode", MASK_MODES)
@pytest.mark.parametrize("cls", list(CLASSES), ids=lambda c: c.__name__)
def test_each_class_scripts_and_matches_eager(cls, mode):
    x = torch.randn(CLASSES[cls], generator=torch.Generator().manual_seed(0))
    for p in (0.0, 0.3, 1.0):
        module = cls(p, mask=mode)
        scripted = script(module)
        loaded = save_and_load(scripted)
        for seed in (1, 2):
            out, grad = run(module, x, seed)
            for other in (scripted, loaded):
                out_s, grad_s = run(other, x, seed)
                assert torch.equal(out, out_s) and torch.equal(grad, grad_s), (p, seed)
        if p == 0.3:  # the seeds drew different masks
            assert not torch.equal(run(module, x, 1)[0], run(module, x, 2)[0])
        module.eval(), scripted.eval(), loaded.eval()
        for m in (module, scripted, loaded):
            assert m(x) is x or torch.equal(m(x), x)
        module.train(), scripted.train(), loaded.train()


def test_a_model_scripts_saves_loads_and_trains_as_eager():
    def make():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            fastreg.Dropout2d(0.2),
            nn.Flatten(),
            nn.Linear(4 * 5 * 5, 16),
            nn.ReLU(),
            fastreg.Dropout(0.5, mask="recompute"),
            nn.Linear(16, 2),
        )

    eager, scripted = make(), script(make())
    x = torch.randn(3, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    for step in range(3):
        grads = []
        for model in (eager, scripted):
            torch.manual_seed(10 + step)
            model.zero_grad()
            loss = model(x).square().sum()
            loss.backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(*grads))
    loaded = save_and_load(scripted)
    for a, b in ((eager, loaded), (scripted, loaded)):
        torch.manual_seed(3)
        out_a = a(x)
        torch.manual_seed(3)
        assert torch.equal(out_a, b(x))
    eager.eval(), loaded.eval()
    assert torch.equal(eager(x), loaded(x))
    assert "fastreg" in scripted.code or "fastreg" in getattr(scripted, "5").code


@pytest.mark.parametrize("inplace", [False, True])
def test_inplace_and_dtypes(inplace):
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        x = torch.randn(64, dtype=torch.float64).to(dtype)
        module = fastreg.Dropout(0.4, inplace=inplace)
        scripted = script(module)
        a, b = x.clone(), x.clone()
        torch.manual_seed(5)
        out_a = module(a)
        torch.manual_seed(5)
        out_b = scripted(b)
        assert torch.equal(out_a, out_b) and out_b.dtype == dtype
        assert (out_b is b) == inplace
        assert torch.equal(a, b)


def test_generator_is_used_and_not_saved():
    """A module's generator works in a scripted module (the same generator object is
    drawn from); torch.jit.save cannot store a Generator and says so."""
    x = torch.ones(256)
    eager = fastreg.Dropout(0.5, generator=torch.Generator().manual_seed(7))
    scripted = script(fastreg.Dropout(0.5, generator=torch.Generator().manual_seed(7)))
    assert torch.equal(eager(x), scripted(x)) and torch.equal(eager(x), scripted(x))
    with pytest.raises(RuntimeError, match="Generator"):
        save_and_load(scripted)


def test_scripted_errors_name_the_python_error():
    """Inside TorchScript errors arrive as torch.jit.Error whose message carries the
    Python error's type and fastreg's message."""
    scripted = script(fastreg.Dropout(0.5))
    with pytest.raises(
        torch.jit.Error,
        match="TypeError: dropout\\(\\): input must be float16, "
        "bfloat16, float32 or float64, but got torch.int64",
    ):
        scripted(torch.ones(3, dtype=torch.int64))
    leaf = torch.randn(3, requires_grad=True)
    with pytest.raises(torch.jit.Error, match="RuntimeError: dropout\\(\\): a leaf Variable"):
        script(fastreg.Dropout(0.5, inplace=True))(leaf)
    with pytest.raises(torch.jit.Error, match="dropout1d: Expected 2D or 3D input"):
        script(fastreg.Dropout1d(0.5))(torch.randn(3))
    scripted_2d = script(fastreg.Dropout2d(0.5))
    with pytest.warns(UserWarning, match="Received a 3D input to dropout2d"):
        scripted_2d(torch.randn(2, 3, 4))


def test_scripted_p_one_draws_nothing():
    scripted = script(fastreg.Dropout(1.0))
    x = torch.full((10,), float("nan"), requires_grad=True)
    before = torch.random.get_rng_state()
    out = scripted(x)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(out, torch.zeros(10)) and not out.signbit().any()
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros(10))


@pytest.mark.parametrize(
    "cls", [fastreg.Penalty, fastreg.L1Penalty, fastreg.L2Penalty], ids=lambda c: c.__name__
)
def test_a_model_holding_a_penalty_module_scripts(cls):
    """A penalty's forward takes a Module or an iterable of tensors, which TorchScript cannot
    pass: it is left uncompiled (torch.jit.unused), so that a model holding a penalty module
    scripts; the scripted model runs as the eager one (docs/torchscript.md)."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.drop = fastreg.Dropout(0.5)
            self.reg = cls(0.1)

        def forward(self, x):
            return self.drop(self.lin(x))

    model = Model()
    scripted = script(model)
    x = torch.randn(4, 3)
    torch.manual_seed(0)
    a = scripted(x)
    torch.manual_seed(0)
    assert torch.equal(a, model(x))
    # called from Python, the module runs its eager forward
    assert torch.equal(scripted.reg(model), model.reg(model))


@requires_extension
def test_a_model_scripted_with_the_extension_needs_it_to_load(tmp_path):
    """The saved code calls torch.ops.fastreg.*: loading it where fastreg runs on the
    reference backend fails with torch's 'Unknown builtin op' naming the operator."""
    path = tmp_path / "model.pt"
    scripted = script(nn.Sequential(nn.Linear(3, 3), fastreg.Dropout(0.5)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(scripted, str(path))
    code = (
        "import warnings, torch, fastreg; warnings.simplefilter('ignore')\n"
        f"torch.jit.load({str(path)!r})\n"
    )
    env = dict(os.environ, FASTREG_BACKEND="reference")
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "fastreg::dropout_fwd" in result.stderr, result.stderr[-2000:]


def test_backend_choice_is_the_eager_one():
    from fastreg import _modules

    assert _modules.has_kernels(torch.device("cpu")) == _ops.has_kernels("cpu")
    if torch.cuda.is_available():
        assert _modules.has_kernels(torch.device("cuda")) == _ops.has_kernels("cuda")


def test_a_forward_calling_the_functions_does_not_script():
    """The functions take keyword-only arguments with defaults, which TorchScript cannot
    compile (docs/torchscript.md, "The functions")."""

    class Net(nn.Module):
        def forward(self, x):
            return fastreg.dropout(x, 0.5)

    with pytest.raises(torch.jit.frontend.NotSupportedError, match="keyword-only"):
        script(Net())
