"""Text and token layouts of one example, shared by the collators and by generation.

* ``legacy`` (T5 seq2seq): :func:`legacy_texts`, character truncation + ``"[EOS]"`` exactly
  as the legacy ``train_low_mem.py`` dataset.
* ``causal`` (decoder-only, "plain" template): ``prompt + "\\n"`` tokens, then response
  tokens, then the eos id. The newline separates prompt and answer so a causal model can tell
  where the prompt ends (``"spell 47"`` vs ``"spell 472"``).
* ``chat_template``: the tokenizer's chat template for one user turn with the generation
  prompt, then response tokens and the eos id (the template ends an assistant turn with
  eos, so this equals rendering the two-turn conversation).

The same prompt function serves training and generation, so both see identical prompt ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from transformers import PreTrainedTokenizerBase

from chatlm.errors import DataError

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "EOS_TEXT",
    "PLAIN_SEPARATOR",
    "DataFormat",
    "Template",
    "causal_example",
    "causal_prompt_ids",
    "legacy_prompt_text",
    "legacy_texts",
    "text_ids",
]

#: End-of-sequence marker appended as text by the legacy data path (tokenizes to the eos id).
EOS_TEXT = "[EOS]"
#: Between prompt and response in the ``causal`` ("plain") layout.
PLAIN_SEPARATOR = "\n"
#: Chat template written into tokenizers trained by :mod:`chatlm.data.tokenizer`: user / assistant
#: turns, eos after each assistant turn, ``<|assistant|>`` line as the generation prompt.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

DataFormat = Literal["legacy", "causal", "chat_template", "text"]
Template = Literal["plain", "chat_template"]


def legacy_texts(prompt: str, response: str, max_seq_len: int) -> tuple[str, str]:
    """The legacy dataset item: ``prompt[0:max_seq_len-5] + "[EOS]"``, same for the response.

    Truncation is by characters, before tokenizing (5 = ``len("[EOS]")``).
    """
    return legacy_prompt_text(prompt, max_seq_len), legacy_prompt_text(response, max_seq_len)


def legacy_prompt_text(text: str, max_seq_len: int) -> str:
    """One legacy string: ``text[0:max_seq_len-5] + "[EOS]"``."""
    return text[0 : max_seq_len - len(EOS_TEXT)] + EOS_TEXT


def causal_prompt_ids(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], template: Template = "plain"
) -> list[list[int]]:
    """Token ids that precede the answer, for each prompt (no truncation).

    ``plain``: ``prompt + "\\n"`` without special tokens. ``chat_template``: the tokenizer's
    chat template for one user message with ``add_generation_prompt=True``.
    """
    if not prompts:
        return []
    if template == "plain":
        return tokenizer([p + PLAIN_SEPARATOR for p in prompts], add_special_tokens=False)["input_ids"]
    if template == "chat_template":
        if not getattr(tokenizer, "chat_template", None):
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise DataError(f"tokenizer {name} has no chat_template; use --data.format causal or add one")
        conversations = [[{"role": "user", "content": p}] for p in prompts]
        out = tokenizer.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)
        return [list(ids) for ids in out["input_ids"]]
    raise ValueError(f"unknown template {template!r}; expected 'plain' or 'chat_template'")


def text_ids(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of plain texts, without special tokens."""
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def causal_example(
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    eos_token_id: int,
    max_seq_len: int,
    mask_prompt: bool = True,
) -> tuple[list[int], list[int]]:
    """(ids, labels) of one causal example: prompt + response + eos, cut to ``max_seq_len``.

    Truncation keeps the beginning. Labels equal ids, with prompt positions -100 when
    ``mask_prompt`` (an example whose prompt fills ``max_seq_len`` then carries no loss).
    """
    ids = [*prompt_ids, *response_ids, eos_token_id][:max_seq_len]
    labels = list(ids)
    if mask_prompt:
        n = min(len(prompt_ids), len(labels))
        labels[:n] = [-100] * n
    return ids, labels
