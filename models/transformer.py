"""The encoder-decoder Transformer of Vaswani et al. 2017, "Attention Is All You Need", with decoding.

    model = create_model("transformer_base")                        # 63.1M parameters, shared 37k vocabulary
    logits = model(src, tgt_in, src_key_padding_mask=src == pad)    # [B, T, vocab]
    out = model.eval().greedy_decode(src, max_len=50, bos_id=1, eos_id=2)
    out = model.beam_search(src, beam_size=4, max_len=50, bos_id=1, eos_id=2, length_penalty=0.6)
    ours = fastattn.models.from_torch(torch.nn.Transformer(...))    # torch's layer weights loaded

Architecture (the paper's §3): token embeddings scaled by ``sqrt(d_model)`` plus a positional encoding
(interleaved sinusoids ``PE(pos, 2i) = sin(pos / 10000^(2i/d))``, ``PE(pos, 2i+1) = cos(...)``, or a learned
table -- Table 3 row (E)), dropout; ``N`` post-LN encoder layers (self-attention, feed-forward ReLU network,
each wrapped as ``LayerNorm(x + dropout(sublayer(x)))``); ``N`` post-LN decoder layers (masked self-attention,
encoder-decoder attention, feed-forward); a pre-softmax linear projection to the vocabulary.  With one shared
vocabulary the source embedding, the target embedding and the pre-softmax projection are one matrix (§3.4).

The encoder/decoder stack uses torch's module and parameter names (``encoder.layers.0.self_attn.in_proj_weight``,
``decoder.layers.0.multihead_attn.out_proj.weight``, ``linear1``, ``norm3`` ...) with
``fastattn.nn.MultiheadAttention`` (torch's drop-in) as the attention, so ``torch.nn.Transformer``'s
``encoder`` / ``decoder`` state_dicts load with ``strict=True``.  Our stack is always batch-first.

Final norms: the paper's post-LN model ends every layer with a LayerNorm, so it has no extra norm after the
stacks (``final_norm=False``, the named configurations).  ``torch.nn.Transformer`` always adds one LayerNorm
after the encoder stack and one after the decoder stack (``encoder.norm`` / ``decoder.norm``, needed by its
``norm_first=True`` variant); ``final_norm=True`` reproduces that, and ``from_torch`` sets it.

Decoding (``greedy_decode``, ``beam_search``) runs the decoder incrementally: each step feeds one new token; the
decoder self-attention appends its key/value to a per-layer ``KVCache`` and attends with
``causal="bottom_right"``, and the encoder-decoder attention projects the memory's keys/values once (see
``fastattn.nn.incremental``).  ``use_cache=False`` recomputes the whole prefix every step instead (same tokens).
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastattn.nn import KVCache, MultiheadAttention
from fastattn.nn.incremental import cross_attention_step, self_attention_step

from ._registry import register_converter, register_model
from .layers import sinusoidal_position_encoding

__all__ = ["Transformer", "TransformerEncoder", "TransformerDecoder", "TransformerEncoderLayer",
           "TransformerDecoderLayer", "PositionalEncoding", "DecoderState", "transformer_base", "transformer_big",
           "from_torch_transformer"]

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


def _activation(name: str):
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation: expected one of {sorted(_ACTIVATIONS)}, got {name!r}")
    return _ACTIVATIONS[name]


# ---------------------------------------------------------------------------------------------------------
# Layers (torch.nn.TransformerEncoderLayer / TransformerDecoderLayer names)
# ---------------------------------------------------------------------------------------------------------
class TransformerEncoderLayer(nn.Module):
    """Self-attention and a feed-forward network, each a residual sub-layer; post-LN (the paper):
    ``x = norm1(x + dropout1(self_attn(x)))``, ``x = norm2(x + dropout2(linear2(dropout(act(linear1(x))))))``;
    ``norm_first=True`` normalises the sub-layer input instead (pre-LN).  Batch-first ``[B, S, d_model]``."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 attn_drop: float = 0.0, activation: str = "relu", layer_norm_eps: float = 1e-5,
                 norm_first: bool = False, backend=None):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=attn_drop, batch_first=True, backend=backend)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm_first = norm_first
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation_name = activation
        self.activation = _activation(activation)

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal):
        x = self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                           is_causal=is_causal, need_weights=False)[0]
        return self.dropout1(x)

    def _ff_block(self, x):
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        """Masks in torch's convention (bool True = not allowed / padding; float added to the scores)."""
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
        return self.norm2(x + self._ff_block(x))


class TransformerDecoderLayer(nn.Module):
    """Masked self-attention, encoder-decoder attention (``multihead_attn``) and a feed-forward network, each a
    residual sub-layer with ``norm1`` / ``norm2`` / ``norm3``; post-LN unless ``norm_first``.  Batch-first.

    ``forward`` runs a whole target sequence (torch's signature); ``forward_step`` runs new tokens only, with
    the self-attention keys/values of the earlier ones in ``self_cache`` and the memory's in ``cross_cache``."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 attn_drop: float = 0.0, activation: str = "relu", layer_norm_eps: float = 1e-5,
                 norm_first: bool = False, backend=None):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=attn_drop, batch_first=True, backend=backend)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout=attn_drop, batch_first=True,
                                                 backend=backend)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm_first = norm_first
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm3 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation_name = activation
        self.activation = _activation(activation)

    def _ff_block(self, x):
        return self.dropout3(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def _residuals(self, x, self_attn, cross_attn):
        """The three residual sub-layers around ``self_attn(h)`` and ``cross_attn(h)`` (functions of the
        normalised or raw stream), shared by the full and the incremental paths."""
        if self.norm_first:
            x = x + self.dropout1(self_attn(self.norm1(x)))
            x = x + self.dropout2(cross_attn(self.norm2(x)))
            return x + self._ff_block(self.norm3(x))
        x = self.norm1(x + self.dropout1(self_attn(x)))
        x = self.norm2(x + self.dropout2(cross_attn(x)))
        return self.norm3(x + self._ff_block(x))

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Optional[Tensor] = None,
                memory_mask: Optional[Tensor] = None, tgt_key_padding_mask: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None, tgt_is_causal: bool = False,
                memory_is_causal: bool = False) -> Tensor:
        """Masks in torch's convention; ``tgt_is_causal`` is torch's hint that ``tgt_mask`` is the causal mask."""
        def self_attn(h):
            return self.self_attn(h, h, h, attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask,
                                  is_causal=tgt_is_causal, need_weights=False)[0]

        def cross_attn(h):
            return self.multihead_attn(h, memory, memory, attn_mask=memory_mask,
                                       key_padding_mask=memory_key_padding_mask, is_causal=memory_is_causal,
                                       need_weights=False)[0]
        return self._residuals(tgt, self_attn, cross_attn)

    def forward_step(self, x: Tensor, memory: Optional[Tensor], self_cache: KVCache, cross_cache: KVCache,
                     memory_key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """The new target tokens ``x`` ``[B, n, d_model]`` after the cached ones (``memory`` is read only while
        ``cross_cache`` is empty)."""
        return self._residuals(
            x, lambda h: self_attention_step(self.self_attn, h, self_cache),
            lambda h: cross_attention_step(self.multihead_attn, h, cross_cache, memory, memory_key_padding_mask))


class TransformerEncoder(nn.Module):
    """``layers`` then the optional final ``norm`` (torch.nn.TransformerEncoder's names)."""

    def __init__(self, layers: List[TransformerEncoderLayer], norm: Optional[nn.Module] = None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm

    def forward(self, src: Tensor, mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        x = src
        for layer in self.layers:
            x = layer(x, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=is_causal)
        return x if self.norm is None else self.norm(x)


class TransformerDecoder(nn.Module):
    """``layers`` then the optional final ``norm`` (torch.nn.TransformerDecoder's names)."""

    def __init__(self, layers: List[TransformerDecoderLayer], norm: Optional[nn.Module] = None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Optional[Tensor] = None,
                memory_mask: Optional[Tensor] = None, tgt_key_padding_mask: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None, tgt_is_causal: bool = False,
                memory_is_causal: bool = False) -> Tensor:
        x = tgt
        for layer in self.layers:
            x = layer(x, memory, tgt_mask=tgt_mask, memory_mask=memory_mask, tgt_key_padding_mask=tgt_key_padding_mask,
                      memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=tgt_is_causal,
                      memory_is_causal=memory_is_causal)
        return x if self.norm is None else self.norm(x)


# ---------------------------------------------------------------------------------------------------------
# Embeddings, decoding state
# ---------------------------------------------------------------------------------------------------------
class PositionalEncoding(nn.Module):
    """Adds position codes to ``[B, L, d_model]`` tokens starting at position ``offset``: the paper's
    interleaved sinusoids (a non-persistent buffer, no parameters) or a learned ``[max_len, d_model]`` table."""

    def __init__(self, d_model: int, max_len: int = 1024, learned: bool = False):
        super().__init__()
        self.max_len = max_len
        self.learned = learned
        if learned:
            self.weight = nn.Parameter(torch.empty(max_len, d_model))
            nn.init.normal_(self.weight, std=d_model ** -0.5)
        else:
            self.register_buffer("weight", sinusoidal_position_encoding(max_len, d_model, interleaved=True),
                                 persistent=False)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        return x + self.weight[offset:offset + x.shape[1]].to(x.dtype)

    def extra_repr(self) -> str:
        return f"max_len={self.max_len}, learned={self.learned}"


class DecoderState:
    """What incremental decoding keeps between steps: per decoder layer, the self-attention ``KVCache`` and the
    encoder-decoder attention's projected memory keys/values; the memory and its padding mask; the number of
    target positions fed so far (the position of the next token).  ``reorder(index)`` keeps batch rows
    ``index`` (the surviving beams of beam search)."""

    def __init__(self, num_layers: int, memory: Tensor, memory_key_padding_mask: Optional[Tensor]):
        self.self_caches = [KVCache() for _ in range(num_layers)]
        self.cross_caches = [KVCache() for _ in range(num_layers)]
        self.memory = memory
        self.memory_key_padding_mask = memory_key_padding_mask
        self.offset = 0

    def reorder(self, index: Tensor) -> None:
        for cache in self.self_caches + self.cross_caches:
            cache.reorder(index)
        self.memory = self.memory.index_select(0, index)
        if self.memory_key_padding_mask is not None:
            self.memory_key_padding_mask = self.memory_key_padding_mask.index_select(0, index)


def _gnmt_length_penalty(length: Tensor, alpha: float) -> Tensor:
    """Wu et al. 2016's ``((5 + |Y|) / 6) ** alpha`` (alpha = 0: no normalisation; the paper used 0.6)."""
    return ((5.0 + length.to(torch.float32)) / 6.0) ** alpha


# ---------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------
class Transformer(nn.Module):
    """Encoder-decoder Transformer.

    Args:
        vocab_size: the (shared) vocabulary; the paper's English-German BPE vocabulary has 37000 tokens.
        tgt_vocab_size: ``None`` (the paper): one vocabulary, and the source embedding, target embedding and
            pre-softmax projection share one matrix.  A number: a separate target vocabulary; the target
            embedding and the pre-softmax projection still share their matrix.
        d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward: Table 3's ``d_model``, ``h``,
            ``N``, ``N``, ``d_ff`` (``d_k = d_v = d_model / h``).
        dropout: ``P_drop``, on every sub-layer output and on the embedding sums.
        attn_drop: dropout on the attention probabilities (0 in the paper).
        activation: ``"relu"`` (the paper) or ``"gelu"``.
        layer_norm_eps: LayerNorm epsilon (not given in the paper; torch's default).
        norm_first: pre-LN layers (torch's option; the paper is post-LN).
        final_norm: a LayerNorm after each stack (``torch.nn.Transformer`` has them; see the module docstring).
        pos_embed: ``"sinusoidal"`` (the paper) or ``"learned"`` (Table 3 row (E)).
        max_len: the longest source/target sequence (the size of the position table).
        backend: restricts the attention backend (see ``fastattn.explain``).

    Token inputs are ``[B, L]`` integer ids; padding masks are ``[B, L]`` bools, True at padding (torch's
    convention).  ``forward`` returns logits ``[B, T, vocab]`` for decoder inputs ``tgt`` (teacher forcing:
    ``tgt`` is the target shifted right, starting with the begin token).
    """

    def __init__(self, vocab_size: int = 37000, tgt_vocab_size: Optional[int] = None, d_model: int = 512,
                 nhead: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 2048, dropout: float = 0.1, attn_drop: float = 0.0,
                 activation: str = "relu", layer_norm_eps: float = 1e-5, norm_first: bool = False,
                 final_norm: bool = False, pos_embed: str = "sinusoidal", max_len: int = 1024, backend=None):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("d_model", d_model), ("nhead", nhead),
                            ("num_encoder_layers", num_encoder_layers), ("num_decoder_layers", num_decoder_layers),
                            ("dim_feedforward", dim_feedforward), ("max_len", max_len)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if tgt_vocab_size is not None and (not isinstance(tgt_vocab_size, int) or tgt_vocab_size < 1):
            raise ValueError(f"tgt_vocab_size: expected None or a positive int, got {tgt_vocab_size!r}")
        if d_model % nhead:
            raise ValueError(f"nhead: {nhead} heads do not divide d_model={d_model}")
        if pos_embed not in ("sinusoidal", "learned"):
            raise ValueError(f"pos_embed: expected 'sinusoidal' or 'learned', got {pos_embed!r}")
        _activation(activation)
        self.src_vocab_size = vocab_size
        self.tgt_vocab_size = vocab_size if tgt_vocab_size is None else tgt_vocab_size
        self.d_model = d_model
        self.nhead = nhead
        self.max_len = max_len

        self.src_embed = nn.Embedding(vocab_size, d_model)
        self.tgt_embed = self.src_embed if tgt_vocab_size is None else nn.Embedding(tgt_vocab_size, d_model)
        self.pos_embed = PositionalEncoding(d_model, max_len, learned=pos_embed == "learned")
        self.embed_drop = nn.Dropout(dropout)

        layer_args = dict(d_model=d_model, nhead=nhead, dim_feedforward=dim_feedforward, dropout=dropout,
                          attn_drop=attn_drop, activation=activation, layer_norm_eps=layer_norm_eps,
                          norm_first=norm_first, backend=backend)
        self.encoder = TransformerEncoder(
            [TransformerEncoderLayer(**layer_args) for _ in range(num_encoder_layers)],
            nn.LayerNorm(d_model, eps=layer_norm_eps) if final_norm else None)
        self.decoder = TransformerDecoder(
            [TransformerDecoderLayer(**layer_args) for _ in range(num_decoder_layers)],
            nn.LayerNorm(d_model, eps=layer_norm_eps) if final_norm else None)
        # The pre-softmax projection shares the target embedding's matrix (no bias).
        self.generator = nn.Linear(d_model, self.tgt_vocab_size, bias=False)
        self.generator.weight = self.tgt_embed.weight
        self._init_weights()

    def _init_weights(self) -> None:
        # Stack matrices: xavier_uniform_ (as torch.nn.Transformer).  Embeddings: N(0, d_model^-1/2), so the
        # sqrt(d_model)-scaled embeddings have unit variance (the tensor2tensor recipe for shared embeddings).
        for stack in (self.encoder, self.decoder):
            for p in stack.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        for emb in {id(self.src_embed): self.src_embed, id(self.tgt_embed): self.tgt_embed}.values():
            nn.init.normal_(emb.weight, std=self.d_model ** -0.5)

    # -- input checks -------------------------------------------------------------------------------------
    def _check_tokens(self, x, name: str, vocab: int) -> None:
        if not isinstance(x, Tensor) or x.dim() != 2 or x.dtype not in (torch.long, torch.int32, torch.int16,
                                                                        torch.int8, torch.uint8):
            what = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name}: expected integer token ids [batch, length], got {what}")
        if x.shape[1] < 1 or x.shape[1] > self.max_len:
            raise ValueError(f"{name}: length {x.shape[1]} is outside 1..max_len={self.max_len}")
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= vocab):
            raise ValueError(f"{name}: token ids must lie in [0, {vocab}), got {int(x.min())}..{int(x.max())}")

    @staticmethod
    def _check_padding(mask, name: str, tokens: Tensor) -> None:
        if mask is None:
            return
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(tokens.shape):
            what = f"{mask.dtype} tensor of shape {tuple(mask.shape)}" if isinstance(mask, Tensor) else \
                type(mask).__name__
            raise ValueError(f"{name}: expected a bool tensor of shape {tuple(tokens.shape)} (True = padding), "
                             f"got {what}")

    def _check_memory(self, memory, batch: Optional[int] = None) -> None:
        """``memory``: the encoder output ``[batch, S, d_model]`` (any batch size when ``batch`` is None)."""
        if not isinstance(memory, Tensor) or memory.dim() != 3 or memory.shape[2] != self.d_model or \
                (batch is not None and memory.shape[0] != batch):
            what = tuple(memory.shape) if isinstance(memory, Tensor) else type(memory).__name__
            raise ValueError(f"memory: expected the encoder output [{'B' if batch is None else batch}, S, "
                             f"{self.d_model}], got {what}")

    def _check_memory_mask(self, mask, memory: Tensor) -> None:
        if mask is not None and (not isinstance(mask, Tensor) or mask.dtype != torch.bool
                                 or tuple(mask.shape) != tuple(memory.shape[:2])):
            raise ValueError(f"memory_key_padding_mask: expected a bool tensor of shape {tuple(memory.shape[:2])} "
                             f"(True = padding)")

    # -- the forward pass ---------------------------------------------------------------------------------
    def _embed(self, tokens: Tensor, embed: nn.Embedding, offset: int = 0) -> Tensor:
        x = embed(tokens) * math.sqrt(self.d_model)
        return self.embed_drop(self.pos_embed(x, offset))

    def encode(self, src: Tensor, src_key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """The encoder output ("memory") ``[B, S, d_model]`` of source ids ``src`` ``[B, S]``."""
        self._check_tokens(src, "src", self.src_vocab_size)
        self._check_padding(src_key_padding_mask, "src_key_padding_mask", src)
        return self.encoder(self._embed(src, self.src_embed), src_key_padding_mask=src_key_padding_mask)

    def decode(self, tgt: Tensor, memory: Tensor, tgt_key_padding_mask: Optional[Tensor] = None,
               memory_key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """Decoder states ``[B, T, d_model]`` of target inputs ``tgt`` ``[B, T]`` (causally masked)."""
        self._check_tokens(tgt, "tgt", self.tgt_vocab_size)
        self._check_padding(tgt_key_padding_mask, "tgt_key_padding_mask", tgt)
        self._check_memory(memory, tgt.shape[0])
        self._check_memory_mask(memory_key_padding_mask, memory)
        T = tgt.shape[1]
        # torch's convention: True = not allowed (a future key).  With is_causal=True MultiheadAttention runs
        # the kernel's own causal masking whenever it can (no key padding mask) and this mask otherwise.
        causal = torch.ones(T, T, dtype=torch.bool, device=tgt.device).triu_(1)
        return self.decoder(self._embed(tgt, self.tgt_embed), memory, tgt_mask=causal,
                            tgt_key_padding_mask=tgt_key_padding_mask,
                            memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=True)

    def forward_features(self, src: Tensor, tgt: Tensor, src_key_padding_mask: Optional[Tensor] = None,
                         tgt_key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """Decoder states ``[B, T, d_model]``."""
        if isinstance(src, Tensor) and isinstance(tgt, Tensor) and src.dim() == tgt.dim() == 2 and \
                tgt.shape[0] != src.shape[0]:
            raise ValueError(f"tgt: batch size {tgt.shape[0]} differs from src's {src.shape[0]}")
        memory = self.encode(src, src_key_padding_mask)
        return self.decode(tgt, memory, tgt_key_padding_mask, src_key_padding_mask)

    def forward_head(self, x: Tensor) -> Tensor:
        """Logits over the target vocabulary (the pre-softmax projection)."""
        return self.generator(x)

    def forward(self, src: Tensor, tgt: Tensor, src_key_padding_mask: Optional[Tensor] = None,
                tgt_key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """Logits ``[B, T, tgt_vocab]`` for source ids ``src`` ``[B, S]`` and target inputs ``tgt`` ``[B, T]``."""
        return self.forward_head(self.forward_features(src, tgt, src_key_padding_mask, tgt_key_padding_mask))

    # -- incremental decoding ---------------------------------------------------------------------------
    def init_decoder_state(self, memory: Tensor, memory_key_padding_mask: Optional[Tensor] = None) -> DecoderState:
        """A fresh incremental-decoding state for the encoder output ``memory`` (see ``decode_step``)."""
        self._check_memory(memory)
        self._check_memory_mask(memory_key_padding_mask, memory)
        return DecoderState(len(self.decoder.layers), memory, memory_key_padding_mask)

    def decode_step(self, tokens: Tensor, state: DecoderState) -> Tensor:
        """Logits ``[B, n, tgt_vocab]`` of ``n`` new target tokens ``[B, n]`` (usually ``n = 1``) that follow the
        ``state.offset`` tokens fed before; ``state`` is updated in place.  Feeding ``tgt`` token by token gives
        the logits of ``forward_head(decode(tgt, memory))``."""
        if not isinstance(state, DecoderState):
            raise TypeError(f"state: expected a DecoderState (from init_decoder_state), got {type(state).__name__}")
        self._check_tokens(tokens, "tokens", self.tgt_vocab_size)
        if tokens.shape[0] != state.memory.shape[0]:
            raise ValueError(f"tokens: batch size {tokens.shape[0]} differs from the state's "
                             f"{state.memory.shape[0]}")
        if state.offset + tokens.shape[1] > self.max_len:
            raise ValueError(f"tokens: positions up to {state.offset + tokens.shape[1]} exceed max_len={self.max_len}")
        x = self._embed(tokens, self.tgt_embed, offset=state.offset)
        for layer, self_cache, cross_cache in zip(self.decoder.layers, state.self_caches, state.cross_caches):
            x = layer.forward_step(x, state.memory, self_cache, cross_cache, state.memory_key_padding_mask)
        if self.decoder.norm is not None:
            x = self.decoder.norm(x)
        state.offset += tokens.shape[1]
        return self.forward_head(x)

    def _check_decoding_args(self, max_len, bos_id, eos_id, pad_id) -> int:
        if not isinstance(max_len, int) or not 1 <= max_len <= self.max_len:
            raise ValueError(f"max_len: expected an int in 1..{self.max_len} (the model's max_len), got {max_len!r}")
        for name, value in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
            if value is not None and (not isinstance(value, int) or not 0 <= value < self.tgt_vocab_size):
                raise ValueError(f"{name}: expected a token id in [0, {self.tgt_vocab_size}), got {value!r}")
        return eos_id if pad_id is None else pad_id

    def _next_logits(self, prefix: Tensor, memory: Tensor, memory_mask: Optional[Tensor],
                     state: Optional[DecoderState]) -> Tensor:
        """Logits ``[B, vocab]`` of the token after ``prefix`` ``[B, t]``: one cached step on its last token, or
        (``state is None``) the whole prefix recomputed."""
        if state is not None:
            return self.decode_step(prefix[:, -1:], state)[:, -1]
        return self.forward_head(self.decode(prefix, memory, memory_key_padding_mask=memory_mask)[:, -1])

    @torch.no_grad()
    def greedy_decode(self, src: Tensor, max_len: int, bos_id: int, eos_id: int,
                      src_key_padding_mask: Optional[Tensor] = None, pad_id: Optional[int] = None,
                      use_cache: bool = True) -> Tensor:
        """The most likely next token at every step, until ``eos_id`` (included) or ``max_len`` tokens.

        Returns ``[B, n]`` generated ids (the begin token not included), ``n <= max_len`` the longest output;
        each row stops at its ``eos_id`` and is padded with ``pad_id`` (default ``eos_id``) after it.
        ``use_cache=False`` recomputes the whole prefix each step (a check of the KV-cache path).
        Call ``eval()`` first (dropout otherwise applies)."""
        pad_id = self._check_decoding_args(max_len, bos_id, eos_id, pad_id)
        memory = self.encode(src, src_key_padding_mask)
        B = src.shape[0]
        state = self.init_decoder_state(memory, src_key_padding_mask) if use_cache else None
        prefix = src.new_full((B, 1), bos_id, dtype=torch.long)
        done = torch.zeros(B, dtype=torch.bool, device=src.device)
        for _ in range(max_len):
            token = self._next_logits(prefix, memory, src_key_padding_mask, state).argmax(-1)
            token = token.masked_fill(done, pad_id)
            prefix = torch.cat([prefix, token[:, None]], dim=1)
            done |= token == eos_id
            if bool(done.all()):
                break
        return prefix[:, 1:]

    @torch.no_grad()
    def beam_search(self, src: Tensor, beam_size: int, max_len: int, bos_id: int, eos_id: int,
                    length_penalty: float = 0.6, src_key_padding_mask: Optional[Tensor] = None,
                    pad_id: Optional[int] = None, use_cache: bool = True) -> Tensor:
        """Beam search (the paper: beam 4, length penalty 0.6): the hypothesis with the best
        ``log p(Y | X) / lp(Y)``, ``lp(Y) = ((5 + |Y|) / 6) ** length_penalty`` (Wu et al. 2016; ``|Y|`` counts
        the end token).

        Finished hypotheses (they emitted ``eos_id``) stay in the beam with a frozen score and length and
        compete with the live ones on the normalised score; the search stops when every beam has finished or
        after ``max_len`` tokens.  Returns ``[B, n]`` ids as ``greedy_decode`` (``beam_size=1`` is greedy)."""
        pad_id = self._check_decoding_args(max_len, bos_id, eos_id, pad_id)
        if not isinstance(beam_size, int) or not 1 <= beam_size <= self.tgt_vocab_size:
            raise ValueError(f"beam_size: expected an int in 1..{self.tgt_vocab_size}, got {beam_size!r}")
        if not isinstance(length_penalty, (int, float)) or length_penalty < 0:
            raise ValueError(f"length_penalty: expected a number >= 0, got {length_penalty!r}")
        K, V = beam_size, self.tgt_vocab_size
        memory = self.encode(src, src_key_padding_mask)
        B = src.shape[0]
        # Every source row repeated K times: row b * K + k is beam k of source b.
        memory = memory.repeat_interleave(K, dim=0)
        memory_mask = None if src_key_padding_mask is None else src_key_padding_mask.repeat_interleave(K, dim=0)
        state = self.init_decoder_state(memory, memory_mask) if use_cache else None

        scores = torch.zeros(B, K, device=src.device)  # summed log-probabilities
        scores[:, 1:] = float("-inf")  # the first step expands beam 0 only (the beams start identical)
        scores = scores.view(B * K)
        lengths = torch.zeros(B * K, dtype=torch.long, device=src.device)
        finished = torch.zeros(B * K, dtype=torch.bool, device=src.device)
        prefix = src.new_full((B * K, 1), bos_id, dtype=torch.long)
        batch_rows = torch.arange(B, device=src.device)[:, None] * K
        for step in range(max_len):
            logp = torch.log_softmax(self._next_logits(prefix, memory, memory_mask, state).float(), dim=-1)
            # A finished beam continues with pad_id only, at no cost.
            logp[finished] = float("-inf")
            logp[finished, pad_id] = 0.0
            candidate = scores[:, None] + logp  # [B*K, V]
            candidate_len = torch.where(finished, lengths, torch.full_like(lengths, step + 1))
            normalised = candidate / _gnmt_length_penalty(candidate_len, length_penalty)[:, None]
            best = normalised.view(B, K * V).topk(K, dim=1).indices  # [B, K] over (beam, token) pairs
            rows = (batch_rows + best // V).view(-1)  # the parent beam of each survivor
            tokens = (best % V).view(-1)
            scores = candidate.view(B, K * V).gather(1, best).view(-1)
            lengths = candidate_len[rows]
            finished = finished[rows] | (tokens == eos_id)
            prefix = torch.cat([prefix[rows], tokens[:, None]], dim=1)
            if state is not None:
                state.reorder(rows)
            if bool(finished.all()):
                break
        final = (scores / _gnmt_length_penalty(lengths, length_penalty)).view(B, K)
        chosen = (batch_rows[:, 0] + final.argmax(dim=1))
        out = prefix[chosen, 1:]
        return out[:, :int(lengths[chosen].max())]


# ---------------------------------------------------------------------------------------------------------
# Named configurations (Table 3).  Parameter counts with the paper's shared 37000-token vocabulary:
#   attention (4 d x d matrices + 4 d biases):   4 d^2 + 4 d
#   feed-forward (d x d_ff, d_ff x d + biases):   2 d d_ff + d_ff + d
#   encoder layer = attention + FFN + 2 LayerNorms (4 d); decoder layer = 2 attentions + FFN + 3 LayerNorms (6 d)
#   one shared embedding / pre-softmax matrix:    37000 d; sinusoidal positions have no parameters.
# base (d=512, d_ff=2048, N=6):  6 * 3,152,384 + 6 * 4,204,032 + 18,944,000 = 63,082,496  (paper:  65M, -2.95%)
# big (d=1024, d_ff=4096, N=6):  6 * 12,596,224 + 6 * 16,796,672 + 37,888,000 = 214,245,376 (paper: 213M, +0.58%)
# No single vocabulary size reproduces both of the paper's figures (65M needs ~40.7k tokens, 213M ~35.8k), so
# the base figure is 3% above what the architecture as described gives.
# ---------------------------------------------------------------------------------------------------------
def _create(defaults: dict, overrides: dict) -> Transformer:
    return Transformer(**{**defaults, **overrides})


@register_model
def transformer_base(**overrides) -> Transformer:
    """Transformer (base model): N=6, d_model=512, d_ff=2048, h=8, P_drop=0.1, shared 37k vocabulary."""
    return _create(dict(vocab_size=37000, d_model=512, nhead=8, num_encoder_layers=6, num_decoder_layers=6,
                        dim_feedforward=2048, dropout=0.1), overrides)


@register_model
def transformer_big(**overrides) -> Transformer:
    """Transformer (big): N=6, d_model=1024, d_ff=4096, h=16, P_drop=0.3 (EN-DE), shared 37k vocabulary."""
    return _create(dict(vocab_size=37000, d_model=1024, nhead=16, num_encoder_layers=6, num_decoder_layers=6,
                        dim_feedforward=4096, dropout=0.3), overrides)


# ---------------------------------------------------------------------------------------------------------
# Converter from torch.nn.Transformer
# ---------------------------------------------------------------------------------------------------------
def _torch_activation_name(layer) -> str:
    act = layer.activation
    if act is F.relu or isinstance(act, nn.ReLU):
        return "relu"
    if act is F.gelu or (isinstance(act, nn.GELU) and act.approximate == "none"):
        return "gelu"
    raise ValueError(f"model: activation {act!r} is not supported (relu or exact gelu)")


@register_converter("torch", "Transformer")
def from_torch_transformer(model: nn.Transformer, vocab_size: int = 37000, tgt_vocab_size: Optional[int] = None,
                           pos_embed: str = "sinusoidal", max_len: int = 1024) -> Transformer:
    """Our ``Transformer`` with ``torch.nn.Transformer``'s encoder and decoder stacks (configuration read from
    it, weights copied, train/eval mode kept).  torch's model has no embeddings or output projection: ours
    are freshly initialised for ``vocab_size`` / ``tgt_vocab_size`` (``fastattn.models.from_torch`` uses the
    defaults).  torch's final ``encoder.norm`` / ``decoder.norm`` become ``final_norm=True``.  Our stack is
    batch-first whatever torch's ``batch_first``: ``ours.encoder(src)`` / ``ours.decoder(tgt, memory)`` take
    ``[B, L, d_model]``."""
    if not isinstance(model, nn.Transformer):
        raise TypeError(f"model: expected a torch.nn.Transformer, got {type(model).__name__}")
    enc, dec = model.encoder, model.decoder
    if not (isinstance(enc, nn.TransformerEncoder) and isinstance(dec, nn.TransformerDecoder)
            and all(isinstance(m, nn.TransformerEncoderLayer) for m in enc.layers)
            and all(isinstance(m, nn.TransformerDecoderLayer) for m in dec.layers)):
        raise TypeError("model: custom encoders/decoders are not supported (expected torch's Transformer layers)")
    if (enc.norm is None) != (dec.norm is None):
        raise ValueError("model: the encoder and the decoder must both have a final norm, or neither")
    first = enc.layers[0]
    if first.linear1.bias is None:
        raise ValueError("model: bias=False layers are not supported")
    mha = first.self_attn
    if mha.bias_k is not None or mha.add_zero_attn or not mha._qkv_same_embed_dim:
        raise ValueError("model: attention with add_bias_kv / add_zero_attn / kdim / vdim is not supported")
    ours = Transformer(vocab_size=vocab_size, tgt_vocab_size=tgt_vocab_size, d_model=model.d_model,
                       nhead=model.nhead, num_encoder_layers=len(enc.layers), num_decoder_layers=len(dec.layers),
                       dim_feedforward=first.linear1.out_features, dropout=first.dropout.p, attn_drop=mha.dropout,
                       activation=_torch_activation_name(first), layer_norm_eps=first.norm1.eps,
                       norm_first=first.norm_first, final_norm=enc.norm is not None, pos_embed=pos_embed,
                       max_len=max_len)
    param = next(model.parameters())
    ours = ours.to(device=param.device, dtype=param.dtype)
    ours.encoder.load_state_dict(enc.state_dict(), strict=True)
    ours.decoder.load_state_dict(dec.state_dict(), strict=True)
    return ours.train(model.training)
