"""BERT (Devlin et al., 2019): a post-LN transformer encoder over word + position + token-type embeddings, with
the two pre-training heads -- masked-LM (its output matrix tied to the word embeddings) and next-sentence.

    model = create_model("bert_base_uncased")                      # 110M; any size by keyword
    out = model(input_ids, token_type_ids, attention_mask)         # out.mlm_logits, out.nsp_logits
    sequence_output, pooled_output = model.forward_features(input_ids, token_type_ids, attention_mask)
    ours = from_transformers(hf_bert)                              # BertForPreTraining / BertModel / BertForMaskedLM

Layout (our names; ``from_transformers`` maps transformers' names onto them):

    embeddings   word_embeddings, position_embeddings, token_type_embeddings -> norm -> drop
    blocks[i]    x = norm1(x + attn(x));  x = norm2(x + drop(mlp(x)))       (post-LN)
                 attn: fastattn.nn.Attention -- ``qkv`` is transformers' query/key/value Linears stacked
                 (in that order), ``proj`` its ``attention.output.dense``; mlp: ``fc1`` -> GELU -> ``fc2``
    pooler       tanh(fc(x[:, 0]))                                           (the [CLS] token)
    mlm_head     fc -> GELU -> norm -> @ word_embeddings.weight^T + bias     (tied decoder)
    nsp_head     Linear(dim, 2) on the pooled output

The padding mask (``attention_mask [B, L]``, 1/True = a real token) reaches the attention as a bool
``[B, 1, 1, L]`` mask (True = attend), so padded keys are ignored by every query; padded positions still get
outputs (as in transformers), which a loss should ignore.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fastattn.nn import Attention

from ._registry import register_converter, register_model
from .layers import Mlp

__all__ = ["Bert", "BertEmbeddings", "BertLayer", "BertPooler", "BertMaskedLMHead", "BertPreTrainingOutput",
           "bert_base_uncased", "bert_large_uncased"]


def _kind(x) -> str:
    """A tensor's dtype or another object's type, for error messages."""
    return str(x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__


def _check_ids_in_range(ids: torch.Tensor, name: str, size: int) -> None:
    """An embedding lookup out of range is an IndexError that names no argument: say which ids and why."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= size):
        raise ValueError(f"{name}: ids must lie in [0, {size}), got {int(ids.min())}..{int(ids.max())}")


class BertPreTrainingOutput(NamedTuple):
    """``mlm_logits [B, L, vocab_size]`` (transformers' ``prediction_logits``) and ``nsp_logits [B, 2]``
    (``seq_relationship_logits``; class 0 = "B follows A")."""
    mlm_logits: torch.Tensor
    nsp_logits: torch.Tensor


class BertEmbeddings(nn.Module):
    """``norm(word[input_ids] + token_type[token_type_ids] + position[0..L-1])``, then dropout.

    ``pad_token_id``: the word-embedding row kept at zero and never updated (``nn.Embedding``'s padding_idx)."""

    def __init__(self, vocab_size: int, embed_dim: int, max_position_embeddings: int = 512,
                 type_vocab_size: int = 2, pad_token_id: Optional[int] = 0, layer_norm_eps: float = 1e-12,
                 drop: float = 0.0):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_token_id)
        self.position_embeddings = nn.Embedding(max_position_embeddings, embed_dim)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, embed_dim)
        self.norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps)
        self.drop = nn.Dropout(drop)

    def forward(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        L = input_ids.shape[1]
        x = self.word_embeddings(input_ids)
        if token_type_ids is None:  # every token is of type 0
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings.weight[:L]
        return self.drop(self.norm(x))


class BertLayer(nn.Module):
    """Post-LN encoder layer: ``x = norm1(x + attn(x))``, then ``x = norm2(x + drop(mlp(x)))``.

    ``drop`` is applied after the attention's output projection and after ``mlp.fc2`` (not after the GELU:
    BERT has no dropout there); ``attn_drop`` on the attention probabilities."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden_dim: int, drop: float = 0.0, attn_drop: float = 0.0,
                 act_layer=nn.GELU, layer_norm_eps: float = 1e-12, backend=None):
        super().__init__()
        self.attn = Attention(dim, num_heads, qkv_bias=True, attn_drop=attn_drop, proj_drop=drop, backend=backend)
        self.norm1 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.mlp = Mlp(dim, mlp_hidden_dim, act_layer=act_layer, drop=0.0)
        self.drop = nn.Dropout(drop)
        self.norm2 = nn.LayerNorm(dim, eps=layer_norm_eps)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.norm1(x + self.attn(x, attn_mask=attn_mask))
        return self.norm2(x + self.drop(self.mlp(x)))


class BertPooler(nn.Module):
    """``tanh(fc(x[:, 0]))``: the sequence summary read from the first ([CLS]) token."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x[:, 0]))


class BertMaskedLMHead(nn.Module):
    """``norm(act(fc(x))) @ decoder_weight^T + bias``; the decoder weight is passed in (the word embeddings:
    BERT ties them), only the per-token ``bias`` belongs to the head."""

    def __init__(self, dim: int, vocab_size: int, act_layer=nn.GELU, layer_norm_eps: float = 1e-12):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.act = act_layer()
        self.norm = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, x: torch.Tensor, decoder_weight: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(self.act(self.fc(x))), decoder_weight, self.bias)


class Bert(nn.Module):
    """BERT with its pre-training heads.

    Args:
        vocab_size: word-piece vocabulary (30522 for the uncased English models).
        embed_dim: hidden size H (768 base, 1024 large).
        depth: layers L (12 base, 24 large).
        num_heads: attention heads A (12 base, 16 large).
        mlp_ratio: feed-forward width over ``embed_dim`` (the paper's 4H; rounded to an int).
        max_position_embeddings: longest input (learned positions; 512).
        type_vocab_size: token (segment) types (2: sentence A / B).
        pad_token_id: the word-embedding row kept at zero (``None``: no padding row).
        drop_rate: dropout after the embeddings and on each residual branch (the paper's 0.1).
        attn_drop_rate: dropout on the attention probabilities (0.1).
        layer_norm_eps: LayerNorm epsilon (1e-12, as the original TensorFlow code and transformers).
        act_layer: the feed-forward and MLM-head activation (exact ``nn.GELU``).
        backend: restricts the attention backend (see ``fastattn.explain``).

    ``forward(input_ids, token_type_ids=None, attention_mask=None)`` -> ``BertPreTrainingOutput(mlm_logits,
    nsp_logits)``; ``forward_features`` -> ``(sequence_output [B, L, H], pooled_output [B, H])``.
    ``input_ids``: int64 ``[B, L]``; ``token_type_ids``: int ``[B, L]`` (default all 0); ``attention_mask``:
    ``[B, L]`` bool or 0/1 numbers, nonzero = a real token, zero = padding (default: no padding).
    A row with no real token at all gets zero attention output (transformers averages over its padding).
    """

    def __init__(self, vocab_size: int = 30522, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, max_position_embeddings: int = 512, type_vocab_size: int = 2,
                 pad_token_id: Optional[int] = 0, drop_rate: float = 0.1, attn_drop_rate: float = 0.1,
                 layer_norm_eps: float = 1e-12, act_layer=nn.GELU, backend=None):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("embed_dim", embed_dim), ("depth", depth),
                            ("num_heads", num_heads), ("max_position_embeddings", max_position_embeddings),
                            ("type_vocab_size", type_vocab_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if embed_dim % num_heads:
            raise ValueError(f"num_heads: {num_heads} does not divide embed_dim {embed_dim}")
        mlp_hidden_dim = int(round(embed_dim * mlp_ratio))
        if mlp_hidden_dim < 1:
            raise ValueError(f"mlp_ratio: {mlp_ratio} leaves no feed-forward channel for embed_dim {embed_dim}")
        if pad_token_id is not None and not 0 <= pad_token_id < vocab_size:
            raise ValueError(f"pad_token_id: {pad_token_id} is outside the vocabulary [0, {vocab_size})")
        self.vocab_size = vocab_size
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size

        self.embeddings = BertEmbeddings(vocab_size, embed_dim, max_position_embeddings, type_vocab_size,
                                         pad_token_id, layer_norm_eps, drop_rate)
        self.blocks = nn.ModuleList([
            BertLayer(embed_dim, num_heads, mlp_hidden_dim, drop=drop_rate, attn_drop=attn_drop_rate,
                      act_layer=act_layer, layer_norm_eps=layer_norm_eps, backend=backend)
            for _ in range(depth)])
        self.pooler = BertPooler(embed_dim)
        self.mlm_head = BertMaskedLMHead(embed_dim, vocab_size, act_layer, layer_norm_eps)
        self.nsp_head = nn.Linear(embed_dim, 2)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """BERT's initialisation: Linear and Embedding weights ~ N(0, std) truncated at 2 std, biases 0,
        LayerNorm 1 / 0, the padding row and the MLM bias 0."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)
                if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                    m.weight[m.padding_idx].zero_()
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.mlm_head.bias)

    def _check_inputs(self, input_ids, token_type_ids, attention_mask) -> Optional[torch.Tensor]:
        """Validates the inputs; returns the padding mask as bool ``[B, 1, 1, L]`` (True = attend) or None."""
        ints = (torch.int64, torch.int32)
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in ints:
            raise TypeError(f"input_ids: expected an int64 (or int32) tensor of token ids, got {_kind(input_ids)}")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids: expected [B, L] with L >= 1, got {tuple(input_ids.shape)}")
        _check_ids_in_range(input_ids, "input_ids", self.embeddings.word_embeddings.num_embeddings)
        L = input_ids.shape[1]
        if L > self.max_position_embeddings:
            raise ValueError(f"input_ids: {L} tokens exceed max_position_embeddings={self.max_position_embeddings}")
        if token_type_ids is not None:
            if not isinstance(token_type_ids, torch.Tensor) or token_type_ids.dtype not in ints:
                raise TypeError(f"token_type_ids: expected an integer tensor, got {_kind(token_type_ids)}")
            if token_type_ids.shape != input_ids.shape:
                raise ValueError(f"token_type_ids: shape {tuple(token_type_ids.shape)} differs from input_ids' "
                                 f"{tuple(input_ids.shape)}")
            _check_ids_in_range(token_type_ids, "token_type_ids",
                                self.embeddings.token_type_embeddings.num_embeddings)
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.is_complex():
            raise TypeError(f"attention_mask: expected a bool or 0/1 tensor [B, L], got {_kind(attention_mask)}")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)} (input_ids'), got "
                             f"{tuple(attention_mask.shape)}")
        return (attention_mask != 0)[:, None, None, :]

    def forward_features(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None,
                         attention_mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(sequence_output [B, L, H], pooled_output [B, H])``: the last layer's tokens and the pooler's
        summary (transformers' ``last_hidden_state`` and ``pooler_output``)."""
        attn_mask = self._check_inputs(input_ids, token_type_ids, attention_mask)
        x = self.embeddings(input_ids, token_type_ids)
        for block in self.blocks:
            x = block(x, attn_mask=attn_mask)
        return x, self.pooler(x)

    def forward_head(self, sequence_output: torch.Tensor, pooled_output: torch.Tensor) -> BertPreTrainingOutput:
        """The masked-LM logits of every token and the next-sentence logits of the pair."""
        mlm_logits = self.mlm_head(sequence_output, self.embeddings.word_embeddings.weight)
        return BertPreTrainingOutput(mlm_logits, self.nsp_head(pooled_output))

    def forward(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None) -> BertPreTrainingOutput:
        return self.forward_head(*self.forward_features(input_ids, token_type_ids, attention_mask))


# ---------------------------------------------------------------------------------------------------------------
# Named configurations (Devlin et al., Table "BERT_BASE (L=12, H=768, A=12, 110M)", "BERT_LARGE (L=24, H=1024,
# A=16, 340M)"; the uncased English word-piece vocabulary of 30522).

def _create(defaults: dict, overrides: dict) -> Bert:
    return Bert(**{**defaults, **overrides})


@register_model
def bert_base_uncased(**overrides) -> Bert:
    """BERT-Base: L=12, H=768, A=12 (110M in the paper; 109.5M without the pre-training heads)."""
    return _create(dict(vocab_size=30522, embed_dim=768, depth=12, num_heads=12), overrides)


@register_model
def bert_large_uncased(**overrides) -> Bert:
    """BERT-Large: L=24, H=1024, A=16 (340M in the paper; 335.1M without the pre-training heads)."""
    return _create(dict(vocab_size=30522, embed_dim=1024, depth=24, num_heads=16), overrides)


# ---------------------------------------------------------------------------------------------------------------
# transformers -> fastattn

class _TanhGELU(nn.GELU):
    """GELU with the tanh approximation (transformers' ``gelu_new``), constructible without arguments."""

    def __init__(self):
        super().__init__(approximate="tanh")


# transformers' ``hidden_act`` names -> our activation layers.
_ACTIVATIONS = {"gelu": nn.GELU, "gelu_new": _TanhGELU, "gelu_pytorch_tanh": _TanhGELU, "relu": nn.ReLU}


def _hf_layer_state(prefix_src: str, sd: dict, prefix_dst: str) -> dict:
    """One transformers ``BertLayer``'s weights under our names; query/key/value stacked into ``qkv``."""
    s = lambda name: sd[prefix_src + name]  # noqa: E731
    attn = prefix_src + "attention.self."
    return {
        prefix_dst + "attn.qkv.weight": torch.cat([sd[attn + n + ".weight"] for n in ("query", "key", "value")]),
        prefix_dst + "attn.qkv.bias": torch.cat([sd[attn + n + ".bias"] for n in ("query", "key", "value")]),
        prefix_dst + "attn.proj.weight": s("attention.output.dense.weight"),
        prefix_dst + "attn.proj.bias": s("attention.output.dense.bias"),
        prefix_dst + "norm1.weight": s("attention.output.LayerNorm.weight"),
        prefix_dst + "norm1.bias": s("attention.output.LayerNorm.bias"),
        prefix_dst + "mlp.fc1.weight": s("intermediate.dense.weight"),
        prefix_dst + "mlp.fc1.bias": s("intermediate.dense.bias"),
        prefix_dst + "mlp.fc2.weight": s("output.dense.weight"),
        prefix_dst + "mlp.fc2.bias": s("output.dense.bias"),
        prefix_dst + "norm2.weight": s("output.LayerNorm.weight"),
        prefix_dst + "norm2.bias": s("output.LayerNorm.bias"),
    }


@register_converter("transformers", "BertForPreTraining", "BertForMaskedLM", "BertModel")
def bert_from_transformers(model) -> Bert:
    """Our ``Bert`` with a transformers BERT's configuration and weights.

    ``BertForPreTraining``: everything (both heads). ``BertForMaskedLM``: encoder and MLM head (it has no pooler;
    ours keeps its initial pooler and NSP head). ``BertModel``: encoder and pooler (heads keep their init).
    Decoder-style BERTs (``is_decoder``, cross-attention) and an MLM decoder not tied to the word embeddings are
    refused with a ``ValueError``."""
    config = model.config
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise ValueError("model: a decoder BERT (is_decoder / add_cross_attention) has no fastattn equivalent")
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"model: position_embedding_type={config.position_embedding_type!r} is not supported "
                         f"(only 'absolute')")
    act = config.hidden_act
    if not isinstance(act, str) or act not in _ACTIVATIONS:
        raise ValueError(f"model: hidden_act={act!r} is not supported; expected one of {sorted(_ACTIVATIONS)}")

    bert = model.bert if hasattr(model, "bert") else model
    sd = model.state_dict()
    prefix = "bert." if bert is not model else ""
    ours = Bert(vocab_size=config.vocab_size, embed_dim=config.hidden_size, depth=config.num_hidden_layers,
                num_heads=config.num_attention_heads,
                mlp_ratio=config.intermediate_size / config.hidden_size,  # rounds back to intermediate_size exactly
                max_position_embeddings=config.max_position_embeddings, type_vocab_size=config.type_vocab_size,
                pad_token_id=config.pad_token_id, drop_rate=config.hidden_dropout_prob,
                attn_drop_rate=config.attention_probs_dropout_prob, layer_norm_eps=config.layer_norm_eps,
                act_layer=_ACTIVATIONS[act])

    emb = prefix + "embeddings."
    state = {
        "embeddings.word_embeddings.weight": sd[emb + "word_embeddings.weight"],
        "embeddings.position_embeddings.weight": sd[emb + "position_embeddings.weight"],
        "embeddings.token_type_embeddings.weight": sd[emb + "token_type_embeddings.weight"],
        "embeddings.norm.weight": sd[emb + "LayerNorm.weight"],
        "embeddings.norm.bias": sd[emb + "LayerNorm.bias"],
    }
    for i in range(config.num_hidden_layers):
        state.update(_hf_layer_state(f"{prefix}encoder.layer.{i}.", sd, f"blocks.{i}."))
    if getattr(bert, "pooler", None) is not None:
        state["pooler.fc.weight"] = sd[prefix + "pooler.dense.weight"]
        state["pooler.fc.bias"] = sd[prefix + "pooler.dense.bias"]
    if "cls.predictions.bias" in sd:  # BertForPreTraining, BertForMaskedLM
        decoder = model.cls.predictions.decoder.weight
        word = bert.embeddings.word_embeddings.weight
        if decoder is not word and not torch.equal(decoder, word):
            raise ValueError("model: its MLM decoder is not tied to the word embeddings (tie_word_embeddings="
                             "False); fastattn's Bert always ties them")
        p = "cls.predictions."
        state.update({
            "mlm_head.fc.weight": sd[p + "transform.dense.weight"], "mlm_head.fc.bias": sd[p + "transform.dense.bias"],
            "mlm_head.norm.weight": sd[p + "transform.LayerNorm.weight"],
            "mlm_head.norm.bias": sd[p + "transform.LayerNorm.bias"],
            # The decoder's bias is what transformers' forward adds (tied to ``cls.predictions.bias``).
            "mlm_head.bias": sd.get(p + "decoder.bias", sd[p + "bias"]),
        })
    if "cls.seq_relationship.weight" in sd:  # BertForPreTraining
        state["nsp_head.weight"] = sd["cls.seq_relationship.weight"]
        state["nsp_head.bias"] = sd["cls.seq_relationship.bias"]

    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    # Only whole parts the source lacks may be left at their initial values.
    assert all(k.startswith(("pooler.", "mlm_head.", "nsp_head.")) for k in missing), missing
    ref = next(model.parameters())
    return ours.to(device=ref.device, dtype=ref.dtype).train(model.training)
