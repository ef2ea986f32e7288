import json

import pytest
import torch

from tlmicroscope.corpus import embedded_documents, read_texts, token_stream, token_windows
from tlmicroscope.models import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", n_layers=1, n_ctx=64)


def test_embedded_corpus_is_the_pydoc_topics():
    from pydoc_data import topics

    docs = embedded_documents()
    assert len(docs) == sum(1 for v in topics.topics.values() if v.strip())
    assert sum(map(len, docs)) > 400_000


def test_files_folders_and_records(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    with open(tmp_path / "b.jsonl", "w") as f:
        f.write(json.dumps({"text": "beta"}) + "\n\n" + json.dumps("gamma") + "\n")
    assert list(read_texts(tmp_path)) == ["alpha", "beta", "gamma"]
    assert list(read_texts(tmp_path / "a.txt")) == ["alpha"]
    assert list(read_texts([{"body": "x"}], text_field="body")) == ["x"]
    with open(tmp_path / "c.jsonl", "w") as f:
        f.write(json.dumps({"content": "no text field"}) + "\n")
    with pytest.raises(ValueError, match="c.jsonl:1 has no 'text' field"):
        list(read_texts(tmp_path / "c.jsonl"))
    with pytest.raises(FileNotFoundError, match="No corpus"):
        list(read_texts(tmp_path / "missing.txt"))


def test_stream_joins_documents_with_eos(model):
    eos = model.tokenizer.eos_token_id
    assert token_stream(model, ["ab", "c"]).tolist() == [97, 98, eos, 99, eos]


def test_windows_stride_shuffle_and_errors(model):
    text = ["".join(chr(97 + i % 26) for i in range(40))]
    w = token_windows(model, text, seq_len=8, stride=4)
    assert w.shape == (9, 8) and torch.equal(w[1, :4], w[0, 4:])
    a = token_windows(model, text, seq_len=8, shuffle=True, seed=3)
    b = token_windows(model, text, seq_len=8, shuffle=True, seed=3)
    assert torch.equal(a, b) and sorted(map(tuple, a.tolist())) == sorted(
        map(tuple, token_windows(model, text, seq_len=8).tolist())
    )
    with pytest.raises(ValueError, match="41 tokens, fewer than one window of 50"):
        token_windows(model, text, seq_len=50)
    with pytest.raises(ValueError, match="longer than the model's context of 64"):
        token_windows(model, text, seq_len=65)
    with pytest.raises(ValueError, match="Asked for 10 windows"):
        token_windows(model, text, seq_len=8, n_windows=10)
