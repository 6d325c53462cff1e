"""Suite-wide set-up that must happen before any test module is imported."""

from __future__ import annotations

import os

import torch

# Without a CUDA device the Triton kernels run in triton's interpreter on CPU tensors
# (tests/kernels/test_triton.py). The mode is read when triton is first imported, and other tests
# import it first (torch.compile's inductor does), so it is set here, before collection.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
