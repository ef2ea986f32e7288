"""The trajectory kernel on large-vocabulary shapes, and the per-model caches large vocabularies
need."""

import os
import types

import numpy as np
import pytest
import torch

from tlmicroscope import vocab
from tlmicroscope.inputs import to_tokens
from tlmicroscope.lenses import prediction_trajectory
from tlmicroscope.lenses._readout_stats import blocked_stats, final_stats, unembed_rows
from tlmicroscope.lenses.readout import Readout
from tlmicroscope.models import tiny_model

KIND = os.environ.get("TLMICROSCOPE_TEST_KIND", "auto")  # the model class CI asks for


def _reference(z, zf, tgt, k):
    """Every statistic from full log-softmaxes, the obvious way (float64)."""
    lq, lp = torch.log_softmax(z.double(), -1), torch.log_softmax(zf.double(), -1)
    z_t = z.double().gather(1, tgt[:, None])
    tv, ti = lq.topk(k, -1)
    return {
        "entropy": -(lq.exp() * lq).sum(-1),
        "kl": (lp.exp() * (lp - lq)).sum(-1),
        "ce": -lq.gather(1, tgt[:, None])[:, 0],
        "rank": (z.double() > z_t).sum(-1),
        "top_v": tv,
        "top_i": ti,
    }


@pytest.mark.parametrize("softcap", [None, 20.0])
@pytest.mark.parametrize("col", [64, 96, 1000])
def test_blocked_stats_equal_the_full_softmax(softcap, col):
    """Ragged blocks, a bias, a soft cap, k past one group, and logits that jump by ~100 nats
    in a late block (the running maximum must be re-expressed without overflow)."""
    g = torch.Generator().manual_seed(0)
    P, n_per, d, V, k = 3, 4, 16, 1000, 20
    R = P * n_per
    x = torch.randn(R, d, generator=g)
    WT = torch.randn(V, d, generator=g)
    b = torch.randn(V, generator=g)
    b[700:710] += 100.0  # a late block whose logits far exceed everything before
    finish = None if softcap is None else (lambda z: z.div_(softcap).tanh_().mul_(softcap))
    zf = 3 * torch.randn(P, V, generator=g)
    tgt = torch.randint(0, V, (R,), generator=g)
    tgt[0] = 705  # a target inside the jump
    fin, p_f, p_sums = final_stats(zf, tgt[::n_per].clone(), k, col)
    st = blocked_stats(x, WT, b, finish, tgt, p_f, p_sums, n_per, k, col)

    z = x @ WT.T + b
    if finish is not None:
        z = finish(z)
    ref = _reference(z, zf.repeat_interleave(n_per, 0), tgt, k)
    neg_h_f = (fin.pz - fin.lse).repeat_interleave(n_per)
    kl = neg_h_f - st.pz + st.lse
    torch.testing.assert_close(st.entropy.double(), ref["entropy"], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(kl.double(), ref["kl"], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(st.ce.double(), ref["ce"], atol=2e-4, rtol=1e-4)
    assert torch.equal(st.rank, ref["rank"])
    assert torch.equal(st.top_i, ref["top_i"])
    torch.testing.assert_close(st.top_v.double(), ref["top_v"], atol=2e-4, rtol=1e-4)
    assert torch.isfinite(st.entropy).all()


def test_final_stats_equal_the_full_softmax():
    g = torch.Generator().manual_seed(1)
    zf = 4 * torch.randn(5, 300, generator=g)
    tgt = torch.randint(0, 300, (5,), generator=g)
    fin, p, sums = final_stats(zf, tgt, 3, 64)
    ref = _reference(zf, zf, tgt, 3)
    torch.testing.assert_close(fin.entropy.double(), ref["entropy"], atol=1e-5, rtol=1e-5)
    assert torch.equal(fin.rank, ref["rank"]) and torch.equal(fin.top_i, ref["top_i"])
    torch.testing.assert_close(sums.sum(-1), torch.ones(5))
    torch.testing.assert_close(sums[:, -1], p[:, 256:].sum(-1))


# ------------------------------------------------------------------------------ caches
class CountingTokenizer:
    """A tokenizer proxy that records every id it is asked to turn into text."""

    def __init__(self, inner, length=None):
        self._inner = inner
        self._length = length
        self.decoded: list[int] = []

    def __len__(self):
        return self._length if self._length is not None else len(self._inner)

    def __call__(self, *args, **kwargs):
        return self._inner(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def _ids(self, ids):
        return [int(i) for i in np.asarray(ids).reshape(-1)]

    def batch_decode(self, seqs, **kwargs):
        for s in seqs:
            self.decoded += self._ids(s)
        return self._inner.batch_decode(seqs, **kwargs)

    def decode(self, ids, **kwargs):
        self.decoded += self._ids(ids)
        return self._inner.decode(ids, **kwargs)

    def convert_ids_to_tokens(self, ids, **kwargs):
        self.decoded += self._ids(ids)
        return self._inner.convert_ids_to_tokens(ids, **kwargs)


@pytest.mark.models
def test_trajectory_decodes_only_the_ids_it_shows(monkeypatch):
    model = tiny_model(n_layers=2, seed=3, kind=KIND)
    tok = model.tokenizer
    decoded: list[int] = []
    depth = [0]  # batch_decode calls decode: count the outermost call only
    for name in ("batch_decode", "decode", "convert_ids_to_tokens"):
        original = getattr(tok, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            ids = args[0] if args else next(iter(kwargs.values()))
            if not depth[0]:
                for seq in ids if _name == "batch_decode" else [ids]:
                    decoded.extend(int(i) for i in np.asarray(seq).reshape(-1))
            depth[0] += 1
            try:
                return _original(*args, **kwargs)
            finally:
                depth[0] -= 1

        monkeypatch.setattr(tok, name, counted)  # on this instance only; undone after the test
    monkeypatch.setattr(vocab, "_TABLES", vocab.weakref.WeakKeyDictionary())  # start empty
    toks = to_tokens(model, "decode little")
    traj = prediction_trajectory(model, toks, top_k=3)
    shown = set(traj.top_tokens.reshape(-1).tolist())
    inputs = set(toks.reshape(-1).tolist())  # TransformerLens's to_str_tokens decodes these
    # Besides the input's own tokens, each id shown in the top-k is decoded once: O(shown ids).
    assert set(decoded) <= shown | inputs
    others = [i for i in decoded if i not in inputs]
    assert len(others) == len(set(others)) == len(shown - inputs) < model.cfg.d_vocab // 4
    assert traj.top_strings[0, 0, 0, 0] == tok.decode([int(traj.top_tokens[0, 0, 0, 0])])
    decoded.clear()
    prediction_trajectory(model, toks, top_k=3)
    assert set(decoded) <= set(toks.reshape(-1).tolist())  # top-k ids come from the table


@pytest.mark.models
def test_token_strings_of_a_large_vocabulary_decode_each_id_once():
    inner = tiny_model(n_layers=1, kind=KIND).tokenizer
    tok = CountingTokenizer(inner, length=262_144)  # as large as Gemma 3's
    tok.batch_decode = lambda seqs, **kw: (
        tok.decoded.extend(s[0] for s in seqs),
        [f"t{s[0]}" for s in seqs],
    )[1]
    model = types.SimpleNamespace(tokenizer=tok)
    ids = torch.tensor([[5, 200_000, 5], [262_143, 300_000, 7]])
    out = vocab.token_strings(model, ids)
    assert out.tolist() == [["t5", "t200000", "t5"], ["t262143", "<300000>", "t7"]]
    assert sorted(tok.decoded) == [5, 7, 200_000, 262_143]
    vocab.token_strings(model, ids[:, :2])
    assert len(tok.decoded) == 4  # nothing decoded twice
    tok._length = 262_145  # a token was added: the table starts again
    vocab.token_strings(model, torch.tensor([5]))
    assert tok.decoded[-1] == 5 and len(tok.decoded) == 5


@pytest.mark.models
def test_readout_rows_follow_weight_changes():
    model = tiny_model(n_layers=2, seed=4, kind=KIND)
    toks = to_tokens(model, "weights move")
    before = prediction_trajectory(model, toks, top_k=2)
    readout = Readout.for_model(model)
    WT, _ = unembed_rows(readout, True)
    assert unembed_rows(readout, True)[0] is WT  # kept per readout
    with torch.no_grad():
        model.W_U.mul_(-1.0)  # in place: same storage, new version
    after = prediction_trajectory(model, toks, top_k=2)
    new = Readout.for_model(model)
    assert new is not readout
    torch.testing.assert_close(unembed_rows(new, True)[0], new.W.T)
    # Flipping the unembedding turns the top token of each intermediate layer into the bottom one.
    assert not torch.equal(before.top_tokens[:-1], after.top_tokens[:-1])
    logits = model(toks)
    ref = torch.log_softmax(logits[0, :-1], -1).gather(1, toks[0, 1:, None])[:, 0]
    torch.testing.assert_close(after.cross_entropy[-1, 0, :-1], -ref, atol=1e-4, rtol=1e-4)
