"""Penalty cases of python -m fastreg bench: the Python loop, torch._foreach_norm and
fastreg.penalty / penalty_grad_ (skipped until the build has them); see conftest.py."""

FAMILY = "penalty"


def test_penalty(case, run_case):
    run_case(case)
