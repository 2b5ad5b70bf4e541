"""Times the CUDA backend's forward alone on bench.run's FA2 shapes (bf16, L 1k / 4k / 16k, d 64 / 128): a quick
A/B of kernel variants built into different checkouts (bench/gpu_cuda_ab.sh runs it once per checkout, with that
checkout first on sys.path), and in one process the mma.sync forward against the Hopper wgmma forward
(FASTATTN_CUDA_WGMMA, read at every call) and Triton's.  bench.run times forward and backward against every
baseline; this is the fast subset.

    python bench/cuda_fwd_ab.py LABEL [--wgmma | --wgmma-only]
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path.cwd()))
import torch  # noqa: E402
import triton.testing  # noqa: E402

import fastattn  # noqa: E402
from bench.run import attention_flops, gpu_shapes  # noqa: E402

label = sys.argv[1] if len(sys.argv) > 1 else "?"
print(f"[{label}] fastattn from {Path(fastattn.__file__).parent}")
# (name, backend, FASTATTN_CUDA_WGMMA): the variants timed back to back on the same inputs
variants = [("cuda", "cuda", "0")]
if "--wgmma" in sys.argv[2:]:
    variants += [("cuda-wgmma", "cuda", "1"), ("triton", "triton", "0")]
elif "--wgmma-only" in sys.argv[2:]:
    variants = [("cuda-wgmma", "cuda", "1")]
for shape in gpu_shapes(False, (1024, 4096, 16384)):
    q, k, v = (torch.randn(shape.batch, shape.heads, shape.seqlen, shape.head_dim, device="cuda",
                           dtype=torch.bfloat16) for _ in range(3))
    for causal in (False, True):
        outs = {}
        for name, backend, flag in variants:
            os.environ["FASTATTN_CUDA_WGMMA"] = flag
            with torch.no_grad():
                outs[name] = fastattn.attention(q, k, v, causal=causal, backend=backend)
                ms = triton.testing.do_bench(lambda: fastattn.attention(q, k, v, causal=causal, backend=backend),
                                             return_mode="median")
            base = outs[variants[0][0]]
            diff = (outs[name].float() - base.float()).abs().max().item()
            print(f"[{label}] {name:10} {shape} causal={causal!s:5} {ms:8.3f} ms "
                  f"{attention_flops(shape, causal, 'fwd') / ms / 1e9:7.1f} TFLOP/s  "
                  f"max|diff vs {variants[0][0]}| {diff:.1e}")
os.environ["FASTATTN_CUDA_WGMMA"] = "0"
