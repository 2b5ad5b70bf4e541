"""Training data for the smoke tests, from files that ship inside an installed package (scikit-learn): nothing is
downloaded.

* ``digits_images``: scikit-learn's 8x8 handwritten digits (1797 images, values 0..16), as ``[N, C, S, S]``
  float images scaled to [0, 1] (nearest-neighbour upsampled to ``size``), with their labels.
* ``moving_digit_clips``: clips ``[N, T, C, S, S]`` of a digit sliding across a blank canvas, one pixel per frame
  in a direction that depends on the sample; the label is the digit.
* ``text_corpus``: the dataset descriptions bundled with scikit-learn (``sklearn/datasets/descr/*.rst``), as one
  string; ``char_tokens`` turns it into integer ids (a character vocabulary).
"""
import glob
import os

import torch
import torch.nn.functional as F


def digits_images(n: int = 256, size: int = 8, channels: int = 1, seed: int = 0):
    from sklearn.datasets import load_digits
    data = load_digits()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data.target), generator=g)[:n]
    x = torch.tensor(data.images, dtype=torch.float32)[idx][:, None] / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="nearest")
    x = x.expand(-1, channels, -1, -1).contiguous()
    y = torch.tensor(data.target, dtype=torch.long)[idx]
    return x, y


def moving_digit_clips(n: int = 128, frames: int = 4, canvas: int = 16, channels: int = 1, seed: int = 0):
    """Each clip: an 8x8 digit placed on a ``canvas`` x ``canvas`` blank frame, moving one pixel per frame right,
    down or diagonally (the direction chosen per clip)."""
    if canvas < 8 + frames:
        raise ValueError(f"canvas: {canvas} is too small for {frames} frames of an 8x8 digit moving one pixel each")
    x, y = digits_images(n, 8, 1, seed)
    g = torch.Generator().manual_seed(seed + 1)
    dirs = torch.tensor([[0, 1], [1, 0], [1, 1]])[torch.randint(0, 3, (n,), generator=g)]
    clips = torch.zeros(n, frames, channels, canvas, canvas)
    for i in range(n):
        for t in range(frames):
            r, c = (dirs[i] * t).tolist()
            clips[i, t, :, r:r + 8, c:c + 8] = x[i]
    return clips, y


def text_corpus() -> str:
    import sklearn.datasets
    root = os.path.join(os.path.dirname(sklearn.datasets.__file__), "descr")
    files = sorted(glob.glob(os.path.join(root, "*.rst")))
    if not files:
        raise FileNotFoundError(f"no .rst descriptions under {root}")
    return "\n".join(open(f, encoding="utf-8").read() for f in files)


def char_tokens(text: str, seq_len: int, n: int, seed: int = 0, specials: int = 4):
    """``n`` random windows of ``seq_len`` characters as ids ``[n, seq_len]``; ids ``0..specials-1`` are left free
    for special tokens (pad, cls, sep, mask).  Returns ``(ids, vocab_size)``."""
    chars = sorted(set(text))
    lookup = {c: i + specials for i, c in enumerate(chars)}
    ids = torch.tensor([lookup[c] for c in text], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len, (n,), generator=g)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()]), len(chars) + specials
