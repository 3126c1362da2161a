"""PSA-MF: Personality-Sentiment Aligned Multi-Level Fusion (Xie et al., AAAI 2026).

    text --BERT layers [0,N)--------> CLS_s --P_s--> T_s \
    text --frozen personality BERT--> CLS_p --P_p--> T_p  +--> L_Align = mean(L_ccl + L_ps)
    [CLS_s, X_v, X_a] --BERT layers [N,L)--> M_s (pre-fusion; L_clm on its inputs)
    X_v --LSTM--> h_v ;  X_a --LSTM--> h_a
    V_t = Att_v(M_s, h_v, h_v) ;  A_t = Att_a(M_s, h_a, h_a)        (interaction)
    F_s = W_p [V_t', A_t', M_s'] ;  F_p = Conv_k3([V_t, A_t, M_s])   (enhanced fusion)
    y_hat = head([F_s, F_p])

Loss (what `forward` returns as `total` when the batch has labels):

    total = L1(y_hat, y) + aux_lambda * (L_Align + L_clm)

aux_lambda (PsamfConfig.aux_lambda, searched by `tune`) scales the sum of the two auxiliary
losses as one unit; it does not weight L_Align against L_clm. The paper sums all three terms
unweighted, so aux_lambda = 1 gives its sum (and with sim_weight = "raw", below, its literal
L_ccl and L_ps too); aux_lambda = 0 trains on L1 alone (the auxiliary terms are still computed
and logged). Ablated terms are exact zeros.

Every choice the paper leaves open, and why, is in the README's "PSA-MF" section (the
measurements behind each: bench/DECISIONS.md).

Ablations (PsamfConfig.ablation), matching the paper's Table:
- none
- no_personality: no personality encoder (may be None), no CLS_p; align/cl/ccl/ps are 0.
- no_prefusion: the remaining L-N layers run over the *text* tokens only (i.e. the plain full
  BERT), M_s = their CLS. Same parameters, only the audio-visual mixing is gone.
- no_enhanced_fusion: the head sees [V_t, A_t, M_s] concatenated; no serial/parallel fusion.
- no_ps: L_ps = 0 (no W_y); L_Align = L_ccl.
- no_clm: L_clm = 0.

Batch (a mapping of tensors):
    input_ids [B,S], attention_mask [B,S] (default all ones), token_type_ids [B,S] (optional)
    personality_input_ids / personality_attention_mask / personality_token_type_ids (optional:
        only needed when the personality encoder uses another tokenizer; default: the text inputs)
    visual [B,Tv,Dv], audio [B,Ta,Da]
    visual_mask / audio_mask [B,T] bool, True = a real step (preferred; any padding side), or
    visual_len / audio_len [B] (right padding assumed; clamped to T); neither: all steps real
    label [B] (optional; losses are computed only when present)

Config: a PsamfConfig, already checked (config.py's CHOICES and RANGES); a saved model's gets
the keys it predates from config.saved_psamf_config. align_dim / fusion_dim null mean the text
hidden size / lstm_hidden. av_norm is read by the data path, not here.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from psamf.config import PsamfConfig
from psamf.models.encoders import SplitEncoder, base_model, load_encoder


# ---------------------------------------------------------------------------- losses

def info_nce(query: torch.Tensor, keys: torch.Tensor, tau: float, symmetric: bool = False) -> torch.Tensor:
    """Per-sample CLIP InfoNCE over the batch, [B].

    loss_i = -log( exp(cos(q_i, k_i)/tau) / sum_j exp(cos(q_i, k_j)/tau) )
    symmetric: average with the same loss on the transposed logits (k -> q direction).
    """
    q = F.normalize(query, dim=-1)
    k = F.normalize(keys, dim=-1)
    logits = q @ k.T / tau
    target = torch.arange(len(q), device=q.device)
    loss = F.cross_entropy(logits, target, reduction="none")
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits.T, target, reduction="none"))
    return loss


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real steps of x [B,T,D]; a row with none gives zeros (not NaN)."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


# ---------------------------------------------------------------------------- modules

class ModalityLSTM(nn.Module):
    """h_m = LSTM(X_m): the per-step sequence for interaction plus the last real step's state."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.lstm = nn.LSTM(in_dim, hidden, batch_first=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor):
        B, T, _ = x.shape
        # Move the real steps to the front, in order, so a mask of any shape (left- or right-padded,
        # or with holes) packs correctly; the padding then never enters the recurrence.
        order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)
        x = x.gather(1, order.unsqueeze(-1).expand_as(x))
        # A segment with no real frame still gets one (zero) step: the LSTM and attention need >= 1.
        lengths = mask.sum(1).clamp(min=1)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, (h_n, _) = self.lstm(packed)
        h, _ = pad_packed_sequence(out, batch_first=True, total_length=T)
        step_mask = torch.arange(T, device=x.device)[None, :] < lengths[:, None]
        return h, step_mask, h_n[-1]


class AVTokens(nn.Module):
    """X_m [B,T,D_m] -> encoder-width tokens, BERT-embedding style: LN(Linear(x) + type) -> dropout.

    gated: scale the tokens by tanh(g), g a learnable scalar starting at 0, so the pretrained
    upper layers first see the text alone and let the audio-visual tokens in as far as they help
    (the zero-init gating of Flamingo's cross-attention). See the module docstring.
    """

    def __init__(self, in_dim: int, hidden: int, dropout: float, eps: float = 1e-12, gated: bool = False):
        super().__init__()
        self.proj = nn.Linear(in_dim, hidden)
        self.modality = nn.Parameter(torch.randn(hidden) * 0.02)  # which modality this token is
        self.ln = nn.LayerNorm(hidden, eps=eps)
        self.drop = nn.Dropout(dropout)
        self.gate = nn.Parameter(torch.zeros(())) if gated else None

    def forward(self, x):
        tok = self.drop(self.ln(self.proj(x) + self.modality))
        return tok if self.gate is None else tok * torch.tanh(self.gate)


class PersonalitySentimentAlignment(nn.Module):
    """T_s = P_s CLS_s, T_p = P_p CLS_p; L_cl, L_ccl, L_ps per sample (see the module docstring)."""

    def __init__(self, hidden_s: int, hidden_p: int, align_dim: int, tau: float,
                 use_ps: bool = True, symmetric: bool = False, sim_weight: str = "affine"):
        super().__init__()
        self.sim_weight = sim_weight  # one of config.SIM_WEIGHTS
        self.proj_s = nn.Linear(hidden_s, align_dim)
        self.proj_p = nn.Linear(hidden_p, align_dim)
        self.w_y = nn.Linear(align_dim, 1) if use_ps else None  # W_y: T_s -> sentiment score
        self.tau = tau
        self.symmetric = symmetric

    def forward(self, cls_s, cls_p, y):
        t_s, t_p = self.proj_s(cls_s), self.proj_p(cls_p)
        cl = info_nce(t_s, t_p, self.tau, self.symmetric)               # L_cl^i
        sim = F.cosine_similarity(t_s, t_p, dim=-1)                     # sim(T_s^i, T_p^i)
        w = self.weight(sim.detach())                                   # a weight, not a target
        ccl = w * cl
        if self.w_y is not None:
            ps = (1.0 - w) * (self.w_y(t_s).squeeze(-1) - y).abs()
        else:
            ps = torch.zeros_like(ccl)
        return dict(sim=sim, cl=cl, ccl=ccl, ps=ps)

    def weight(self, sim):
        if self.sim_weight == "affine":
            return (1.0 + sim) / 2.0
        if self.sim_weight == "clamp":
            return sim.clamp(min=0.0)
        return sim  # "raw"


class EnhancedFusion(nn.Module):
    """Serial F_s = W_p [V_t', A_t', M_s'] and parallel F_p = Conv_k3([V_t, A_t, M_s]) -> y_hat."""

    def __init__(self, dim: int, fusion_dim: int, dropout: float):
        super().__init__()
        self.prime = nn.ModuleList([nn.Linear(dim, fusion_dim) for _ in range(3)])  # the ' maps
        self.w_p = nn.Linear(3 * fusion_dim, fusion_dim)
        self.conv = nn.Conv1d(dim, fusion_dim, kernel_size=3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Sequential(nn.Linear(4 * fusion_dim, fusion_dim), nn.GELU(),
                                  nn.Dropout(dropout), nn.Linear(fusion_dim, 1))

    def forward(self, v_t, a_t, m_s):
        streams = [self.drop(s) for s in (v_t, a_t, m_s)]
        f_s = self.w_p(torch.cat([p(s) for p, s in zip(self.prime, streams)], dim=-1))
        stack = torch.stack(streams, dim=-1)            # [B, dim, 3]: channels = features
        f_p = F.gelu(self.conv(stack)).flatten(1)       # [B, 3*fusion_dim]
        return self.head(torch.cat([f_s, f_p], dim=-1)).squeeze(-1)


class ConcatHead(nn.Module):
    """no_enhanced_fusion: y_hat = MLP([V_t, A_t, M_s])."""

    def __init__(self, dim: int, fusion_dim: int, dropout: float):
        super().__init__()
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(3 * dim, fusion_dim), nn.GELU(),
                                  nn.Dropout(dropout), nn.Linear(fusion_dim, 1))

    def forward(self, v_t, a_t, m_s):
        return self.head(torch.cat([v_t, a_t, m_s], dim=-1)).squeeze(-1)


# ---------------------------------------------------------------------------- model

LOSS_NAMES = ("total", "l1", "align", "cl", "ccl", "ps", "clm")


@dataclass
class PsamfOutput:
    pred: torch.Tensor                   # [B] sentiment score
    cls_s: torch.Tensor                  # [B,H] sentiment CLS after N layers
    m_s: torch.Tensor                    # [B,H] pre-fused CLS
    fused: torch.Tensor                  # [B,S,H] pre-fusion sequence output
    fused_mask: torch.Tensor             # [B,S] bool
    cls_p: torch.Tensor | None = None    # [B,Hp] personality CLS (None under no_personality)
    sim: torch.Tensor | None = None      # [B] cos(T_s^i, T_p^i)
    total: torch.Tensor | None = None    # losses: scalars, None when the batch has no labels
    l1: torch.Tensor | None = None
    align: torch.Tensor | None = None
    cl: torch.Tensor | None = None
    ccl: torch.Tensor | None = None
    ps: torch.Tensor | None = None
    clm: torch.Tensor | None = None

    def losses(self) -> dict[str, float]:
        """Loss components as floats, for logging."""
        return {n: float(getattr(self, n).detach()) for n in LOSS_NAMES if getattr(self, n) is not None}

    def __getitem__(self, key):  # out["pred"] works as well as out.pred
        if key not in {f.name for f in fields(self)}:
            raise KeyError(key)
        return getattr(self, key)


class PSAMF(nn.Module):
    """PSA-MF over a (fine-tuned) text encoder and a frozen personality encoder.

    text_encoder / personality_encoder: BERT-architecture HF modules (BertModel or a Bert*For*
    model, whose base model is used). personality_encoder may be None only under no_personality.
    """

    def __init__(self, text_encoder: nn.Module, personality_encoder: nn.Module | None,
                 cfg: PsamfConfig, *, audio_dim: int, visual_dim: int):
        super().__init__()
        self.cfg = cfg
        self.ablation = cfg.ablation
        self.text = SplitEncoder(text_encoder, cfg.split_layer)
        H = self.text.hidden_size
        if H % cfg.attn_heads:  # H is the loaded encoder's, so this cannot be checked at config load
            raise ValueError(f"attn_heads={cfg.attn_heads} must divide the encoder hidden size {H}")
        align_dim = H if cfg.align_dim is None else cfg.align_dim
        fusion_dim = cfg.lstm_hidden if cfg.fusion_dim is None else cfg.fusion_dim
        self.tau = cfg.tau
        self.aux_lambda = cfg.aux_lambda

        # personality: frozen, always eval, never in the graph
        self.personality_encoder = None
        if self.ablation != "no_personality":
            if personality_encoder is None:
                raise ValueError("a personality encoder is required unless ablation='no_personality'")
            pers = base_model(personality_encoder)
            if pers is self.text.model:
                raise ValueError("personality_encoder is the text encoder itself; freezing it would freeze "
                                 "the text encoder too. Pass a separate copy.")
            pers.requires_grad_(False)
            pers.eval()
            self.personality_encoder = pers
            self.align = PersonalitySentimentAlignment(
                H, pers.config.hidden_size, align_dim, cfg.tau, use_ps=self.ablation != "no_ps",
                symmetric=cfg.symmetric_cl, sim_weight=cfg.sim_weight)

        # audio-visual: LSTM branch (interaction) and token branch (pre-fusion)
        self.lstm_v = ModalityLSTM(visual_dim, cfg.lstm_hidden)
        self.lstm_a = ModalityLSTM(audio_dim, cfg.lstm_hidden)
        eps = getattr(self.text.config, "layer_norm_eps", 1e-12)
        self.prefusion_text = cfg.prefusion_text
        # residual pre-fusion: M_s = M_text + tanh(g) (M_fused - M_text), g a zero-init scalar
        self.prefusion_gate = (nn.Parameter(torch.zeros(()))
                               if cfg.prefusion_residual and self.ablation != "no_prefusion" else None)
        self.tok_v = AVTokens(visual_dim, H, cfg.dropout, eps, cfg.av_gate)
        self.tok_a = AVTokens(audio_dim, H, cfg.dropout, eps, cfg.av_gate)
        if self.ablation != "no_clm":
            self.clm_proj = nn.ModuleList([nn.Linear(H, align_dim) for _ in range(3)])  # g_t, g_v, g_a

        # interaction: M_s queries the LSTM sequences
        mha = dict(embed_dim=H, num_heads=cfg.attn_heads, kdim=cfg.lstm_hidden, vdim=cfg.lstm_hidden,
                   dropout=cfg.dropout, batch_first=True)
        self.att_v = nn.MultiheadAttention(**mha)
        self.att_a = nn.MultiheadAttention(**mha)

        fusion = ConcatHead if self.ablation == "no_enhanced_fusion" else EnhancedFusion
        self.fusion = fusion(H, fusion_dim, cfg.dropout)

    @classmethod
    def from_config(cls, cfg: PsamfConfig, audio_dim: int, visual_dim: int) -> "PSAMF":
        """Load both encoders by name (alias, hub id or local dir) via encoders.py."""
        text = load_encoder(cfg.encoder)
        pers = None if cfg.ablation == "no_personality" else load_encoder(cfg.personality_encoder)
        return cls(text, pers, cfg, audio_dim=audio_dim, visual_dim=visual_dim)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.personality_encoder is not None:
            self.personality_encoder.eval()  # frozen means no dropout either
        return self

    def param_groups(self, lr: float, lr_head: float) -> list[dict]:
        """Optimizer groups: the text encoder at lr (fine-tuning), everything new at lr_head."""
        enc = {id(p) for p in self.text.parameters()}
        trainable = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        return [
            {"params": [p for _, p in trainable if id(p) in enc], "lr": lr},
            {"params": [p for _, p in trainable if id(p) not in enc], "lr": lr_head},
        ]

    # -- pieces

    @staticmethod
    def _step_mask(batch: Mapping, name: str, x: torch.Tensor) -> torch.Tensor:
        B, T = x.shape[:2]
        if batch.get(f"{name}_mask") is not None:
            return batch[f"{name}_mask"].to(device=x.device, dtype=torch.bool)
        if batch.get(f"{name}_len") is not None:
            n = batch[f"{name}_len"].to(x.device).clamp(max=T)
            return torch.arange(T, device=x.device)[None, :] < n[:, None]
        return torch.ones(B, T, dtype=torch.bool, device=x.device)

    def personality_cls(self, batch: Mapping) -> torch.Tensor:
        """CLS_p: the frozen personality encoder's last-layer CLS."""
        pers = self.personality_encoder
        ids = batch.get("personality_input_ids")
        if ids is None:
            if pers.config.vocab_size != self.text.config.vocab_size:
                raise ValueError(
                    f"the personality encoder's vocabulary ({pers.config.vocab_size}) differs from the text "
                    f"encoder's ({self.text.config.vocab_size}); pass personality_input_ids from its own tokenizer")
            ids, am, tt = batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids")
        else:
            am, tt = batch.get("personality_attention_mask"), batch.get("personality_token_type_ids")
        with torch.no_grad():
            return pers(input_ids=ids, attention_mask=am, token_type_ids=tt).last_hidden_state[:, 0]

    def forward(self, batch: Mapping[str, torch.Tensor]) -> PsamfOutput:
        ids = batch["input_ids"]
        am = batch.get("attention_mask")
        if am is None:
            am = torch.ones_like(ids)
        hidden = self.text.lower(ids, am, batch.get("token_type_ids"))
        cls_s = hidden[:, 0]                                            # CLS_s

        x_v, x_a = batch["visual"], batch["audio"]
        v_mask, a_mask = self._step_mask(batch, "visual", x_v), self._step_mask(batch, "audio", x_a)
        h_v, hv_mask, _ = self.lstm_v(x_v, v_mask)
        h_a, ha_mask, _ = self.lstm_a(x_a, a_mask)
        tok_v, tok_a = self.tok_v(x_v), self.tok_a(x_a)

        # pre-fusion
        if self.ablation == "no_prefusion":
            fused_mask = am.bool()
            fused = self.text.upper(hidden, fused_mask)                 # plain BERT over the text
        else:
            if self.prefusion_text == "tokens":                          # [H_s (CLS_s first), X_v, X_a]
                text, text_mask = hidden, am.bool()
            else:                                                       # [CLS_s, X_v, X_a]
                text, text_mask = cls_s[:, None], torch.ones_like(v_mask[:, :1])
            seq = torch.cat([text, tok_v, tok_a], dim=1)
            fused_mask = torch.cat([text_mask, v_mask, a_mask], dim=1)
            fused = self.text.upper(seq, fused_mask)
        m_s = fused[:, 0]                                               # M_s
        if self.prefusion_gate is not None:                             # starts as no_prefusion's M_s
            m_text = self.text.upper(hidden, am.bool())[:, 0]
            m_s = m_text + torch.tanh(self.prefusion_gate) * (m_s - m_text)

        # interaction (key_padding_mask: True = ignore)
        q = m_s[:, None]
        v_t = self.att_v(q, h_v, h_v, key_padding_mask=~hv_mask, need_weights=False)[0][:, 0]
        a_t = self.att_a(q, h_a, h_a, key_padding_mask=~ha_mask, need_weights=False)[0][:, 0]
        pred = self.fusion(v_t, a_t, m_s)

        cls_p = self.personality_cls(batch) if self.personality_encoder is not None else None
        out = PsamfOutput(pred=pred, cls_s=cls_s, m_s=m_s, fused=fused, fused_mask=fused_mask, cls_p=cls_p)

        y = batch.get("label")
        if y is None:
            return out
        # Losses in float32 even under autocast: bf16 keeps ~3 significant digits, too few for
        # cos/tau logits and their log-sum-exp (CLIP computes its logits in fp32 for the same reason).
        with torch.autocast(device_type=pred.device.type, enabled=False):
            self._losses(out, y, cls_s.float(), tok_v.float(), v_mask, tok_a.float(), a_mask)
        return out

    def _losses(self, out: PsamfOutput, y, cls_s, tok_v, v_mask, tok_a, a_mask) -> None:
        pred = out.pred.float()
        y = y.to(device=pred.device, dtype=pred.dtype).reshape(pred.shape)
        zero = pred.new_zeros(())
        out.l1 = F.l1_loss(pred, y)
        if out.cls_p is not None:
            a = self.align(cls_s, out.cls_p.float(), y)
            out.sim, out.cl, out.ccl, out.ps = a["sim"], a["cl"].mean(), a["ccl"].mean(), a["ps"].mean()
            out.align = (a["ccl"] + a["ps"]).mean()                     # L_Align
        else:
            out.cl = out.ccl = out.ps = out.align = zero
        if self.ablation != "no_clm":
            g_t, g_v, g_a = self.clm_proj
            z_t = g_t(cls_s)
            z_v, z_a = g_v(masked_mean(tok_v, v_mask)), g_a(masked_mean(tok_a, a_mask))
            out.clm = 0.5 * (info_nce(z_t, z_v, self.tau, symmetric=True)
                             + info_nce(z_t, z_a, self.tau, symmetric=True)).mean()
        else:
            out.clm = zero
        out.total = out.l1 + self.aux_lambda * (out.align + out.clm)
