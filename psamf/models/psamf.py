"""PSA-MF: Personality-Sentiment Aligned Multi-Level Fusion (Xie et al., AAAI 2026).

    text --BERT layers [0,N)--------> CLS_s --P_s--> T_s \
    text --frozen personality BERT--> CLS_p --P_p--> T_p  +--> L_Align = mean(L_ccl + L_ps)
    [CLS_s, X_v, X_a] --BERT layers [N,L)--> M_s (pre-fusion; L_clm on its inputs)
    X_v --LSTM--> h_v ;  X_a --LSTM--> h_a
    V_t = Att_v(M_s, h_v, h_v) ;  A_t = Att_a(M_s, h_a, h_a)        (interaction)
    F_s = W_p [V_t', A_t', M_s'] ;  F_p = Conv_k3([V_t, A_t, M_s])   (enhanced fusion)
    y_hat = head([F_s, F_p])

Loss (what `forward` returns as `total` when the batch has labels):

    total = L1(y_hat, y) + aux_lambda * (L_Align + clm_weight * L_clm),
    L_Align = mean(ccl_weight * L_ccl + ps_weight * L_ps)            (logged as `align`)

aux_lambda (PsamfConfig.aux_lambda, searched by `tune`) scales the auxiliary losses as one unit;
the three weights (1 by default) weight them against each other (the official code: 1, 0.1, 0.09
with aux_lambda 1). The paper sums all three terms
unweighted, so aux_lambda = 1 gives its sum (and with sim_weight = "raw", below, its literal
L_ccl and L_ps too); aux_lambda = 0 trains on L1 alone (the auxiliary terms are still computed
and logged). Ablated terms are exact zeros.

Every choice the paper leaves open, and why, is in the README's "PSA-MF" section (the
measurements behind each: bench/DECISIONS.md).

The official code's form of each part (the `paper` profile; README "PSA-MF" has the provenance),
switched per part, our form being every default:
- prefusion_av lstm_token: one pre-fusion token per modality from the LSTM's last state
  (LSTMToken), prefusion_personality adding CLS_p to it before its ReLU; prefusion_init random:
  fresh pre-fusion layers; prefusion_params encoder: token and L_clm heads in the encoder group.
- align_layer: the hidden state whose CLS feeds L_ccl / L_ps; ps_projection separate: W_y's own
  projection; align_weight batch_distance: w = (1 - mean cos)/2 per batch, in the graph.
- clip_form official: L_cl and L_clm through OfficialClip (see there), L_clm summed over V and A.
- fusion_form official: Linear(H -> lstm_hidden) query, OfficialFusion; interaction_mask false:
  the attention sees the zero-padded LSTM steps too.

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

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from psamf.config import PsamfConfig
from psamf.models.encoders import SplitEncoder, base_model, load_encoder

CLS_P_KEY = "personality_cls"  # a batch key: CLS_p already computed (see PSAMF.personality_cls)


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


CLIP_DIM = 128  # the official Clip module's head width (fixed there)


class OfficialClip(nn.Module):
    """The official code's CLIP loss (clip_form: official), batch mean, both directions averaged.

        x' = normalize(W_x x)        the first input: projected, then normalised
        y' = W_y normalize(y)        the second: normalised, then projected (so y' is not unit length)
        logits = ln(1/tau) * x' y'^T  ln(1/0.07) = 2.66 multiplies the logits as is: CLIP itself uses
                                      exp(ln(1/0.07)) = 1/0.07 = 14.3; the code skips the exp
        loss = (CE(logits, diag) + CE(logits^T, diag)) / 2

    Reproduced as the code computes it, quirks included (README "PSA-MF").
    """

    def __init__(self, x_dim: int, y_dim: int, tau: float, out_dim: int = CLIP_DIM):
        super().__init__()
        self.proj_x = nn.Linear(x_dim, out_dim)
        self.proj_y = nn.Linear(y_dim, out_dim)
        self.scale = math.log(1.0 / tau)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.proj_x(x), dim=-1)
        y = self.proj_y(F.normalize(y, dim=-1))
        logits = self.scale * x @ y.T
        target = torch.arange(len(x), device=x.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


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


class LSTMToken(nn.Module):
    """prefusion_av: lstm_token (the official code): one pre-fusion token per modality from the
    LSTM's last state, ReLU(up(out(h_n)) [+ CLS_p]): `out` is the LSTM encoder's output Linear
    (lstm_hidden -> lstm_hidden), `up` lifts it to the encoder width; with prefusion_personality the
    personality CLS is added before the ReLU."""

    def __init__(self, lstm_hidden: int, hidden: int):
        super().__init__()
        self.out = nn.Linear(lstm_hidden, lstm_hidden)
        self.up = nn.Linear(lstm_hidden, hidden)

    def forward(self, h_n: torch.Tensor, cls_p: torch.Tensor | None = None) -> torch.Tensor:
        tok = self.up(self.out(h_n))
        if cls_p is not None:
            tok = tok + cls_p.to(tok.dtype)
        return F.relu(tok)[:, None]                                     # [B, 1, H]


class PersonalitySentimentAlignment(nn.Module):
    """T_s = P_s CLS_s, T_p = P_p CLS_p; L_cl, L_ccl, L_ps per sample (see the module docstring)."""

    def __init__(self, hidden_s: int, hidden_p: int, align_dim: int, tau: float,
                 use_ps: bool = True, symmetric: bool = False, sim_weight: str = "affine",
                 clip_form: str = "ours", ps_projection: str = "shared", align_weight: str = "sim_weight"):
        super().__init__()
        self.sim_weight = sim_weight  # one of psamf.sim_weight's config.CHOICES
        self.align_weight = align_weight  # one of psamf.align_weight's config.CHOICES
        self.proj_s = nn.Linear(hidden_s, align_dim)
        self.proj_p = nn.Linear(hidden_p, align_dim)
        self.w_y = nn.Linear(align_dim, 1) if use_ps else None  # W_y: T_s -> sentiment score
        self.tau = tau
        self.symmetric = symmetric
        # official forms (created after ours so that our form builds, and draws, exactly as before)
        self.proj_y = nn.Linear(hidden_s, align_dim) if use_ps and ps_projection == "separate" else None
        self.clip = OfficialClip(align_dim, align_dim, tau) if clip_form == "official" else None

    def forward(self, cls_s, cls_p, y):
        """Per-sample [B] terms; under clip_form official L_cl (and so L_ccl) is the batch's scalar,
        and under align_weight batch_distance the weight is one scalar per batch."""
        t_s, t_p = self.proj_s(cls_s), self.proj_p(cls_p)
        if self.clip is None:
            cl = info_nce(t_s, t_p, self.tau, self.symmetric)           # L_cl^i
        else:
            cl = self.clip(t_s, t_p)                                    # the code's batch L_cl
        sim = F.cosine_similarity(t_s, t_p, dim=-1)                     # sim(T_s^i, T_p^i)
        if self.align_weight == "batch_distance":
            w = (1.0 - sim.mean()) / 2.0                                # the code: in the graph
        else:
            w = self.weight(sim.detach())                               # a weight, not a target
        ccl = w * cl
        if self.w_y is not None:
            t_y = t_s if self.proj_y is None else self.proj_y(cls_s)
            ps = (1.0 - w) * (self.w_y(t_y).squeeze(-1) - y).abs()
        else:
            ps = torch.zeros_like(sim)
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


SERIAL_DIM = 2048  # the official serial fusion's width per AV stream (fixed there)


class OfficialFusion(nn.Module):
    """fusion_form: official. Over V_t, A_t, M_s of width d (= lstm_hidden):

        F_s = Linear(LayerNorm([Linear_v(V_t) (2048), Linear_a(A_t) (2048), M_s (d)]))   -> hidden
        F_p = Conv1d(3 -> 1, k=3, no padding) over the streams as channels, along the features -> d-2
        y_hat = Sub([F_p, F_s]): Dropout -> Linear(hidden) -> tanh -> Linear(hidden) -> tanh -> Linear(1)
    """

    def __init__(self, dim: int, hidden: int, dropout: float, serial_dim: int = SERIAL_DIM):
        super().__init__()
        self.serial_v = nn.Linear(dim, serial_dim)
        self.serial_a = nn.Linear(dim, serial_dim)
        self.serial_ln = nn.LayerNorm(2 * serial_dim + dim)
        self.serial_out = nn.Linear(2 * serial_dim + dim, hidden)
        self.conv = nn.Conv1d(3, 1, kernel_size=3)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim - 2 + hidden, hidden), nn.Tanh(),
                                  nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def parts(self, v_t, a_t, m_s):
        """(F_s [B, hidden], F_p [B, d-2])."""
        f_s = self.serial_out(self.serial_ln(torch.cat([self.serial_v(v_t), self.serial_a(a_t), m_s], dim=-1)))
        f_p = self.conv(torch.stack([v_t, a_t, m_s], dim=1)).squeeze(1)
        return f_s, f_p

    def forward(self, v_t, a_t, m_s):
        f_s, f_p = self.parts(v_t, a_t, m_s)
        return self.head(torch.cat([f_p, f_s], dim=-1)).squeeze(-1)


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
        self.official_fusion = cfg.fusion_form == "official"
        if self.official_fusion:  # the interaction runs at lstm_hidden; the k=3 conv needs >= 3 features
            if cfg.lstm_hidden % cfg.attn_heads or cfg.lstm_hidden < 3:
                raise ValueError(f"fusion_form official: attn_heads={cfg.attn_heads} must divide lstm_hidden="
                                 f"{cfg.lstm_hidden}, which must be >= 3")
        elif H % cfg.attn_heads:  # H is the loaded encoder's, so this cannot be checked at config load
            raise ValueError(f"attn_heads={cfg.attn_heads} must divide the encoder hidden size {H}")
        if cfg.prefusion_personality and cfg.prefusion_av != "lstm_token":
            raise ValueError("prefusion_personality needs prefusion_av: lstm_token (CLS_p is added to that token)")
        align_dim = H if cfg.align_dim is None else cfg.align_dim
        fusion_dim = cfg.lstm_hidden if cfg.fusion_dim is None else cfg.fusion_dim
        self.tau = cfg.tau
        self.aux_lambda = cfg.aux_lambda
        self.ccl_weight, self.ps_weight, self.clm_weight = cfg.ccl_weight, cfg.ps_weight, cfg.clm_weight

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
                symmetric=cfg.symmetric_cl, sim_weight=cfg.sim_weight, clip_form=cfg.clip_form,
                ps_projection=cfg.ps_projection, align_weight=cfg.align_weight)
            if cfg.prefusion_personality and pers.config.hidden_size != H:
                raise ValueError(f"prefusion_personality adds CLS_p ({pers.config.hidden_size}) to a pre-fusion "
                                 f"token ({H}): the two encoders' hidden sizes must be equal")

        # audio-visual: LSTM branch (interaction) and token branch (pre-fusion)
        self.lstm_v = ModalityLSTM(visual_dim, cfg.lstm_hidden)
        self.lstm_a = ModalityLSTM(audio_dim, cfg.lstm_hidden)
        eps = getattr(self.text.config, "layer_norm_eps", 1e-12)
        self.prefusion_text = cfg.prefusion_text
        # residual pre-fusion: M_s = M_text + tanh(g) (M_fused - M_text), g a zero-init scalar
        self.prefusion_gate = (nn.Parameter(torch.zeros(()))
                               if cfg.prefusion_residual and self.ablation != "no_prefusion" else None)
        self.lstm_token = cfg.prefusion_av == "lstm_token"
        if self.lstm_token:
            self.tok_v = LSTMToken(cfg.lstm_hidden, H)
            self.tok_a = LSTMToken(cfg.lstm_hidden, H)
        else:
            self.tok_v = AVTokens(visual_dim, H, cfg.dropout, eps, cfg.av_gate)
            self.tok_a = AVTokens(audio_dim, H, cfg.dropout, eps, cfg.av_gate)
        if self.ablation != "no_clm":
            if cfg.clip_form == "official":  # one Clip per modality pair: text-visual, text-audio
                self.clm_clip = nn.ModuleList([OfficialClip(H, H, cfg.tau) for _ in range(2)])
            else:
                self.clm_proj = nn.ModuleList([nn.Linear(H, align_dim) for _ in range(3)])  # g_t, g_v, g_a

        # interaction: M_s queries the LSTM sequences
        if self.official_fusion:  # one Linear(H -> lstm_hidden) query for both; attention dropout 0
            self.query = nn.Linear(H, cfg.lstm_hidden)
            mha = dict(embed_dim=cfg.lstm_hidden, num_heads=cfg.attn_heads, batch_first=True)
        else:
            mha = dict(embed_dim=H, num_heads=cfg.attn_heads, kdim=cfg.lstm_hidden, vdim=cfg.lstm_hidden,
                       dropout=cfg.dropout, batch_first=True)
        self.att_v = nn.MultiheadAttention(**mha)
        self.att_a = nn.MultiheadAttention(**mha)

        if self.official_fusion:
            dim, fusion = cfg.lstm_hidden, (ConcatHead if self.ablation == "no_enhanced_fusion" else OfficialFusion)
            self.fusion = fusion(dim, fusion_dim, cfg.dropout)
        else:
            fusion = ConcatHead if self.ablation == "no_enhanced_fusion" else EnhancedFusion
            self.fusion = fusion(H, fusion_dim, cfg.dropout)
        if cfg.prefusion_init == "random":  # the code's pre-fusion layer is a new one, not BERT's last
            self.text.reinit_upper()

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
        if self.cfg.prefusion_params == "encoder":  # where the official code's name match puts them
            enc |= {id(p) for m in self.prefusion_side() for p in m.parameters()}
        trainable = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        return [
            {"params": [p for _, p in trainable if id(p) in enc], "lr": lr},
            {"params": [p for _, p in trainable if id(p) not in enc], "lr": lr_head},
        ]

    def prefusion_side(self) -> list[nn.Module]:
        """The new modules the official code keeps inside its BERT module, so in the BERT optimizer
        group (prefusion_params: encoder): the AV-token projections to the encoder width and L_clm's heads."""
        mods: list[nn.Module] = [self.tok_v.up, self.tok_a.up] if self.lstm_token else [self.tok_v, self.tok_a]
        for name in ("clm_proj", "clm_clip"):
            if hasattr(self, name):
                mods.append(getattr(self, name))
        return mods

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
        """CLS_p: the frozen personality encoder's last-layer CLS, or the batch's `personality_cls`
        when the trainer computed it once per segment (frozen and in eval mode, it never changes)."""
        if batch.get(CLS_P_KEY) is not None:
            return batch[CLS_P_KEY]
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
        h_align, hidden = self.text.lower_at(ids, am, batch.get("token_type_ids"), self.cfg.align_layer)
        cls_s = hidden[:, 0]                                            # CLS_s
        # L_ccl / L_ps read this CLS; the same tensor when align_layer is N (so our form's graph,
        # and its gradient sums, stay exactly as they were)
        cls_align = cls_s if h_align is hidden else h_align[:, 0]

        x_v, x_a = batch["visual"], batch["audio"]
        v_mask, a_mask = self._step_mask(batch, "visual", x_v), self._step_mask(batch, "audio", x_a)
        h_v, hv_mask, hn_v = self.lstm_v(x_v, v_mask)
        h_a, ha_mask, hn_a = self.lstm_a(x_a, a_mask)
        cls_p = None
        if self.lstm_token:                                             # one token per modality
            if self.cfg.prefusion_personality and self.personality_encoder is not None:
                cls_p = self.personality_cls(batch)
            tok_v, tok_a = self.tok_v(hn_v, cls_p), self.tok_a(hn_a, cls_p)
            tv_mask = ta_mask = torch.ones_like(v_mask[:, :1])
        else:
            tok_v, tok_a = self.tok_v(x_v), self.tok_a(x_a)
            tv_mask, ta_mask = v_mask, a_mask

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
            fused_mask = torch.cat([text_mask, tv_mask, ta_mask], dim=1)
            fused = self.text.upper(seq, fused_mask)
        m_s = fused[:, 0]                                               # M_s
        if self.prefusion_gate is not None:                             # starts as no_prefusion's M_s
            m_text = self.text.upper(hidden, am.bool())[:, 0]
            m_s = m_text + torch.tanh(self.prefusion_gate) * (m_s - m_text)

        # interaction (key_padding_mask: True = ignore; interaction_mask false: the zero padding too)
        q = (self.query(m_s) if self.official_fusion else m_s)[:, None]
        kv_mask, ka_mask = (~hv_mask, ~ha_mask) if self.cfg.interaction_mask else (None, None)
        v_t = self.att_v(q, h_v, h_v, key_padding_mask=kv_mask, need_weights=False)[0][:, 0]
        a_t = self.att_a(q, h_a, h_a, key_padding_mask=ka_mask, need_weights=False)[0][:, 0]
        pred = self.fusion(v_t, a_t, q[:, 0] if self.official_fusion else m_s)  # the code fuses its 64-d query

        if cls_p is None and self.personality_encoder is not None:
            cls_p = self.personality_cls(batch)
        out = PsamfOutput(pred=pred, cls_s=cls_s, m_s=m_s, fused=fused, fused_mask=fused_mask, cls_p=cls_p)

        y = batch.get("label")
        if y is None:
            return out
        # Losses in float32 even under autocast: bf16 keeps ~3 significant digits, too few for
        # cos/tau logits and their log-sum-exp (CLIP computes its logits in fp32 for the same reason).
        with torch.autocast(device_type=pred.device.type, enabled=False):
            self._losses(out, y, cls_s.float(), cls_align.float(), tok_v.float(), tv_mask, tok_a.float(), ta_mask)
        return out

    def _losses(self, out: PsamfOutput, y, cls_s, cls_align, tok_v, v_mask, tok_a, a_mask) -> None:
        pred = out.pred.float()
        y = y.to(device=pred.device, dtype=pred.dtype).reshape(pred.shape)
        zero = pred.new_zeros(())
        out.l1 = F.l1_loss(pred, y)
        if out.cls_p is not None:
            a = self.align(cls_align, out.cls_p.float(), y)
            out.sim, out.cl, out.ccl, out.ps = a["sim"], a["cl"].mean(), a["ccl"].mean(), a["ps"].mean()
            out.align = (self.ccl_weight * a["ccl"] + self.ps_weight * a["ps"]).mean()  # weighted L_Align
        else:
            out.cl = out.ccl = out.ps = out.align = zero
        if self.ablation == "no_clm":
            out.clm = zero
        elif hasattr(self, "clm_clip"):                                 # the code: sum of two Clips
            clip_v, clip_a = self.clm_clip
            out.clm = clip_v(cls_s, masked_mean(tok_v, v_mask)) + clip_a(cls_s, masked_mean(tok_a, a_mask))
        else:
            g_t, g_v, g_a = self.clm_proj
            z_t = g_t(cls_s)
            z_v, z_a = g_v(masked_mean(tok_v, v_mask)), g_a(masked_mean(tok_a, a_mask))
            out.clm = 0.5 * (info_nce(z_t, z_v, self.tau, symmetric=True)
                             + info_nce(z_t, z_a, self.tau, symmetric=True)).mean()
        out.total = out.l1 + self.aux_lambda * (out.align + self.clm_weight * out.clm)
