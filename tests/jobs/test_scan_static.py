"""The static scan analysis reads the longest loop of a SASS listing (jobs/bench/scan_static.py)."""

from __future__ import annotations

from hymba_batch.jobs.bench.scan_static import loop_mix

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/               @P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0030*/                   MUFU.EX2 R3, R3 ;
        /*0040*/                   FFMA R3, R3, R5, R6 ;
        /*0050*/                   LDL R7, [R1] ;
        /*0060*/                   STL [R1], R7 ;
        /*0070*/               @!P1 FMUL R3, R3, R3 ;
        /*0080*/               @P2 BRA `(.L_x_1) ;
        /*0090*/                   BRA `(.L_x_2) ;
.L_x_2:
        /*00a0*/                   EXIT ;
"""


def test_loop_mix_takes_the_longest_backward_branch():
    n, ops = loop_mix(SASS)
    assert n == 6  # .L_x_1 up to its branch; the short loop and the forward branch are not it
    assert (ops["MUFU"], ops["FFMA"], ops["FMUL"], ops["LDL"], ops["STL"], ops["BRA"]) == (1, 1, 1, 1, 1, 1)
    assert ops["LDG"] == 0


def test_loop_mix_without_a_loop():
    assert loop_mix("        /*0000*/                   EXIT ;\n") == (0, {})
