"""Kernels: one module per op, each holding the fast path, its plain-PyTorch ``*_ref`` twin and
the one function that chooses between them (``HYMBA_KERNELS=ref`` forces the twins everywhere).

Shapes are packed (varlen): tokens of several sequences are concatenated along dim 0 and
``cu_seqlens`` [B+1] (int32) marks the boundaries. Recurrent state lives in pools indexed by a
per-sequence slot (``slot_idx`` [B]); kernels read a sequence's initial state from its slot and
write the final state back in place. No padding ever enters the conv or the scan.
"""
