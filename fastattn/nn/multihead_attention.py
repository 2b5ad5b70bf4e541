"""``fastattn.MultiheadAttention``: a drop-in for ``torch.nn.MultiheadAttention`` running on fastattn's ops.

Same constructor, same parameters (names, shapes, initialisation: state_dicts load both ways with
``strict=True``), same ``forward`` signature, shapes, mask semantics and errors as
``torch.nn.MultiheadAttention`` (torch's contract lives in ``torch/nn/functional.py``:
``multi_head_attention_forward``, ``_mha_shape_check``, ``_canonical_mask``).

Two computation paths:

* ``need_weights=False``: the fused op ``fastattn.attention`` (dispatch picks the backend; the ``backend=``
  constructor argument narrows the choice).  No ``[L, S]`` probabilities are materialised by the fused
  backends, masks are passed as broadcastable views (``key_padding_mask`` as ``[N, 1, 1, S]``, a 2-D
  ``attn_mask`` as ``[L, S]``) and the projected q/k/v are read in place as strided ``[N, H, L, D]`` views.
* ``need_weights=True`` (torch's default): the weights have to exist, so the probabilities are computed
  with the reference math (``fastattn.backends.reference.reference_probabilities``), dropout is applied to
  them with ``F.dropout`` exactly as torch does, and the output is ``weights @ v``.
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Module, Parameter
from torch.nn.init import constant_, xavier_normal_, xavier_uniform_
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .. import dispatch
from ..backends.reference import reference_probabilities
from ..functional import attention
from ..problem import CAUSAL_NONE, CAUSAL_TOP_LEFT

__all__ = ["MultiheadAttention"]


# ---------------------------------------------------------------------------------------------------------
# Input checks, in the order torch makes them, raising the exception types torch raises.
# ---------------------------------------------------------------------------------------------------------
def _check_mask_dtype(mask: Optional[Tensor], name: str) -> None:
    """torch accepts only bool and floating masks (``_canonical_mask`` raises AssertionError)."""
    if mask is not None and mask.dtype != torch.bool and not torch.is_floating_point(mask):
        raise AssertionError(f"only bool and floating types of {name} are supported, got {mask.dtype}")


def _check_dims(query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor],
                attn_mask: Optional[Tensor], num_heads: int) -> bool:
    """The number-of-dimensions checks of torch's ``_mha_shape_check``.  Returns whether the input is batched."""
    if query.dim() == 3:
        if key.dim() != 3 or value.dim() != 3:
            raise AssertionError(f"For batched (3-D) `query`, expected `key` and `value` to be 3-D but found "
                                 f"{key.dim()}-D and {value.dim()}-D tensors respectively")
        if key_padding_mask is not None and key_padding_mask.dim() != 2:
            raise AssertionError(f"For batched (3-D) `query`, expected `key_padding_mask` to be `None` or 2-D "
                                 f"but found {key_padding_mask.dim()}-D tensor instead")
        if attn_mask is not None and attn_mask.dim() not in (2, 3):
            raise AssertionError(f"For batched (3-D) `query`, expected `attn_mask` to be `None`, 2-D or 3-D "
                                 f"but found {attn_mask.dim()}-D tensor instead")
        return True
    if query.dim() == 2:
        if key.dim() != 2 or value.dim() != 2:
            raise AssertionError(f"For unbatched (2-D) `query`, expected `key` and `value` to be 2-D but found "
                                 f"{key.dim()}-D and {value.dim()}-D tensors respectively")
        if key_padding_mask is not None and key_padding_mask.dim() != 1:
            raise AssertionError(f"For unbatched (2-D) `query`, expected `key_padding_mask` to be `None` or 1-D "
                                 f"but found {key_padding_mask.dim()}-D tensor instead")
        if attn_mask is not None:
            if attn_mask.dim() not in (2, 3):
                raise AssertionError(f"For unbatched (2-D) `query`, expected `attn_mask` to be `None`, 2-D or "
                                     f"3-D but found {attn_mask.dim()}-D tensor instead")
            expected = (num_heads, query.shape[0], key.shape[0])
            if attn_mask.dim() == 3 and tuple(attn_mask.shape) != expected:
                raise AssertionError(f"Expected `attn_mask` shape to be {expected} but got "
                                     f"{tuple(attn_mask.shape)}")
        return False
    raise AssertionError(f"query should be unbatched 2D or batched 3D tensor but received {query.dim()}-D "
                         f"query tensor")


def _to_additive(blocked: Tensor, dtype: torch.dtype) -> Tensor:
    """torch's bool mask (True = masked out) as an additive float mask: 0 where allowed, -inf where not."""
    return torch.zeros_like(blocked, dtype=dtype).masked_fill_(blocked, float("-inf"))


def _merge_masks(attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], N: int, H: int,
                 n_extra_keys: int, dtype: torch.dtype) -> Optional[Tensor]:
    """One mask in fastattn's convention (bool True = attend, or float added to the scores), broadcastable to
    ``[N, H, L, S + n_extra_keys]``.

    ``attn_mask`` is ``[L, S]`` or ``[N*H, L, S]`` and ``key_padding_mask`` ``[N, S]``, both already
    shape-checked and in torch's convention (bool True = masked out).  Two bool masks stay bool; as soon as
    one is float, bool ones become 0/-inf in ``dtype`` (what torch's ``_canonical_mask`` does) and the masks
    are added.  The ``n_extra_keys`` columns of ``bias_k`` / ``add_zero_attn`` are always allowed.
    """
    parts = []
    if attn_mask is not None:
        parts.append(attn_mask if attn_mask.dim() == 2 else attn_mask.unflatten(0, (N, H)))  # [L,S] / [N,H,L,S]
    if key_padding_mask is not None:
        parts.append(key_padding_mask[:, None, None, :])  # [N, 1, 1, S]
    if not parts:
        return None
    if all(p.dtype == torch.bool for p in parts):
        blocked = parts[0] if len(parts) == 1 else parts[0] | parts[1]
        mask, allowed = ~blocked, True  # the boundary: torch's True = masked out -> fastattn's True = attend
    else:
        parts = [_to_additive(p, dtype) if p.dtype == torch.bool else p for p in parts]
        mask, allowed = (parts[0] if len(parts) == 1 else parts[0] + parts[1]), 0.0
    if n_extra_keys:
        mask = torch.cat([mask, mask.new_full(mask.shape[:-1] + (n_extra_keys,), allowed)], dim=-1)
    return mask


class MultiheadAttention(Module):
    r"""Drop-in replacement for :class:`torch.nn.MultiheadAttention` computed with fastattn's attention ops.

    Constructor, parameters (``in_proj_weight`` -- or ``q_proj_weight`` / ``k_proj_weight`` /
    ``v_proj_weight`` when ``kdim`` / ``vdim`` differ from ``embed_dim`` -- ``in_proj_bias``, ``out_proj``,
    ``bias_k``, ``bias_v``), their initialisation, ``forward``'s signature, output shapes, mask semantics and
    the exceptions raised for bad masks and shapes are those of ``torch.nn.MultiheadAttention``: a
    state_dict saved from one loads into the other with ``strict=True``, and with the same seed both
    constructors draw the same initial parameters.

    Args:
        embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first, device,
            dtype: as in ``torch.nn.MultiheadAttention``.  ``dropout`` applies only in training mode.
        backend: (keyword-only, fastattn extra) a backend name or list of names passed to
            ``fastattn.attention`` on the fused path (``need_weights=False``); ``None`` lets dispatch choose
            (see ``fastattn.explain``).  The ``need_weights=True`` path always uses the reference math.

    Masks use torch's convention (a bool ``True`` means "masked out"; a float mask is added to the scores)
    and are converted to fastattn's (``True`` = attend) here.  ``is_causal`` is, as in torch, only a hint
    about ``attn_mask``: it needs ``attn_mask`` (RuntimeError otherwise), and when ``need_weights=False``
    and there is no ``key_padding_mask`` the causal mask is applied instead of ``attn_mask`` (as torch
    does, so fused kernels can skip the masked blocks); otherwise ``attn_mask`` is used.

    Where fastattn differs from torch:

    * **Fully masked rows** (a query that may attend to no key): fastattn returns attention weights 0 for the
      row and an attention output equal to ``out_proj.bias`` (0 before the output projection), with zero
      gradients -- never NaN.  torch returns NaN on its ``need_weights=True`` path.
    * **Dropout with need_weights=False** uses fastattn's seeded dropout (the seed is drawn from torch's
      default generator, so ``torch.manual_seed`` makes it reproducible): same distribution as torch's, a
      different random pattern.  With ``need_weights=True`` dropout is ``F.dropout`` on the weights, as in
      torch (the returned weights are the post-dropout ones, like torch's).
    * torch's inference fast path (``torch._native_multi_head_attention``) and NestedTensor inputs are not
      used / supported.  Consequently ``is_causal=True`` without ``attn_mask`` always raises, whereas
      torch's fast path silently ignores ``is_causal`` there.
    * A float mask whose dtype differs from the query's is rejected with a RuntimeError as torch does
      (``need_weights=True``: any other dtype; ``need_weights=False``: any other than float32).
    * With ``batch_first=True`` the output is a contiguous ``(N, L, E)`` tensor (torch returns a transposed
      view).  Head dims above ``fastattn.MAX_HEAD_DIM`` (the Triton kernels' limit) are
      served by dispatch's other backends, or raise if ``backend`` excludes them.  Not TorchScript-able.
    """

    bias_k: Optional[Tensor]
    bias_v: Optional[Tensor]

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None, *, backend=None) -> None:
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"embed_dim and num_heads must be greater than 0, got embed_dim={embed_dim} and "
                             f"num_heads={num_heads} instead")
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        if self.head_dim * num_heads != embed_dim:
            raise AssertionError("embed_dim must be divisible by num_heads")
        # Validate the backend names now rather than at the first forward.
        dispatch._parse(backend, "backend")
        self.backend = backend

        # Parameters are created in torch's order, so the same seed draws the same initial values.
        if self._qkv_same_embed_dim:
            self.in_proj_weight = Parameter(torch.empty((3 * embed_dim, embed_dim), **factory_kwargs))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = Parameter(torch.empty((embed_dim, embed_dim), **factory_kwargs))
            self.k_proj_weight = Parameter(torch.empty((embed_dim, self.kdim), **factory_kwargs))
            self.v_proj_weight = Parameter(torch.empty((embed_dim, self.vdim), **factory_kwargs))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = Parameter(torch.empty(3 * embed_dim, **factory_kwargs))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias, **factory_kwargs)
        if add_bias_kv:
            self.bias_k = Parameter(torch.empty((1, 1, embed_dim), **factory_kwargs))
            self.bias_v = Parameter(torch.empty((1, 1, embed_dim), **factory_kwargs))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """torch's initialisation: xavier_uniform_ projections, zero biases, xavier_normal_ bias_k / bias_v."""
        if self._qkv_same_embed_dim:
            xavier_uniform_(self.in_proj_weight)
        else:
            xavier_uniform_(self.q_proj_weight)
            xavier_uniform_(self.k_proj_weight)
            xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            constant_(self.in_proj_bias, 0.0)
            constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            xavier_normal_(self.bias_k)
        if self.bias_v is not None:
            xavier_normal_(self.bias_v)

    def __setstate__(self, state):
        # Like torch: pickles of v1.1.0-era modules lack _qkv_same_embed_dim (and ours may lack backend).
        state.setdefault("_qkv_same_embed_dim", True)
        state.setdefault("backend", None)
        super().__setstate__(state)

    def extra_repr(self) -> str:
        return "" if self.backend is None else f"backend={self.backend!r}"

    # -----------------------------------------------------------------------------------------------------
    def _project(self, query: Tensor, key: Tensor, value: Tensor, same_qkv: bool,
                 same_kv: bool) -> Tuple[Tensor, Tensor, Tensor]:
        """The input projections of batch-first ``[N, L, E]`` inputs, one matmul for shared inputs (as torch)."""
        E = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
        if not self._qkv_same_embed_dim:
            if key.size(-1) != self.kdim:
                raise AssertionError(f"expecting key weights shape of {(E, key.size(-1))}, but got "
                                     f"{tuple(self.k_proj_weight.shape)}")
            if value.size(-1) != self.vdim:
                raise AssertionError(f"expecting value weights shape of {(E, value.size(-1))}, but got "
                                     f"{tuple(self.v_proj_weight.shape)}")
            return (F.linear(query, self.q_proj_weight, bq), F.linear(key, self.k_proj_weight, bk),
                    F.linear(value, self.v_proj_weight, bv))
        w = self.in_proj_weight
        if same_qkv:  # self-attention: one [N, L, 3E] matmul, q/k/v are strided views of it
            return F.linear(query, w, b).unflatten(-1, (3, E)).unbind(-2)
        q = F.linear(query, w[:E], bq)
        if same_kv:  # encoder-decoder attention: one [N, S, 2E] matmul for k and v
            k, v = F.linear(key, w[E:], None if b is None else b[E:]).unflatten(-1, (2, E)).unbind(-2)
            return q, k, v
        return q, F.linear(key, w[E:2 * E], bk), F.linear(value, w[2 * E:], bv)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        r"""Attention of ``query`` over ``key`` / ``value``, as ``torch.nn.MultiheadAttention.forward``.

        Args:
            query: ``(L, E)`` unbatched, ``(L, N, E)``, or ``(N, L, E)`` with ``batch_first=True``.
            key: ``(S, kdim)``, ``(S, N, kdim)`` or ``(N, S, kdim)``; value: likewise with ``vdim``.
            key_padding_mask: ``(N, S)`` or ``(S,)`` unbatched; bool (True = ignore this key) or float (added).
            need_weights: also return the attention weights (computed with the reference math).  ``False``
                runs the fused ``fastattn.attention``.
            attn_mask: ``(L, S)`` or ``(N * num_heads, L, S)``; bool (True = not allowed) or float (added).
            average_attn_weights: average the returned weights over heads.
            is_causal: hint that ``attn_mask`` is the causal mask (see the class docstring).

        Returns:
            ``(attn_output, attn_weights)``: the output has the query's layout with ``E`` features; the
            weights (``None`` unless ``need_weights``) are ``(N, L, S)`` averaged or ``(N, num_heads, L, S)``,
            without the ``N`` for unbatched inputs.  ``S`` counts the ``bias_k`` / ``add_zero_attn`` keys.
            A fully masked query row gives weights 0 and output ``out_proj.bias`` (torch: NaN).
        """
        # Mask dtypes first, then dimensions, as torch does.
        _check_mask_dtype(key_padding_mask, "key_padding_mask")
        if key_padding_mask is not None and attn_mask is not None and key_padding_mask.dtype != attn_mask.dtype:
            warnings.warn("Support for mismatched key_padding_mask and attn_mask is deprecated. Use same type "
                          "for both instead.", stacklevel=2)
        _check_mask_dtype(attn_mask, "attn_mask")
        batched = _check_dims(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        same_qkv, same_kv = query is key and key is value, key is value

        key_shape, value_shape = tuple(key.shape), tuple(value.shape)  # as given, for the error messages
        # Work batch-first, [N, L, E]: then the head split is a free view ([N, L, H, D] -> [N, H, L, D]).
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        N, L, E = query.shape
        S = key.shape[1]
        H, D = self.num_heads, self.head_dim

        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                               "module method `generate_square_subsequent_mask` to create this mask.")
        # torch's rule: the hint replaces attn_mask only on the fused path with no key_padding_mask.
        causal_hint = bool(is_causal) and key_padding_mask is None and not need_weights
        if causal_hint:
            attn_mask = None

        if E != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but got {E}")
        if self._qkv_same_embed_dim:
            if key.shape != value.shape:
                raise AssertionError(f"key shape {key_shape} does not match value shape {value_shape}")
        elif key.shape[:2] != value.shape[:2]:
            raise AssertionError(f"key's leading dims {key_shape[:-1]} do not match value's "
                                 f"{value_shape[:-1]}")

        q, k, v = self._project(query, key, value, same_qkv, same_kv)

        if attn_mask is not None:
            expected = (L, S) if attn_mask.dim() == 2 else (N * H, L, S)
            if tuple(attn_mask.shape) != expected:
                raise RuntimeError(f"The shape of the {attn_mask.dim()}D attn_mask is {tuple(attn_mask.shape)}, "
                                   f"but should be {expected}.")
        if k.shape[0] != N:
            raise RuntimeError(f"key: batch size {k.shape[0]} does not match query's {N}")

        # Extra keys: the learned bias_k / bias_v, then a zero key and value (add_zero_attn).
        extra_k, extra_v = [], []
        if (self.bias_k is None) != (self.bias_v is None):
            raise AssertionError("bias_k and bias_v must be both set or both None")
        if self.bias_k is not None:
            extra_k.append(self.bias_k.expand(N, 1, E))
            extra_v.append(self.bias_v.expand(N, 1, E))
        if self.add_zero_attn:
            extra_k.append(k.new_zeros(N, 1, E))
            extra_v.append(v.new_zeros(N, 1, E))
        if extra_k:
            k, v = torch.cat([k] + extra_k, dim=1), torch.cat([v] + extra_v, dim=1)

        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (N, S):
            raise AssertionError(f"Expected key_padding_mask shape to be {(N, S)} (or {(S,)} unbatched), but got "
                                 f"{tuple(key_padding_mask.shape)}")

        mask = _merge_masks(attn_mask, key_padding_mask, N, H, len(extra_k), query.dtype)
        if mask is not None and mask.dtype != torch.bool and mask.dtype != query.dtype and (
                need_weights or mask.dtype != torch.float32):
            raise RuntimeError(f"float masks must have the query's dtype {query.dtype}"
                               f"{'' if need_weights else ' or float32'}, got {mask.dtype}")

        # [N, L, E] -> [N, H, L, D] strided views, no copy.
        qh, kh, vh = (t.unflatten(-1, (H, D)).transpose(1, 2) for t in (q, k, v))
        dropout_p = float(self.dropout) if self.training else 0.0
        causal = CAUSAL_TOP_LEFT if causal_hint else CAUSAL_NONE

        weights = None
        if need_weights or dropout_p >= 1.0:
            # Materialised probabilities (reference math); dropout on them as torch does.
            weights = reference_probabilities(qh, kh, mask, causal, D ** -0.5).to(qh.dtype)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = weights @ vh
        else:
            out = attention(qh, kh, vh, attn_mask=mask, causal=causal, dropout_p=dropout_p, backend=self.backend)

        # [N, H, L, D] -> the caller's layout, then the output projection.
        if batched and not self.batch_first:
            out = out.permute(2, 0, 1, 3).reshape(L, N, E)
        else:
            out = out.transpose(1, 2).reshape(N, L, E)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        if not batched:
            out = out.squeeze(0)

        if not need_weights:
            return out, None
        if average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            weights = weights.squeeze(0)
        return out, weights
