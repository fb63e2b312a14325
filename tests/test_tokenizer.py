import inspect
import socket

import pytest

import gpt_train as gt
from gptkit import tokenizer


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the tokenizer tried to use the network")
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_gpt2_ids_offline(no_network):
    from gptkit.tokenizer import gpt2

    gpt2.cache_clear()  # built again, here, with no network
    tok = gt.get_tokenizer()
    assert tok.name == "gpt2" and tok.n_vocab == 50257
    assert tok.encode("Hello, world") == [15496, 11, 995]
    assert tok.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [50256]
    assert tok.eot_token == 50256
    text = "Every effort moves you, Mr. Holmes — naïve café 1234."
    assert tok.decode(tok.encode(text)) == text
    assert gt.text_to_token_ids("Hello, world", tok).tolist() == [[15496, 11, 995]]
    assert gt.token_ids_to_text(gt.text_to_token_ids("Hello, world", tok), tok) == "Hello, world"


def test_expected_hashes_are_tiktokens_own():
    from tiktoken_ext import openai_public

    src = inspect.getsource(openai_public.gpt2)
    assert tokenizer.GPT2_VOCAB_BPE_SHA256 in src
    assert tokenizer.GPT2_ENCODER_JSON_SHA256 in src


def test_encode_documents_separates_with_eot():
    tok = gt.get_tokenizer()
    ids = gt.encode_documents(["Hello, world<|endoftext|>Bye", "x"], num_threads=2)
    assert ids.dtype.name == "uint16"
    assert ids.tolist() == [15496, 11, 995, 50256] + tok.encode("Bye") + [50256] + tok.encode("x") + [50256]
