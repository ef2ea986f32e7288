"""The tiny models' cached byte tokenizer: a damaged cache is rebuilt, never trusted."""

import json

import pytest

from tlmicroscope.models import tiny as tiny_module


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TLMICROSCOPE_CACHE", str(tmp_path))
    tiny_module.byte_tokenizer.cache_clear()
    yield tmp_path / "tokenizers" / "tiny-byte-v2"
    tiny_module.byte_tokenizer.cache_clear()  # later tests load from the real cache again


def _fresh_tokenizer():
    tiny_module.byte_tokenizer.cache_clear()
    return tiny_module.byte_tokenizer()


def _encodes_bytes(tok) -> bool:
    text = "A tuned lens, by bytes: \u00e9\u00e8 \u2192 ok\n"
    return tok(text)["input_ids"] == list(text.encode("utf-8")) and len(tok) == 259


def _truncate(folder):
    data = (folder / "tokenizer.json").read_bytes()
    (folder / "tokenizer.json").write_bytes(data[: len(data) // 2])


def _swap_two_ids(folder):
    """Valid JSON, a loadable tokenizer, but 'A' and 'b' exchanged: wrong ids, no error on load."""
    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["A"], vocab["b"] = vocab["b"], vocab["A"]
    (folder / "tokenizer.json").write_text(json.dumps(spec))


def _drop_tokenizer_json(folder):
    (folder / "tokenizer.json").unlink()


def _empty_file(folder):
    (folder / "tokenizer.json").write_bytes(b"")


@pytest.mark.parametrize(
    "damage",
    [_truncate, _swap_two_ids, _drop_tokenizer_json, _empty_file],
    ids=["truncated", "wrong-ids", "missing", "empty"],
)
def test_a_damaged_cache_is_rebuilt(fresh_cache, damage):
    assert _encodes_bytes(_fresh_tokenizer()) and (fresh_cache / "tokenizer.json").is_file()
    damage(fresh_cache)
    tok = _fresh_tokenizer()
    assert _encodes_bytes(tok)
    assert tok.name_or_path == str(fresh_cache)  # TransformerLens reloads from this folder
    assert sorted(p.name for p in fresh_cache.parent.iterdir()) == [
        "tiny-byte-v2"
    ]  # nothing left aside
