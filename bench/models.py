"""Model-level throughput (issue 4): each architecture on fastattn's fused backends, on the reference backend, and
as the timm / transformers implementation with the same weights where one exists.

    python -m bench.models                  # device auto; GPU: the papers' sizes, bf16 autocast
    python -m bench.models --quick          # CPU default: small configurations of every family
    python -m bench.models --models vit,swin

Writes bench/results/models-<device-slug>-<YYYYmmdd-HHMMSS>.json.

Rows, per model configuration:
    fastattn      our model, default dispatch (GPU: the Triton kernels; CPU: torch's SDPA kernels through the
                  sdpa backend)
    reference     our model with every attention on fastattn's naive reference backend
    timm / transformers   the public implementation the weights came from (transformers: its SDPA attention
                  path where the model has one -- what users run by default -- else eager, e.g. TimeSformer)
Modes:
    forward       eval mode, no grad: items (images, clips, sequences) per second
    train         train mode: forward, cross-entropy against random labels, backward, SGD step: items per second
The public implementation and ours share weights (converted with fastattn.models.from_timm / from_transformers /
from_torch), so the "max diff" column (forward logits, fastattn vs the public one, in the run's precision) checks
that the rows time the same function.
"""
from __future__ import annotations

import argparse
from contextlib import nullcontext
import datetime
import json
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fastattn  # noqa: E402
import fastattn.models as fm  # noqa: E402
from bench.run import device_slug, environment, resolve_device, short_error, time_group  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ModelCase:
    name: str
    unit: str                                   # images / clips / sequences
    build: Callable[[bool], Dict[str, object]]  # small -> {"fastattn": model, "<public>": model or absent}
    inputs: Callable[[int, bool, torch.device], tuple]  # (batch, small, device) -> positional inputs
    batch: Dict[str, int]                       # {"gpu": n, "cpu": n}
    num_classes: int
    class_dim: int = -1                         # where the logits' class dimension is (SETR: 1)


def _logits(out):
    """The classification logits of any of the models' outputs (tensor, HF ModelOutput, tuple, dict)."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "prediction_logits"):
        if hasattr(out, key):
            return getattr(out, key)
        if isinstance(out, dict) and key in out:
            return out[key]
    if isinstance(out, (tuple, list)):
        return out[0]
    if isinstance(out, dict):
        return next(iter(out.values()))
    raise TypeError(f"cannot find logits in {type(out).__name__}")


# ---------------------------------------------------------------------------------------------------------
# The architectures.  "small": a configuration that runs in seconds on 2 CPU cores.
# ---------------------------------------------------------------------------------------------------------
def _timm(name, small_kw, full_kw=None):
    def build(small):
        import timm
        theirs = timm.create_model(name, pretrained=False, **(small_kw if small else (full_kw or {})))
        return {"fastattn": fm.from_timm(theirs), "timm": theirs}
    return build


def _hf(config_cls, model_cls, small_kw, full_kw):
    def build(small):
        import transformers
        kw = small_kw if small else full_kw
        try:  # transformers' SDPA attention path where the model has one (what users run), else its eager path
            theirs = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kw,
                                                                                      attn_implementation="sdpa"))
        except ValueError:
            theirs = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kw,
                                                                                      attn_implementation="eager"))
        return {"fastattn": fm.from_transformers(theirs), "transformers": theirs}
    return build


def _ours(name, small_kw, full_kw=None):
    def build(small):
        return {"fastattn": fm.create_model(name, **(small_kw if small else (full_kw or {})))}
    return build


def _images(size_small, size_full, channels=3):
    return lambda b, small, dev: (torch.randn(b, channels, *(2 * ((size_small if small else size_full),)),
                                              device=dev),)


def _clips(frames_small, frames_full, size_small, size_full):
    def make(b, small, dev):
        t, s = (frames_small, size_small) if small else (frames_full, size_full)
        return (torch.randn(b, t, 3, s, s, device=dev),)
    return make


def _tokens(len_small, len_full, vocab):
    return lambda b, small, dev: (torch.randint(5, vocab, (b, len_small if small else len_full), device=dev),)


SMALL_VIT = dict(img_size=64, patch_size=16, embed_dim=192, depth=4, num_heads=3, num_classes=100)
CASES = [
    ModelCase("vit_base_patch16_224", "images", _timm("vit_base_patch16_224", SMALL_VIT, {}),
              _images(64, 224), {"gpu": 128, "cpu": 8}, 1000),
    ModelCase("deit_small_patch16_224", "images", _timm("deit_small_patch16_224", SMALL_VIT, {}),
              _images(64, 224), {"gpu": 256, "cpu": 8}, 1000),
    ModelCase("swin_tiny_patch4_window7_224", "images",
              _timm("swin_tiny_patch4_window7_224", dict(img_size=112, embed_dim=48, depths=(2, 2, 2, 2),
                                                         num_heads=(3, 3, 6, 12), num_classes=100), {}),
              _images(112, 224), {"gpu": 128, "cpu": 4}, 1000),
    ModelCase("setr_naive_base", "images", _ours("setr_naive_base", dict(img_size=64, depth=4, embed_dim=192, num_heads=3),
                                             dict(img_size=512)),
              _images(64, 512), {"gpu": 8, "cpu": 2}, 19, class_dim=1),
    ModelCase("transformer_base", "sequences",
              _ours("transformer_base", dict(vocab_size=1000, d_model=128, nhead=4, num_encoder_layers=2,
                                             num_decoder_layers=2, dim_feedforward=512, dropout=0.0),
                    dict(dropout=0.0)),
              lambda b, small, dev: (torch.randint(5, 1000 if small else 37000, (b, 64 if small else 256), device=dev),
                                     torch.randint(5, 1000 if small else 37000, (b, 64 if small else 256), device=dev)),
              {"gpu": 64, "cpu": 4}, 37000),
    ModelCase("bert_base_uncased", "sequences",
              _hf("BertConfig", "BertForPreTraining",
                  dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512,
                       vocab_size=1000),
                  dict()),
              lambda b, small, dev: (torch.randint(5, 1000 if small else 30522, (b, 128 if small else 512),
                                                   device=dev),),
              {"gpu": 32, "cpu": 4}, 0),
    ModelCase("timesformer_base_divided_8x224", "clips",
              _hf("TimesformerConfig", "TimesformerForVideoClassification",
                  dict(image_size=32, patch_size=8, num_frames=4, hidden_size=96, num_hidden_layers=2,
                       num_attention_heads=3, intermediate_size=384, num_labels=10),
                  dict(num_labels=400)),
              _clips(4, 8, 32, 224), {"gpu": 8, "cpu": 2}, 400),
    ModelCase("vivit_b_16x2_model1", "clips",
              _hf("VivitConfig", "VivitForVideoClassification",
                  dict(image_size=32, num_frames=4, tubelet_size=[2, 8, 8], hidden_size=96, num_hidden_layers=2,
                       num_attention_heads=3, intermediate_size=384, num_labels=10),
                  dict(num_labels=400)),
              _clips(4, 32, 32, 224), {"gpu": 4, "cpu": 2}, 400),
    ModelCase("vivit_b_16x2_model4", "clips",
              _ours("vivit_b_16x2_model4", dict(img_size=32, patch_size=8, num_frames=4, embed_dim=96, depth=2,
                                                num_heads=4, num_classes=10)),
              _clips(4, 32, 32, 224), {"gpu": 4, "cpu": 2}, 400),
    ModelCase("perceiver_imagenet", "images",
              _ours("perceiver_imagenet", dict(num_latents=64, latent_dim=128, num_cross_attends=2, depth=2,
                                               num_bands=16, max_resolution=32, num_classes=10)),
              _images(32, 224), {"gpu": 8, "cpu": 2}, 1000),
]


# ---------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Row:
    model: str
    impl: str
    mode: str
    batch: int
    unit: str
    time_ms: Optional[float] = None
    time_ms_min: Optional[float] = None
    items_per_s: Optional[float] = None
    speedup_vs_reference: Optional[float] = None
    max_abs_diff: Optional[float] = None
    params: Optional[int] = None
    note: Optional[str] = None


def _step(model, inputs, mode, backend, autocast_dtype, device, opt, class_dim=-1):
    def contexts():  # fresh context managers per call (use_backend's cannot be re-entered)
        return (fastattn.use_backend(backend) if backend else nullcontext(),
                torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext())

    def call():
        ctx, amp = contexts()
        with ctx, amp:
            if mode == "forward":
                with torch.no_grad():
                    return _logits(model(*inputs))
            out = _logits(model(*inputs))
            logits = out.movedim(class_dim, -1).reshape(-1, out.shape[class_dim]).float()
            target = torch.randint(0, logits.shape[-1], logits.shape[:1], device=out.device)
            loss = F.cross_entropy(logits, target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out
    return call


def run_case(case: ModelCase, device, small: bool, autocast_dtype, print_row) -> List[Row]:
    rows: List[Row] = []
    torch.manual_seed(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models = case.build(small)
    except Exception as e:  # noqa: BLE001
        row = Row(case.name, "all", "-", 0, case.unit, note=f"build failed: {short_error(e)}")
        print_row(row)
        return [row]
    batch = case.batch["cpu" if device.type == "cpu" or small else "gpu"]
    inputs = tuple(t.to(device) for t in case.inputs(batch, small, device))
    impls = [("fastattn", models["fastattn"], None), ("reference", models["fastattn"], "reference")]
    impls += [(k, m, None) for k, m in models.items() if k != "fastattn"]
    for mode in ("forward", "train"):
        group, outs, calls = [], {}, {}
        for impl, model, backend in impls:
            model = model.to(device).train(mode == "train")
            row = Row(case.name, impl, mode, batch, case.unit, params=sum(p.numel() for p in model.parameters()))
            try:
                opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every row times the same weights
                call = _step(model, inputs, mode, backend, autocast_dtype, device, opt, case.class_dim)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    outs[impl] = call().detach().float()
                calls[impl] = call
            except Exception as e:  # noqa: BLE001
                row.note = short_error(e)
            group.append(row)
        time_group({r.impl: r for r in group}, calls, device, quick=small)  # the implementations timed in rounds
        del calls
        for row in group:
            if row.time_ms is not None:
                row.items_per_s = batch / (row.time_ms * 1e-3)
        ref = next((r.time_ms for r in group if r.impl == "reference"), None)
        for r in group:
            if ref and r.time_ms:
                r.speedup_vs_reference = ref / r.time_ms
            if mode == "forward" and r.impl in outs and "fastattn" in outs and r.impl != "fastattn" \
                    and outs[r.impl].shape == outs["fastattn"].shape:
                r.max_abs_diff = (outs[r.impl] - outs["fastattn"]).abs().max().item()
            print_row(r)
        rows += group
    return rows


def format_row(r: Row) -> str:
    f = lambda v, s: "n/a" if v is None else format(v, s)  # noqa: E731
    return (f"{r.model:<32} {r.impl:<12} {r.mode:<7} {r.batch:>5} {f(r.time_ms, '10.2f')} "
            f"{f(r.items_per_s, '10.1f')} {r.unit:<9} {f(r.speedup_vs_reference, '6.2f')}x "
            f"{f(r.max_abs_diff, '8.1e')}  {r.note or ''}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="small configurations (always on CPU)")
    ap.add_argument("--models", default=None, help="comma-separated prefixes of the model names")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out-dir", default=str(REPO_ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    os.environ.pop("FASTATTN_POISON_OUTPUTS", None)
    if args.threads:
        torch.set_num_threads(args.threads)
    small = args.quick or device.type == "cpu"
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    selected = [c for c in CASES if not args.models or any(c.name.startswith(p) for p in args.models.split(","))]
    env = environment(device)
    env["config"] = {"small": small, "autocast": str(autocast_dtype), "models": [c.name for c in selected]}
    print(f"fastattn {fastattn.__version__} model benchmark on {env['device']['name']}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {'small configurations' if small else 'full sizes'}"
          f"{', bf16 autocast' if autocast_dtype else ', fp32'}")
    print(f"{'model':<32} {'impl':<12} {'mode':<7} {'batch':>5} {'ms':>10} {'items/s':>10} {'':<9} "
          f"{'vs ref':>7} {'max diff':>8}  note")
    start = time.perf_counter()
    rows: List[Row] = []
    for case in selected:
        rows += run_case(case, device, small, autocast_dtype, lambda r: print(format_row(r), flush=True))
    env["elapsed_s"] = round(time.perf_counter() - start, 1)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"models-{device_slug(device)}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(dict(env, rows=[asdict(r) for r in rows]), indent=1) + "\n")
    print(f"\n{len(rows)} rows in {env['elapsed_s']:.0f} s; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
