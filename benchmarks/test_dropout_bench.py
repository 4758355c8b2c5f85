"""Dropout cases of python -m fastreg bench: native F.dropout and fastreg in each mask
mode, forward, backward and both (see benchmarks/conftest.py)."""

FAMILY = "dropout"


def test_dropout(case, run_case):
    run_case(case)
