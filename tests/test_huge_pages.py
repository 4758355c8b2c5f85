"""The CPU kernels advise their large fresh outputs (dropout's and the fused ops' outputs
and input gradients, dropout_mask's mask, the penalty's gradients) to transparent huge pages
(csrc/cpu/huge_pages.h): an output of 32 MiB or more gets MADV_HUGEPAGE before it is
written, a smaller one does not, and the advice changes no bit. Read from the mapping's
VmFlags in /proc/self/smaps ("hg": advised with MADV_HUGEPAGE), which madvise sets
whatever the system's huge-page mode."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import requires_extension

import fastreg
from fastreg import reference

pytestmark = [
    requires_extension,
    pytest.mark.skipif(
        not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"),
        reason="needs Linux with transparent huge pages",
    ),
]

LARGE = (32 << 20) // 4  # float32 elements in 32 MiB: advised
SMALL = (16 << 20) // 4  # 16 MiB: left alone


def vm_flags(address):
    """The VmFlags of the mapping of this process that holds `address`."""
    with open("/proc/self/smaps") as smaps:
        inside = False
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                inside = start <= address < end
            elif inside and fields[0] == "VmFlags:":
                return set(fields[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


def advised(t):
    """Whether the middle of t's memory lies in a mapping advised to huge pages."""
    return "hg" in vm_flags(t.data_ptr() + t.untyped_storage().nbytes() // 2)


def grad_of_input(op, n):
    x = torch.randn(n, requires_grad=True)
    op(x).backward(torch.ones(n))
    return x.grad


@pytest.mark.parametrize(
    "op",
    [
        lambda x: fastreg.dropout(x, 0.5, seed=1),
        lambda x: fastreg.dropout(x, 0.5, mask="bool", seed=1),
        lambda x: fastreg.bias_act_dropout(x, None, 0.5, "relu", seed=1),
    ],
    ids=["dropout", "dropout-bool", "bias_act_dropout"],
)
def test_large_outputs_are_advised(op):
    with torch.no_grad():
        assert advised(op(torch.randn(LARGE)))
    assert advised(grad_of_input(op, LARGE))


def test_large_dropout_mask_is_advised():
    mask = fastreg.dropout_mask((32 << 20,), 0.5, seed=3)  # bool: 32 MiB
    assert advised(mask)
    # element i depends on (seed, offset, i) only: the head of a shorter mask
    assert torch.equal(mask[:65536], reference.dropout_mask((65536,), 0.5, seed=3))


def test_large_penalty_gradient_is_advised():
    w = torch.randn(LARGE, requires_grad=True)
    fastreg.penalty([w], l1=0.1, l2=0.2).backward()
    assert advised(w.grad)
    expected = reference.penalty_backward(torch.ones(()), [w.detach()], [0.1], [0.2])[0]
    assert torch.equal(w.grad, expected)


@pytest.mark.skipif(
    os.environ.get("THP_MEM_ALLOC_ENABLE") == "1",
    reason="torch advises every large allocation itself",
)
def test_small_outputs_are_not_advised():
    with torch.no_grad():
        assert not advised(fastreg.dropout(torch.randn(SMALL), 0.5, seed=1))
    assert not advised(grad_of_input(lambda x: fastreg.dropout(x, 0.5, seed=1), SMALL))


def test_advised_output_is_the_reference():
    x = torch.randn(LARGE)
    out = fastreg.dropout(x, 0.3, seed=7)
    assert advised(out)
    assert torch.equal(out, reference.dropout(x, 0.3, seed=7))


def test_environment_variable_turns_the_advice_off():
    code = (
        "import torch, fastreg; from test_huge_pages import advised, LARGE; "
        "print(advised(fastreg.dropout(torch.randn(LARGE), 0.5, seed=1)))"
    )
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join([here, os.path.dirname(here), os.environ.get("PYTHONPATH", "")])
    for value, expected in (("0", "False"), ("1", "True")):
        env = dict(os.environ, FASTREG_CPU_HUGE_PAGES=value, PYTHONPATH=path)
        run = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == expected, (value, run.stdout, run.stderr)
