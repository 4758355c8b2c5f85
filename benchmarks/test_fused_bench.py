"""Fused cases of python -m fastreg bench: bias + dropout + residual add and bias + GELU +
dropout, forward and backward, native composition against fastreg's fused ops (skipped
until the build has them); see conftest.py."""

FAMILY = "fused"


def test_fused(case, run_case):
    run_case(case)
