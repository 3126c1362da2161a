"""MulT: Multimodal Transformer (Tsai et al. 2019), with the optional User Adapter of
Personalized MulT (Lu et al.).

    text/audio/visual [B,T,D*] --Conv1D--> [B,T,d] (+ user tokens u)
      crossmodal transformers  L<-A, L<-V, A<-L, A<-V, V<-L, V<-A      (d each)
      memory self-attention    over [L<-A ; L<-V], [A<-L ; A<-V], [V<-L ; V<-A]   (2d each)
      last-step readout, concat (6d) -> residual head -> 1 sentiment score

Follows the authors' code (yaohungt/Multimodal-Transformer) in the details that matter
for reproducing it: pre-LayerNorm blocks with the source sequence normalized by the
query's LayerNorm, inputs scaled by sqrt(d) plus sinusoidal positions, a 4d ReLU MLP,
a final LayerNorm per encoder, the memory encoders having max(n_layers, 3) layers,
attention dropout attn_dropout for L targets / attn_dropout_a, attn_dropout_v for A, V
targets / attn_dropout for the memories, and the causal mask offset for unequal lengths
(counted in real steps when there is padding: see `attention_mask`).

Where we differ, on purpose: the Conv1D is always applied and pads causally (k-1 steps on
the left) so any kernel size keeps T, and masks stay aligned; key padding masks are
supported (the original has none); positions are 1..T for every step (the original gives
position 0 to steps whose first feature is exactly 0).
"""
from __future__ import annotations

import math
from typing import Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from psamf.config import MultConfig, UserAdapterConfig
from psamf.models.user_adapter import MODALITIES, UserAdapter, UserVocab


def sinusoidal_positions(T: int, d: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """[T, d] fairseq/MulT layout: sin in the first half, cos in the second, positions 1..T."""
    half = d // 2
    freq = torch.exp(torch.arange(half, device=device, dtype=torch.float32) * -(math.log(10000.0) / max(half - 1, 1)))
    ang = torch.arange(1, T + 1, device=device, dtype=torch.float32)[:, None] * freq[None, :]
    pe = torch.cat([ang.sin(), ang.cos()], dim=1)
    if d % 2:
        pe = F.pad(pe, (0, 1))
    return pe.to(dtype)


def attention_mask(Tq: int, Tk: int, key_mask: torch.Tensor | None, causal: bool, device,
                   query_mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """Boolean mask (True = may attend) of shape [B|1, 1, Tq, Tk], or None for "attend to all".

    Causal as in MulT: query i sees keys j <= i + |Tk - Tq|. With padding, i and j count *real*
    steps (their rank among the steps the masks mark True) and Tq, Tk are each sample's real
    lengths. Every modality is padded to one T, so positions would give an offset of 0 and a
    query's last real step n (where the read-out happens) would see only source steps 0..n: a
    12-token transcript would see 12 of 50 audio bins. Counted in real steps, the last real
    query sees every real key, as the reference's read-out at its last (unpadded) index does;
    without padding the rule is the reference's exactly.

    A query row that would see no key at all (a padded query before the first real key) is
    opened up to all keys instead: softmax over nothing is NaN, and NaN would leak into real
    steps through 0 * NaN in later layers. Those rows are padded queries, so their output is
    never read.
    """
    if key_mask is None and not causal:
        return None
    if causal and (key_mask is not None or query_mask is not None):
        rank_q = (torch.arange(Tq, device=device)[None] if query_mask is None
                  else query_mask.long().cumsum(1) - 1)                                  # [B|1, Tq]
        rank_k = (torch.arange(Tk, device=device)[None] if key_mask is None
                  else key_mask.long().cumsum(1) - 1)                                    # [B|1, Tk]
        n_q = torch.full((1,), Tq, device=device) if query_mask is None else query_mask.sum(1)
        n_k = torch.full((1,), Tk, device=device) if key_mask is None else key_mask.sum(1)
        offset = (n_k - n_q).abs()
        allowed = (rank_k[:, None, :] <= rank_q[:, :, None] + offset[:, None, None])[:, None]
    else:
        allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=device)
        if causal:
            allowed = allowed.tril(diagonal=abs(Tk - Tq))
        allowed = allowed[None, None]
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
        allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    return allowed


def attention_bias(allowed: torch.Tensor | None, dtype) -> torch.Tensor | None:
    """Boolean mask -> additive mask (0 where allowed, -inf elsewhere), built once per encoder."""
    if allowed is None:
        return None
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def dropout_mask(shape, p: float, dtype=torch.float32) -> torch.Tensor:
    """CPU keep-mask for dropout, already scaled: 1/(1-p) with probability 1-p, else 0.

    Why not bernoulli_: on CPU it draws one Mersenne-Twister number per element, and at
    MulT's sizes that RNG cost more than the matmuls of a layer. One 64-bit draw gives four
    16-bit uniforms instead (~4x cheaper), so p is quantized to 1/65536 (0.1 -> 0.100006).
    Uses the global generator, so torch.manual_seed makes it reproducible.
    """
    n = math.prod(shape)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)  # full 64-bit range
    r = bits.view(torch.int16)[:n].view(shape)  # uniform on [-32768, 32767]
    # The comparison writes floats straight into `keep`: going through a bool tensor (r >= t,
    # then * scale) costs two more passes in slow bool kernels (~2.4x the time at [16,10,50,50]).
    keep = torch.empty(shape, dtype=dtype)
    torch.ge(r, round(p * 65536) - 32768, out=keep)
    return keep.mul_(1.0 / (1.0 - p))


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout semantics; on CPU with the cheaper mask above, elsewhere F.dropout itself."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, True)
    return x * dropout_mask(x.shape, p, x.dtype)


class AttentionCore(torch.autograd.Function):
    """y = (softmax(q k^T * scale + bias) * keep) @ v for q, k, v [B,h,T,hd], with its own backward.

    Why: with MulT's tiny heads (hd = d/h = 5 or 10) MKL's batched GEMM is ~4x slower when the
    output's last dim is hd than when it is T. Autograd's backward of the two matmuls makes
    three such [T, hd] outputs (dq, dk, dv) and the forward one (y). Here every GEMM writes a
    [hd, T] or [T, T] result and the [T, hd] tensors are returned as transposed views.
    `keep` is a scaled dropout mask or None; `bias` an additive mask or None. Checked against
    autograd with gradcheck in tests/test_mult.py.
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, keep, scale: float):
        q = q * scale
        s = q @ k.transpose(-2, -1)
        if bias is not None:
            s += bias
        p = torch.softmax(s, dim=-1)
        pd = p if keep is None else p * keep
        y_t = v.transpose(-2, -1) @ pd.transpose(-2, -1)  # [B,h,hd,Tq]
        ctx.save_for_backward(q, k, v, p, pd, keep)
        ctx.scale = scale
        return y_t.transpose(-2, -1)

    @staticmethod
    @once_differentiable  # MulT never needs double backward; this makes asking for it an error
    def backward(ctx, dy):
        q, k, v, p, pd, keep = ctx.saved_tensors
        dpd = dy @ v.transpose(-2, -1)  # [B,h,Tq,Tk]
        dv_t = dy.transpose(-2, -1) @ pd  # [B,h,hd,Tk]
        dp = dpd if keep is None else dpd.mul_(keep)
        ds = torch.ops.aten._softmax_backward_data(dp, p, -1, p.dtype)
        dq_t = (k.transpose(-2, -1) @ ds.transpose(-2, -1)).mul_(ctx.scale)  # [B,h,hd,Tq]
        dk_t = q.transpose(-2, -1) @ ds  # [B,h,hd,Tk]; q was saved already scaled
        return dq_t.transpose(-2, -1), dk_t.transpose(-2, -1), dv_t.transpose(-2, -1), None, None, None


class Attention(nn.Module):
    """Multi-head attention: AttentionCore when training with attention dropout on CPU,
    F.scaled_dot_product_attention otherwise (no dropout, inference, and GPUs, where its fused
    kernels handle dropout too).

    One in_proj [3d, d] as in nn.MultiheadAttention; for crossmodal attention the query rows
    project the target and the key/value rows project the source (K and V are the same
    sequence in MulT, so one matmul gives both).
    """

    def __init__(self, d: int, n_heads: int, dropout: float):
        super().__init__()
        if d % n_heads:
            raise ValueError(f"d={d} is not divisible by n_heads={n_heads}")
        self.d, self.n_heads, self.dropout = d, n_heads, dropout
        self.in_proj = nn.Linear(d, 3 * d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x, src=None, bias=None, is_causal=False):
        """bias: additive mask [B|1, 1, Tq, Tk] or None; is_causal: bias is the plain causal mask,
        so SDPA may use its causal kernel instead of reading it."""
        B, Tq, d = x.shape
        if src is None:
            q, k, v = self.in_proj(x).split(d, dim=-1)
        else:
            w, b = self.in_proj.weight, self.in_proj.bias
            q = F.linear(x, w[:d], b[:d])
            k, v = F.linear(src, w[d:], b[d:]).split(d, dim=-1)
        h = self.n_heads
        q, k, v = (t.unflatten(-1, (h, d // h)).transpose(1, 2) for t in (q, k, v))  # [B,h,T,hd]
        p = self.dropout if self.training else 0.0
        if p > 0 and x.device.type == "cpu" and torch.is_grad_enabled():
            # Training with attention dropout on CPU: our core (fast GEMM layouts, cheaper
            # dropout), since SDPA falls back to its unfused math path whenever dropout is on.
            # Without dropout SDPA's fused CPU kernel wins (fwd+bwd 2.3 vs 3.6 ms at MulT's
            # [16, 10, 50, 5] causal shape), so A/V targets (attn_dropout_a/v = 0) use it.
            keep = dropout_mask((B, h, Tq, k.shape[2]), p, x.dtype)
            y = AttentionCore.apply(q, k, v, bias, keep, 1.0 / math.sqrt(d // h))
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None if is_causal else bias, is_causal=is_causal, dropout_p=p
            )
        return self.out_proj(y.transpose(1, 2).flatten(2))


class MLP(nn.Module):
    def __init__(self, d: int, relu_dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)
        self.relu_dropout = relu_dropout

    def forward(self, x):
        return self.fc2(dropout(F.relu(self.fc1(x)), self.relu_dropout, self.training))


class Block(nn.Module):
    """Pre-LN transformer layer; with `src` given it is a crossmodal layer (query x, keys src)."""

    def __init__(self, d: int, n_heads: int, attn_dropout: float, relu_dropout: float, res_dropout: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = Attention(d, n_heads, attn_dropout)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = MLP(d, relu_dropout)
        self.res_dropout = res_dropout

    def forward(self, x, src=None, bias=None, is_causal=False):
        h = self.ln_1(x)
        # MulT normalizes the source with the query's LayerNorm (one LN per layer, not two).
        kv = None if src is None else self.ln_1(src)
        x = x + dropout(self.attn(h, kv, bias, is_causal), self.res_dropout, self.training)
        x = x + dropout(self.mlp(self.ln_2(x)), self.res_dropout, self.training)
        return x


class TransformerEncoder(nn.Module):
    """MulT's TransformerEncoder: self-attention when called with x only, crossmodal with src."""

    def __init__(self, d: int, n_heads: int, n_layers: int, attn_dropout: float, cfg: MultConfig):
        super().__init__()
        self.d = d
        self.embed_dropout = cfg.embed_dropout
        self.causal = cfg.causal_mask
        self.layers = nn.ModuleList(
            Block(d, n_heads, attn_dropout, cfg.relu_dropout, cfg.res_dropout) for _ in range(n_layers)
        )
        self.ln_f = nn.LayerNorm(d)

    def embed(self, x):
        # sqrt(d) scale, then positions: the sequence keeps its magnitude next to the unit-scale PE.
        x = math.sqrt(self.d) * x + sinusoidal_positions(x.shape[1], self.d, x.device, x.dtype)
        return dropout(x, self.embed_dropout, self.training)

    def forward(self, x, src=None, x_mask=None, src_mask=None):
        """x [B,Tq,d]; src [B,Tk,d] or None; masks [B,T] bool, True = real step."""
        x = self.embed(x)
        if src is not None:
            src = self.embed(src)
        key_mask = x_mask if src is None else src_mask
        Tq, Tk = x.shape[1], (x if src is None else src).shape[1]
        # One mask for all layers; SDPA's own causal kernel when the mask is purely causal.
        is_causal = key_mask is None and x_mask is None and self.causal and Tq == Tk
        bias = attention_bias(attention_mask(Tq, Tk, key_mask, self.causal, x.device, x_mask), x.dtype)
        for layer in self.layers:
            x = layer(x, src, bias, is_causal)
        return self.ln_f(x)


class MulT(nn.Module):
    """MulT regressor: forward(text, audio, visual, user_ids=None, *masks) -> scores [B]."""

    def __init__(self, cfg: MultConfig, text_dim: int, audio_dim: int, visual_dim: int,
                 user_adapter: UserAdapter | None = None):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        if user_adapter is not None and user_adapter.d_model != d:
            raise ValueError(f"user adapter d_model {user_adapter.d_model} != mult.d_model {d}")
        kernels = {"text": cfg.kernel_l, "audio": cfg.kernel_a, "visual": cfg.kernel_v}
        dims = {"text": text_dim, "audio": audio_dim, "visual": visual_dim}
        # 1. temporal Conv1D: projects each modality to d and mixes k neighbouring steps.
        self.proj = nn.ModuleDict({m: nn.Conv1d(dims[m], d, kernels[m], bias=False) for m in MODALITIES})
        self.kernels = kernels
        # 2. crossmodal transformers, keyed target_source; attention dropout follows the target.
        attn_drop = {"text": cfg.attn_dropout, "audio": cfg.attn_dropout_a, "visual": cfg.attn_dropout_v}
        self.crossmodal = nn.ModuleDict({
            f"{t}_{s}": TransformerEncoder(d, cfg.n_heads, cfg.n_layers, attn_drop[t], cfg)
            for t in MODALITIES for s in MODALITIES if s != t
        })
        # 3. memory self-attention over the target's two crossmodal streams (at least 3 layers, as in MulT).
        self.memory = nn.ModuleDict({
            t: TransformerEncoder(2 * d, cfg.n_heads, max(cfg.n_layers, 3), cfg.attn_dropout, cfg)
            for t in MODALITIES
        })
        # 4. residual head on the concatenated last steps.
        combined = 3 * 2 * d
        self.proj1 = nn.Linear(combined, combined)
        self.proj2 = nn.Linear(combined, combined)
        self.out_layer = nn.Linear(combined, 1)
        self.user_adapter = user_adapter
        self.apply(_init_weights)

    @classmethod
    def from_config(cls, cfg: MultConfig, ua_cfg: UserAdapterConfig, text_dim: int, audio_dim: int,
                    visual_dim: int, users: UserVocab | Iterable[str] | int = 0, *,
                    n_users: int | None = None) -> "MulT":
        """The model the config describes; no adapter when user_adapter.enabled is false.

        `users`: the training speakers (a UserVocab or their ids), or a count of users.
        `n_users=` is the older keyword for a count and still accepted.
        """
        if n_users is not None:
            users = n_users
        adapter = None
        if ua_cfg.enabled:
            adapter = UserAdapter(users, cfg.d_model, ua_cfg, unknown_p=ua_cfg.unknown_p)
        return cls(cfg, text_dim, audio_dim, visual_dim, user_adapter=adapter)

    # -- parameter groups: fine-tuning uses lr_base for the MulT and lr_adapter for the adapter
    def _in_adapter(self, name: str) -> bool:
        """user_adapter.*, and with user_adapter.includes_conv the temporal Conv1D (paper Sec. 4.1)."""
        ua = self.user_adapter
        return name.startswith("user_adapter.") or (ua is not None and ua.includes_conv and name.startswith("proj."))

    def adapter_parameters(self) -> Iterator[nn.Parameter]:
        return (p for n, p in self.named_parameters() if self._in_adapter(n))

    def base_parameters(self) -> Iterator[nn.Parameter]:
        return (p for n, p in self.named_parameters() if not self._in_adapter(n))

    def param_groups(self, lr_base: float, lr_adapter: float) -> list[dict]:
        """Optimizer groups, e.g. torch.optim.Adam(model.param_groups(1e-4, 1e-3))."""
        groups = [{"params": list(self.base_parameters()), "lr": lr_base, "name": "base"}]
        adapter = list(self.adapter_parameters())
        if adapter:
            groups.append({"params": adapter, "lr": lr_adapter, "name": "user_adapter"})
        return groups

    def _project(self, m: str, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is not None:
            # Zero the padded steps first: with kernel > 1 the Conv1D would otherwise carry
            # padded values into real steps, and the padding mask could not stop that.
            x = x * mask.unsqueeze(-1).to(x.dtype)
        if m == "text":
            x = dropout(x, self.cfg.embed_dropout, self.training)  # MulT drops text features only
        conv = self.proj[m]
        if self.kernels[m] == 1:  # a kernel-1 Conv1D is a Linear; skips two transposes and a copy
            return F.linear(x, conv.weight.squeeze(-1))
        x = F.pad(x.transpose(1, 2), (self.kernels[m] - 1, 0))  # causal: step t sees t-k+1..t, T unchanged
        return conv(x).transpose(1, 2)  # [B,T,d]

    def features(self, text, audio, visual, user_ids=None, text_mask=None, audio_mask=None, visual_mask=None):
        """The concatenated last-step states [B, 6d] (MulT's `last_hs`)."""
        inputs = {"text": text, "audio": audio, "visual": visual}
        masks = {"text": text_mask, "audio": audio_mask, "visual": visual_mask}
        B = text.shape[0]
        for m in MODALITIES:
            x, mk = inputs[m], masks[m]
            if x.dim() != 3 or x.shape[0] != B:
                raise ValueError(f"{m} must be [B={B}, T, D], got {tuple(x.shape)}")
            if mk is not None and (mk.shape != x.shape[:2]):
                raise ValueError(f"{m}_mask must be [B, T] = {tuple(x.shape[:2])}, got {tuple(mk.shape)}")
            masks[m] = None if mk is None else mk.to(torch.bool)
        h = {m: self._project(m, inputs[m], masks[m]) for m in MODALITIES}
        if self.user_adapter is not None:
            if user_ids is None:  # no ids: everyone is the UNKNOWN user
                user_ids = torch.zeros(B, dtype=torch.long, device=text.device)
            u = self.user_adapter(user_ids)
            for m in MODALITIES:
                h[m], masks[m] = self.user_adapter.insert(h[m], masks[m], u[m])
        last = []
        for t in MODALITIES:
            s1, s2 = (s for s in MODALITIES if s != t)
            hs = torch.cat([
                self.crossmodal[f"{t}_{s1}"](h[t], h[s1], masks[t], masks[s1]),
                self.crossmodal[f"{t}_{s2}"](h[t], h[s2], masks[t], masks[s2]),
            ], dim=-1)
            hs = self.memory[t](hs, x_mask=masks[t])
            last.append(_last_step(hs, masks[t]))
        return torch.cat(last, dim=-1)

    def forward(self, text, audio, visual, user_ids=None, text_mask=None, audio_mask=None, visual_mask=None):
        """text [B,T,Dl], audio [B,T,Da], visual [B,T,Dv]; user_ids LongTensor[B]; masks [B,T] bool
        (True = real step). Returns the predicted sentiment [B]."""
        last_hs = self.features(text, audio, visual, user_ids, text_mask, audio_mask, visual_mask)
        h = self.proj2(dropout(F.relu(self.proj1(last_hs)), self.cfg.out_dropout, self.training))
        return self.out_layer(h + last_hs).squeeze(-1)


def _last_step(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """h [B,T,D] at each sample's last real step (the last step when there is no mask)."""
    if mask is None:
        return h[:, -1]
    T = mask.shape[1]
    # index of the last True: T-1 minus the position of the first True in the flipped mask
    # (a row with no real step reads step T-1, which then only ever saw zeroed inputs)
    idx = (T - 1) - mask.flip(1).to(torch.int8).argmax(dim=1)
    return h[torch.arange(h.shape[0], device=h.device), idx]


def _init_weights(module: nn.Module) -> None:
    # MulT initializes its transformer Linears with xavier_uniform and zero bias.
    if isinstance(module, (Attention, MLP)):
        for lin in module.children():
            if isinstance(lin, nn.Linear):
                nn.init.xavier_uniform_(lin.weight)
                nn.init.zeros_(lin.bias)
