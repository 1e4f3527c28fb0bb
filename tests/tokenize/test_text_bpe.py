import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cm3leon.tokenize.text_bpe import TextTokenizer
from cm3leon.vocab import Kind, Vocab

CORPUS = [
    "a small red circle at the top left",
    "two blue squares and a green triangle",
    "a large purple diamond in the center <break> with <mask:0> text",
    "how many objects are there? three",
    "Ein kleiner roter Kreis. 一个红色的圆 🦎 café naïve",
] * 40

SPECIAL_LOOKALIKES = ["<break>", "<mask:0>", "<eos>", "<pad>", "<infill>", "<mask:7>", "</s>", "<|endoftext|>"]


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.train(CORPUS, vocab_size=320)


def test_vocab_size_bounds(tok):
    assert 256 <= tok.vocab_size <= 320
    with pytest.raises(ValueError, match="256"):
        TextTokenizer.train(CORPUS, vocab_size=100)


def test_training_is_deterministic(tok):
    again = TextTokenizer.train(CORPUS, vocab_size=320)
    assert again.vocab_size == tok.vocab_size
    for t in CORPUS[:5]:
        assert again.encode(t) == tok.encode(t)


def test_merges_compress_the_training_text(tok):
    text = CORPUS[0]
    assert len(tok.encode(text)) < len(text.encode("utf-8"))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello world",
        "🦎🦎 chameleon 🌈 👩‍👩‍👧",
        "中文字符和日本語のテキスト",
        "e\u0301 a\u0308 combining marks \u0327",
        "   leading and    inner runs   ",
        "line one\nline two\r\n\n\ttabbed\x00nul",
        "<break><mask:0><eos>",
    ],
)
def test_exact_round_trip_examples(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_empty_string_is_empty_list(tok):
    assert tok.encode("") == []
    assert tok.decode([]) == ""


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=80))
def test_round_trip_arbitrary_unicode(tok, text):
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("literal", SPECIAL_LOOKALIKES)
def test_control_token_text_is_never_a_special_id(tok, literal):
    vocab = Vocab(text_size=tok.vocab_size, image_size=16, image_seq_len=4)
    caption = f"a caption with {literal} inside"
    ids = tok.encode(caption)
    assert tok.decode(ids) == caption
    unified = vocab.text_to_ids(ids)
    assert all(vocab.kind(i) is Kind.TEXT for i in unified)
    # The literal alone also encodes to several ordinary byte-level pieces.
    assert "".join(tok.token_strings(tok.encode(literal))).replace("Ġ", " ") == literal


def test_no_special_tokens_in_saved_file(tok, tmp_path):
    tok.save(tmp_path)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    assert spec["added_tokens"] == []
    assert spec["normalizer"] is None
    assert spec["post_processor"] is None


def test_encode_batch_matches_encode(tok):
    texts = CORPUS[:5] + ["", "🦎"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_save_load_round_trip(tok, tmp_path):
    tok.save(tmp_path / "t")
    loaded = TextTokenizer.load(tmp_path / "t")
    assert loaded.vocab_size == tok.vocab_size
    for t in CORPUS[:5]:
        assert loaded.encode(t) == tok.encode(t)


def test_load_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        TextTokenizer.load(tmp_path / "nothing")


def test_load_corrupt_file(tok, tmp_path):
    tok.save(tmp_path)
    data = (tmp_path / "tokenizer.json").read_text()
    (tmp_path / "tokenizer.json").write_text(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        TextTokenizer.load(tmp_path)


def test_load_corrupt_config(tok, tmp_path):
    tok.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        TextTokenizer.load(tmp_path)


def test_load_refuses_tokenizer_with_special_tokens(tok, tmp_path):
    tok.save(tmp_path)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["added_tokens"] = [{"id": 0, "content": "<eos>", "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False, "special": True}]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="special"):
        TextTokenizer.load(tmp_path)


def test_decode_rejects_out_of_range(tok):
    with pytest.raises(ValueError, match="outside"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="outside"):
        tok.decode([-1])


def test_encode_rejects_non_str(tok):
    with pytest.raises(ValueError, match="str"):
        tok.encode(b"bytes")  # type: ignore[arg-type]
