"""MulT + User Adapter on tiny shapes (single thread, well under a second each)."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from psamf.config import MultConfig, UserAdapterConfig
from psamf.errors import InputError
from psamf.models.mult import MulT, attention_mask
from psamf.models.user_adapter import UNKNOWN, UserAdapter, UserVocab

torch.set_num_threads(1)

B, T = 3, 6
DIMS = dict(text_dim=7, audio_dim=5, visual_dim=4)
N_USERS = 4


def cfg(**kw) -> MultConfig:
    return dataclasses.replace(MultConfig(), d_model=8, n_heads=2, n_layers=1, **kw)


def ua_cfg(**kw) -> UserAdapterConfig:
    return dataclasses.replace(UserAdapterConfig(), hidden=16, **kw)


def make(mult_kw=None, ua_kw=None, adapter=True, seed=0) -> MulT:
    torch.manual_seed(seed)
    ua = ua_cfg(enabled=adapter, **(ua_kw or {}))
    return MulT.from_config(cfg(**(mult_kw or {})), ua, **DIMS, users=N_USERS).eval()


def batch(seed=1, t=T):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, t, DIMS["text_dim"], generator=g),
            torch.randn(B, t, DIMS["audio_dim"], generator=g),
            torch.randn(B, t, DIMS["visual_dim"], generator=g))


USERS = torch.tensor([1, 2, 0])


def test_output_shape_with_and_without_adapter():
    for adapter in (True, False):
        y = make(adapter=adapter)(*batch(), user_ids=USERS)
        assert y.shape == (B,) and torch.isfinite(y).all()


def test_every_parameter_gets_a_gradient():
    model = make(mult_kw=dict(kernel_l=3, kernel_a=2)).train()
    model(*batch(), user_ids=USERS).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_causal_mask_changes_output():
    a = make(mult_kw=dict(causal_mask=True))
    b = make(mult_kw=dict(causal_mask=False))
    b.load_state_dict(a.state_dict())
    x = batch()
    assert not torch.allclose(a(*x, user_ids=USERS), b(*x, user_ids=USERS))


def test_position_start_vs_end_changes_output():
    end = make(ua_kw=dict(position="end"))
    start = make(ua_kw=dict(position="start"))
    start.load_state_dict(end.state_dict())
    x = batch()
    assert not torch.allclose(end(*x, user_ids=USERS), start(*x, user_ids=USERS))


@pytest.mark.parametrize("position", ["end", "start"])
def test_prompt_len_above_one(position):
    model = make(ua_kw=dict(prompt_len=3, position=position))
    u = model.user_adapter(USERS)
    assert all(v.shape == (B, 3, 8) for v in u.values())
    x, m = model.user_adapter.insert(torch.zeros(B, T, 8), torch.ones(B, T, dtype=torch.bool), u["text"])
    assert x.shape == (B, T + 3, 8) and m.shape == (B, T + 3) and m.all()
    assert model(*batch(), user_ids=USERS).shape == (B,)


def test_user_changes_output_and_unknown_user_works():
    model = make()
    vocab = UserVocab(["spk_b", "spk_a", "spk_c", "spk_d"])
    ids = vocab.encode(["spk_a", "never-seen", None])
    assert ids.tolist() == [1, UNKNOWN, UNKNOWN]
    x = batch()
    y = model(*x, user_ids=ids)
    assert torch.isfinite(y).all()
    assert y[1] != model(*x, user_ids=vocab.encode(["spk_a", "spk_c", None]))[1]  # the user matters
    # no ids at all = everyone UNKNOWN
    assert torch.allclose(model(*x), model(*x, user_ids=torch.zeros(B, dtype=torch.long)))
    with pytest.raises(ValueError, match="user_ids must be in"):
        model(*x, user_ids=torch.tensor([0, 1, N_USERS + 1]))


def test_adapter_owns_the_vocab_and_saves_it():
    torch.manual_seed(0)
    model = MulT.from_config(cfg(), ua_cfg(), **DIMS, users=["spk_b", "spk_a"]).eval()
    ad = model.user_adapter
    assert ad.n_users == 2 and ad.encode(["spk_a", "spk_b", "zzz"]).tolist() == [1, 2, UNKNOWN]
    x = batch()
    y_unknown = model(*x, user_ids=ad.encode(["new"] * B))
    assert ad.add_users(["new"]) == [3] and ad.n_users == 3
    torch.testing.assert_close(model(*x, user_ids=ad.encode(["new"] * B)), y_unknown)  # starts at UNKNOWN
    # the mapping is part of the state_dict
    fresh = MulT.from_config(cfg(), ua_cfg(), **DIMS, users=3)
    fresh.load_state_dict(model.state_dict())
    assert fresh.user_adapter.vocab.to_list() == ["spk_a", "spk_b", "new"]
    with pytest.raises(ValueError, match="user count"):
        make().user_adapter.encode(["a"])


def test_user_vocab():
    v = UserVocab(["b", "a", "b", "c"])
    assert len(v) == 3 and v.to_list() == ["a", "b", "c"]  # sorted, deduplicated
    assert v.index("a") == 1 and v.index("zzz") == UNKNOWN and "c" in v and "zzz" not in v
    assert v.add("new") == 4 and v.add("new") == 4 and v.index("a") == 1  # appended, rows stable
    assert UserVocab.from_list(v.to_list()).to_list() == v.to_list()


def test_grow_starts_new_users_at_unknown():
    model = make()
    before = {m: e.weight.detach().clone() for m, e in model.user_adapter.user_embedding.items()}
    model.user_adapter.grow(N_USERS + 1)
    for m, e in model.user_adapter.user_embedding.items():
        assert e.weight.shape[0] == N_USERS + 2
        assert torch.equal(e.weight[: N_USERS + 1], before[m])
    x = batch()
    new = torch.full((B,), N_USERS + 1, dtype=torch.long)
    assert torch.allclose(model(*x, user_ids=new), model(*x, user_ids=torch.zeros(B, dtype=torch.long)))


def test_unknown_p_replaces_users_only_in_training():
    ad = UserAdapter(N_USERS, 8, ua_cfg(), unknown_p=0.5)
    ids = torch.ones(1000, dtype=torch.long)
    torch.manual_seed(0)
    ad.train()
    tok_train = ad(ids)["text"]
    unk = ad(torch.zeros(1, dtype=torch.long))["text"]
    is_unknown = (tok_train - unk).abs().amax(dim=(1, 2)) < 1e-6  # batched matmul may differ in the last bit
    assert 0.4 < is_unknown.float().mean().item() < 0.6
    ad.eval()
    assert not ((ad(ids)["text"] - unk).abs().amax(dim=(1, 2)) < 1e-6).any()


def _masks(kind: str) -> torch.Tensor:
    m = torch.ones(B, T, dtype=torch.bool)
    if kind == "right":
        m[0, 4:] = False
        m[1, 2:] = False
    else:  # left padding: with a causal mask, early padded queries see no real key at all
        m[0, :3] = False
        m[1, :1] = False
    return m


@pytest.mark.parametrize("pad", ["right", "left"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("adapter", [None, "end", "start"])
def test_padding_mask_respected(pad, causal, adapter):
    kw = dict(causal_mask=causal, kernel_l=3, kernel_a=2, kernel_v=1)  # kernels > 1 must not leak padding
    model = make(mult_kw=kw, ua_kw=dict(position=adapter or "end"), adapter=adapter is not None)
    mask = _masks(pad)
    x = batch()
    y = model(*x, user_ids=USERS, text_mask=mask, audio_mask=mask, visual_mask=mask)
    g = torch.Generator().manual_seed(9)
    x2 = [torch.where(mask[..., None], t, 100 * torch.randn(t.shape, generator=g)) for t in x]
    y2 = model(*x2, user_ids=USERS, text_mask=mask, audio_mask=mask, visual_mask=mask)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y2, rtol=0, atol=1e-5)
    with torch.no_grad():  # the inference path (SDPA) agrees with the training path (AttentionCore)
        y3 = model(*x2, user_ids=USERS, text_mask=mask, audio_mask=mask, visual_mask=mask)
    torch.testing.assert_close(y3, y, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model(*x2, user_ids=USERS), y2)  # without masks the padding does count


def test_all_true_mask_equals_no_mask():
    model = make(mult_kw=dict(kernel_l=3))
    x = batch()
    m = torch.ones(B, T, dtype=torch.bool)
    torch.testing.assert_close(model(*x, user_ids=USERS),
                               model(*x, user_ids=USERS, text_mask=m, audio_mask=m, visual_mask=m))


def test_right_padding_equals_truncation():
    # Real steps keep positions 1..n under right padding, so a padded sample scores like the short one.
    model = make(adapter=False, mult_kw=dict(kernel_l=3))
    x = batch()
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, 4:] = False
    y = model(*x, text_mask=mask, audio_mask=mask, visual_mask=mask)
    torch.testing.assert_close(y, model(*(t[:, :4] for t in x)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_unaligned_lengths(causal):
    model = make(mult_kw=dict(causal_mask=causal))
    text, _, _ = batch(t=6)
    _, audio, _ = batch(t=9)
    _, _, visual = batch(t=4)
    am = torch.ones(B, 9, dtype=torch.bool)
    am[0, 7:] = False
    y = model(text, audio, visual, user_ids=USERS, audio_mask=am)
    assert y.shape == (B,) and torch.isfinite(y).all()


def test_attention_mask_semantics():
    # MulT's causal offset: query i sees keys j <= i + |Tk - Tq|
    m = attention_mask(2, 4, None, True, "cpu")[0, 0]
    assert m.tolist() == [[True, True, True, False], [True, True, True, True]]
    # with padding, i, j, Tq and Tk count real steps: 1 real query of 3, 2 real keys of 3
    qm, km = torch.tensor([[True, False, False]]), torch.tensor([[True, True, False]])
    m = attention_mask(3, 3, km, True, "cpu", qm)[0, 0]
    assert m[0].tolist() == [True, True, False]  # the last real query sees every real key
    # a query row with no visible real key is opened up instead of producing NaN
    km = torch.tensor([[False, True, True]])
    qm = torch.tensor([[False, True, True]])
    m = attention_mask(3, 3, km, True, "cpu", qm)[0, 0]
    assert m.tolist() == [[True, True, True], [False, True, False], [False, True, True]]


@pytest.mark.parametrize("position", ["start", "end", None])
def test_the_read_out_step_sees_every_real_source_step(position):
    """A short transcript among long AV sequences: the text branch's read-out must depend on
    the audio/visual bins after the last text token, whatever the padding and adapter position."""
    from psamf.config import MultConfig, UserAdapterConfig

    torch.manual_seed(0)
    cfg = MultConfig(d_model=8, n_heads=2, n_layers=1, embed_dropout=0.0, attn_dropout=0.0, relu_dropout=0.0,
                     res_dropout=0.0)
    ua = UserAdapterConfig(enabled=position is not None, hidden=8, position=position or "end")
    model = MulT.from_config(cfg, ua, 6, 5, 4, users=["u1"]).eval()
    T, n_text = 10, 3
    text, audio, visual = torch.randn(1, T, 6), torch.randn(1, T, 5), torch.randn(1, T, 4)
    text_mask = torch.arange(T)[None] < n_text
    full = torch.ones(1, T, dtype=torch.bool)
    audio2, visual2 = audio.clone(), visual.clone()
    audio2[:, n_text + 2:] += 1.0  # bins after the last text token
    visual2[:, n_text + 2:] -= 1.0
    users = torch.ones(1, dtype=torch.long) if position else None
    with torch.no_grad():
        a = model.features(text, audio, visual, users, text_mask, full, full)
        b = model.features(text, audio2, visual2, users, text_mask, full, full)
    d = cfg.d_model * 2  # the text branch's read-out is the first 2d features
    assert not torch.allclose(a[:, :d], b[:, :d], atol=1e-6)


def test_determinism_under_manual_seed():
    a, b = make(seed=3), make(seed=3)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and (torch.equal(pa, pb) if torch.is_tensor(pa) else pa == pb)
    x = batch()
    a.train(), b.train()
    torch.manual_seed(5)
    ya = a(*x, user_ids=USERS)
    torch.manual_seed(5)
    yb = b(*x, user_ids=USERS)
    assert torch.equal(ya, yb)
    assert not torch.equal(make(seed=4)(*x), a.eval()(*x))


def test_parameter_groups_disjoint_and_complete():
    model = make()
    base = {id(p) for p in model.base_parameters()}
    adapter = {id(p) for p in model.adapter_parameters()}
    everything = {id(p) for p in model.parameters()}
    assert base and adapter and not base & adapter and base | adapter == everything
    assert adapter == {id(p) for p in model.user_adapter.parameters()}
    groups = model.param_groups(lr_base=1e-4, lr_adapter=1e-3)
    assert [(g["name"], g["lr"]) for g in groups] == [("base", 1e-4), ("user_adapter", 1e-3)]
    torch.optim.Adam(groups)  # a valid optimizer spec
    plain = make(adapter=False)
    assert plain.user_adapter is None and list(plain.adapter_parameters()) == []
    assert len(plain.param_groups(1e-4, 1e-3)) == 1


def test_rejects_bad_config():
    with pytest.raises(InputError, match=r"mult.d_model must be a multiple of mult.n_heads \(3\), got 8"):
        dataclasses.replace(cfg(), n_heads=3)  # config.py refuses it; the model never sees it
    with pytest.raises(InputError, match="user_adapter.position must be one of end, start, got 'middle'"):
        ua_cfg(position="middle")
    with pytest.raises(ValueError, match="d_model"):
        MulT(cfg(), **DIMS, user_adapter=UserAdapter(2, 16, ua_cfg()))
    with pytest.raises(ValueError, match="audio must be"):
        make()(*batch()[:1], torch.randn(B, T), batch()[2])


def test_state_dict_roundtrip_keeps_predictions():
    model = make()
    clone = copy.deepcopy(model)
    fresh = make(seed=11)
    fresh.load_state_dict(clone.state_dict())
    x = batch()
    assert torch.equal(model(*x, user_ids=USERS), fresh(*x, user_ids=USERS))


def test_dropout_matches_f_dropout_semantics():
    from psamf.models.mult import dropout

    x = torch.ones(200_000, requires_grad=True)
    torch.manual_seed(0)
    y = dropout(x, 0.1, True)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.005  # keep w.p. 1 - p
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.9))  # inverted scaling
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())  # gradient flows through the same mask
    torch.manual_seed(0)
    assert torch.equal(dropout(x, 0.1, True), y)  # reproducible under manual_seed
    assert dropout(x, 0.1, False) is x and dropout(x, 0.0, True) is x


@pytest.mark.parametrize("masking", ["none", "causal", "bias"])
def test_training_attention_path_equals_sdpa(masking):
    # With grad on, CPU attention runs AttentionCore; under no_grad it runs SDPA. With a p so
    # small that no weight is dropped the two must agree, masks included.
    from psamf.models.mult import Attention, attention_bias, attention_mask

    torch.manual_seed(0)
    att = Attention(8, 2, dropout=1e-9).train()
    x, src = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    km = torch.tensor([[True] * 5, [False, True, True, True, False]])
    bias = {"none": None, "causal": attention_bias(attention_mask(5, 5, None, True, "cpu"), x.dtype),
            "bias": attention_bias(attention_mask(5, 5, km, True, "cpu"), x.dtype)}[masking]
    is_causal = masking == "causal"
    y_core = att(x, src, bias, is_causal)
    with torch.no_grad():
        y_sdpa = att(x, src, bias, is_causal)
    torch.testing.assert_close(y_core, y_sdpa, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("with_keep", [True, False])
def test_attention_core_gradcheck(with_bias, with_keep):
    from psamf.models.mult import AttentionCore, attention_bias, attention_mask, dropout_mask

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 4, 2, dtype=torch.float64, requires_grad=True) for _ in range(3))
    km = torch.tensor([[True, True, True, True], [False, True, True, False]])
    bias = attention_bias(attention_mask(4, 4, km, True, "cpu"), torch.float64) if with_bias else None
    keep = dropout_mask((2, 3, 4, 4), 0.3, torch.float64) if with_keep else None
    assert torch.autograd.gradcheck(lambda a, b, c: AttentionCore.apply(a, b, c, bias, keep, 0.7), (q, k, v))
    # and it is the attention it claims to be
    s = (q @ k.transpose(-2, -1)) * 0.7 + (0 if bias is None else bias)
    ref = (s.softmax(-1) * (1 if keep is None else keep)) @ v
    torch.testing.assert_close(AttentionCore.apply(q, k, v, bias, keep, 0.7), ref)


def test_kernel_one_projection_is_the_conv():
    model = make(mult_kw=dict(kernel_a=1))
    _, audio, _ = batch()
    conv = model.proj["audio"](audio.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(model._project("audio", audio, None), conv)


def test_includes_conv_moves_the_temporal_conv_into_the_adapter_group():
    from psamf.config import MultConfig, UserAdapterConfig

    cfg = MultConfig(d_model=8, n_heads=2, n_layers=1)
    names = {}
    for includes in (False, True):
        model = MulT.from_config(cfg, UserAdapterConfig(hidden=8, includes_conv=includes), 6, 5, 4, users=["u"])
        groups = {g["name"]: {id(p) for p in g["params"]} for g in model.param_groups(1e-4, 1e-3)}
        conv = {id(p) for p in model.proj.parameters()}
        names[includes] = "user_adapter" if conv <= groups["user_adapter"] else "base" if conv <= groups["base"] else "?"
        assert not groups["base"] & groups["user_adapter"]
        assert len(groups["base"]) + len(groups["user_adapter"]) == len(list(model.parameters()))
    assert names == {False: "base", True: "user_adapter"}
