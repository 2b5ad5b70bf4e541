"""Times the CUDA backend's forward alone on the FlashAttention-2 benchmark shapes (bf16): a quick A/B of kernel
variants built into different checkouts (run once per checkout, with that checkout first on PYTHONPATH).

    python bench/cuda_fwd_ab.py LABEL
"""
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path.cwd()))
import fastattn  # noqa: E402

label = sys.argv[1] if len(sys.argv) > 1 else "?"
print(f"[{label}] fastattn from {Path(fastattn.__file__).parent}")
for B, H, L, D in [(16, 32, 1024, 64), (4, 32, 4096, 64), (1, 32, 16384, 64),
                   (16, 16, 1024, 128), (4, 16, 4096, 128), (1, 16, 16384, 128)]:
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for causal in (False, True):
        with torch.no_grad():
            ms = triton.testing.do_bench(lambda: fastattn.attention(q, k, v, causal=causal, backend="cuda"),
                                         return_mode="median")
        flops = 4 * B * H * L * L * D / (2 if causal else 1)
        print(f"[{label}] {B}x{H}x{L}x{D} causal={causal!s:5} {ms:8.3f} ms {flops / ms / 1e9:7.1f} TFLOP/s")
