"""Chat-template tokenisation shared by the recipes: where the assistant answer starts and which tokens end it.

The prompt is the chat template rendered with ``add_generation_prompt=True``; an answer is the text the template puts
before the assistant content, the answer text, then the template's end-of-turn token (for ChatML: ``<|im_end|>``),
found by rendering a probe conversation. Tokenizers without a chat template use a plain
``System:/User:/Assistant:`` format and the tokenizer's EOS token. No torch or transformers import: any Hugging Face
tokenizer works.
"""

from __future__ import annotations

from typing import Any

from adaptermerge.errors import InputError

_PROBE = "\u2063WEAVEREC-ANSWER-PROBE\u2063"  # text that no template contains, used to locate the answer slot


def uses_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer: Any, msgs: list[dict[str, str]], generation_prompt: bool) -> str:
    """The conversation rendered by the tokenizer's chat template (as text)."""
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)


def _ids(tokenizer: Any, text: str, add_special_tokens: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def chat_answer_format(tokenizer: Any) -> tuple[str, tuple[int, ...]]:
    """Return (text the template puts before the answer content, token ids that end the answer)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if not uses_chat_template(tokenizer):
        if eos is None:
            raise InputError("tokenizer has neither a chat template nor an EOS token: cannot mark answer ends")
        return "", (int(eos),)
    base = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    prefix = render_chat(tokenizer, base, generation_prompt=True)
    full = render_chat(tokenizer, [*base, {"role": "assistant", "content": _PROBE}], generation_prompt=False)
    at = full.find(_PROBE)
    if not full.startswith(prefix) or at < len(prefix):
        raise InputError(
            "tokenizer chat template renders the assistant turn inconsistently with add_generation_prompt; "
            "use a tokenizer with a standard template"
        )
    suffix_ids = _ids(tokenizer, full[at + len(_PROBE) :])
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for i, tok in enumerate(suffix_ids):
        if tok in special:
            return full[len(prefix) : at], tuple(suffix_ids[: i + 1])
    if eos is None:
        raise InputError("tokenizer chat template ends turns without a special token and there is no EOS token")
    return full[len(prefix) : at], (int(eos),)


class ChatFormat:
    """Token ids of (system, user) prompts and of assistant answers for one tokenizer (see the module docstring)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.uses_chat_template = uses_chat_template(tokenizer)
        self.answer_prefix, self.end_ids = chat_answer_format(tokenizer)

    def prompt_text(self, system: str, user: str) -> str:
        if self.uses_chat_template:
            msgs = [{"role": "system", "content": system}, {"role": "user", "content": user}]
            return render_chat(self.tokenizer, msgs, generation_prompt=True)
        return f"System: {system}\n\nUser: {user}\n\nAssistant: "

    def prompt_ids(self, system: str, user: str) -> list[int]:
        return _ids(self.tokenizer, self.prompt_text(system, user), add_special_tokens=not self.uses_chat_template)

    def answer_ids(self, text: str) -> list[int]:
        """Template prefix + text + end-of-turn token(s)."""
        return _ids(self.tokenizer, self.answer_prefix + text) + list(self.end_ids)


__all__ = ["ChatFormat", "chat_answer_format", "render_chat", "uses_chat_template"]
