from __future__ import annotations

from pathlib import Path

import pytest

from ckpt_helpers import CHAT_TEMPLATE, build_tiny_model


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A real HF model dir: bf16 safetensors, config, tokenizer with chat template, generation config."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-base")
    build_tiny_model().save_pretrained(path, safe_serialization=True)
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(60)])}
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", pad_token="<pad>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(path)
    (path / ".onlinemodel-complete").write_text("1\n")  # dotfiles are not copied
    return path
