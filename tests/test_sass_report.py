"""The SASS report (tools/sass_report.py): its parsing on known cuobjdump output, and its
checks on the built extension's CUDA kernels (128-bit accesses, no local memory, a register
bound), which need a build with CUDA kernels and cuobjdump but no GPU."""

import os
import sys

import pytest

import fastreg

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
)
import sass_report  # noqa: E402

RES_USAGE = """
Fatbin elf code:
================
arch = sm_90
Resource usage:
 Common:
  GLOBAL:0
 Function _Z3fooPf:
  REG:40 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:592 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z3barPf:
  REG:72 STACK:16 SHARED:0 LOCAL:16 CONSTANT[0]:600 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

SASS = """
	code for sm_90
		Function : _Z3fooPf
	.headerflags	@"EF_CUDA_TEXMODE_UNIFIED EF_CUDA_64BIT_ADDRESS EF_CUDA_SM90"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                          /* 0x00000a00ff017b82 */
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;                /* 0x0000000402047981 */
        /*0020*/              @!P0 LDG.E.128.CONSTANT R8, desc[UR4][R2.64+0x10] ; /* 0x0000100402088981 */
        /*0030*/                   STG.E.128 desc[UR4][R6.64], R4 ;                /* 0x0000000406007986 */
        /*0040*/                   STG.E desc[UR4][R6.64], R4 ;                    /* 0x0000000406007986 */
		Function : _Z3barPf
        /*0000*/                   STL.64 [R1], R4 ;                               /* 0x0000000401007387 */
        /*0010*/                   LDL R3, [R1+0x4] ;                              /* 0x0000040001037983 */
        /*0020*/                   EXIT ;                                          /* 0x000000000000794d */
"""


def test_parses_resource_usage_and_sass():
    usage = sass_report.parse_resources(RES_USAGE)
    assert usage == {
        "_Z3fooPf": {
            "REG": 40,
            "STACK": 0,
            "SHARED": 0,
            "LOCAL": 0,
            "CONSTANT[0]": 592,
            "TEXTURE": 0,
            "SURFACE": 0,
            "SAMPLER": 0,
        },
        "_Z3barPf": {
            "REG": 72,
            "STACK": 16,
            "SHARED": 0,
            "LOCAL": 16,
            "CONSTANT[0]": 600,
            "TEXTURE": 0,
            "SURFACE": 0,
            "SAMPLER": 0,
        },
    }
    sass = sass_report.parse_sass(SASS)
    assert sass_report.memory_ops(sass["_Z3fooPf"]) == (2, 1, 0, 0)
    assert sass_report.memory_ops(sass["_Z3barPf"]) == (0, 0, 1, 1)


def test_the_checks_flag_what_they_should():
    names = {
        "_Z3fooPf": "void fastreg::device::dropout_kernel<4, fastreg::device::PhiloxBits, "
        "fastreg::device::NoSink, fastreg::device::ScaleEpilogue<float, true> >(long)",
        "_Z3barPf": "void fastreg::device::dropout_kernel<4, fastreg::device::PhiloxBits, "
        "fastreg::device::NoSink, fastreg::device::ScaleEpilogue<float, true> >(int)",
    }
    usage = sass_report.parse_resources(RES_USAGE)
    sass = sass_report.parse_sass(SASS)
    rows, problems = sass_report.check(usage, sass, names)
    assert len(rows) == 2
    assert ("vector", f"{rows[0][0]}: no 128-bit global stores") not in problems  # foo stores 128
    assert any(kind == "vector" and "no 128-bit global loads" in p for kind, p in problems)
    assert any(
        kind == "local" and "local memory (1 LDL, 1 STL, 16 bytes)" in p for kind, p in problems
    )
    assert [p for kind, p in problems if kind == "registers"] == [
        f"{rows[1][0]}: 72 registers, more than {sass_report.MAX_REGISTERS}"
    ]


def test_unaligned_and_mask_kernels_need_no_vector_accesses():
    assert sass_report.is_aligned_elementwise(
        "void fastreg::device::dropout_kernel<8, X, Y, fastreg::device::ScaleEpilogue<c10::Half, true> >()"
    )
    assert not sass_report.is_aligned_elementwise(
        "void fastreg::device::dropout_kernel<8, X, Y, fastreg::device::ScaleEpilogue<c10::Half, false> >()"
    )
    assert not sass_report.is_aligned_elementwise(
        "void fastreg::device::dropout_kernel<4, X, Y, fastreg::device::NoEpilogue>()"
    )
    assert sass_report.is_aligned_elementwise(
        "void fastreg::device::dropout_kernel<4, X, Y, fastreg::device::BackwardEpilogue<float, "
        "(fastreg::Activation)2> >()"
    )


needs_build = pytest.mark.skipif(
    not fastreg.info()["cuda_kernels"] or sass_report.find_cuobjdump() is None,
    reason="needs an extension built with CUDA kernels, and cuobjdump",
)


@needs_build
def test_the_built_kernels_have_128_bit_accesses_no_local_memory_and_at_most_64_registers(capsys):
    code = sass_report.main([])
    out = capsys.readouterr().out
    assert code == 0, out
