"""Conditioning templates: how feedback and prompt become model input, and a completion a training target.

Feedback and prompt stay separate fields end to end: inputs are built by concatenating token ids of the
parts, so nothing ever has to split a string to recover the prompt (the official code's bug, method.md §5).

| style         | policy input                                   | paper use              |
|---------------|------------------------------------------------|------------------------|
| tag_separator | ids(feedback) + [<|separator|>] + ids(prompt)  | ALT-RM toxicity        |
| prefix        | ids(prefix_format.format(feedback)) + ids(prompt) | TL;DR ("X input: ", "feedback: X input: "), HH ("X.\\n\\n") |
| quark         | [quantile token] + ids(prompt)                 | Quark                  |

A `prefix_format` that contains `{prompt}` places the feedback around the prompt instead of before it:
`"{prompt} {feedback}:"` gives ids(prompt) + ids(" A good summary:") — Chain-of-Hindsight's positive/negative
phrases right before the answer. The prompt is still its own token span (and the only part truncated).

With no feedback (iteration 1, the reference model, `--model` generation) the input is just ids(prompt).
`bos_token` (e.g. SmolLM2's "<|endoftext|>") goes first in every input, conditioned or not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SENTENCE_END = re.compile(r"[.!?…][\"'”’)\]]*\s*$")


@dataclass
class Template:
    style: str = "tag_separator"
    prefix_format: str = "{feedback} input: "
    separator_token: str = "<|separator|>"
    completion_prefix: str = ""
    eos_rule: str = "unless_truncated"
    prompt_format: str = "{prompt}"
    bos_token: str = ""  # "" for checkpoints written before the option existed: they had none

    @classmethod
    def from_config(cls, cfg) -> "Template":
        return cls(
            cfg.template,
            cfg.prefix_format,
            cfg.separator_token,
            cfg.completion_prefix,
            cfg.eos_rule,
            cfg.prompt_format,
            cfg.bos_token,
        )

    def to_dict(self) -> dict:
        return dict(
            style=self.style,
            prefix_format=self.prefix_format,
            separator_token=self.separator_token,
            completion_prefix=self.completion_prefix,
            eos_rule=self.eos_rule,
            prompt_format=self.prompt_format,
            bos_token=self.bos_token,
        )

    def new_tokens(self, vocabulary: list[str]) -> tuple[list[str], str]:
        """Tokens this template adds to the tokenizer, and how their embeddings start (models.add_tokens)."""
        if self.style == "tag_separator":
            return [self.separator_token], "eos"
        if self.style == "quark":
            return list(vocabulary), "stats"
        return [], "eos"

    def condition_ids(self, tokenizer, feedback: str | None) -> list[int]:
        """Conditioning tokens that go before the prompt."""
        if feedback is None:
            return []
        if self.style == "tag_separator":
            return _ids(tokenizer, feedback) + [tokenizer.convert_tokens_to_ids(self.separator_token)]
        if self.style == "quark":
            return [tokenizer.convert_tokens_to_ids(feedback)]  # the feedback string *is* the quantile token
        if "{prompt}" in self.prefix_format:
            return _ids(tokenizer, self.prefix_format.split("{prompt}", 1)[0].replace("{feedback}", feedback))
        return _ids(tokenizer, self.prefix_format.format(feedback=feedback))

    def after_prompt_ids(self, tokenizer, feedback: str | None) -> list[int]:
        """Conditioning tokens that go after the prompt (prefix_format with {prompt}; none otherwise)."""
        if feedback is None or self.style != "prefix" or "{prompt}" not in self.prefix_format:
            return []
        return _ids(tokenizer, self.prefix_format.split("{prompt}", 1)[1].replace("{feedback}", feedback))

    def input_ids(
        self, tokenizer, feedback: str | None, prompt: str, max_prompt_tokens: int | None = None
    ) -> list[int]:
        p = _ids(tokenizer, self.prompt_format.replace("{prompt}", prompt))  # replace, not format: prompts hold braces
        if max_prompt_tokens and len(p) > max_prompt_tokens:
            p = p[-max_prompt_tokens:]  # keep the end: it is what the model continues
        # The first position is an attention sink: models largely ignore its content. A fixed token there keeps
        # the feedback's first word (the only thing that differs between tags) where attention can read it.
        bos = [tokenizer.convert_tokens_to_ids(self.bos_token)] if self.bos_token else []
        return bos + self.condition_ids(tokenizer, feedback) + p + self.after_prompt_ids(tokenizer, feedback)

    def target_ids(self, tokenizer, completion: str, truncated: bool) -> list[int]:
        ids = _ids(tokenizer, self.completion_prefix + completion)
        if append_eos(self.eos_rule, completion, truncated):
            ids.append(tokenizer.eos_token_id)
        return ids


def append_eos(rule: str, completion: str, truncated: bool) -> bool:
    """EOS rule (method.md §5): don't teach the model to stop where the token limit cut it mid-sentence."""
    if rule == "always":
        return True
    if rule == "never":
        return False
    return not (truncated and not SENTENCE_END.search(completion))


def _ids(tokenizer, text: str) -> list[int]:
    # split_special_tokens: user text that spells a control token ("<|separator|>", a Quark token) stays text;
    # control tokens enter only through convert_tokens_to_ids above.
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids if text else []


def left_pad(seqs: list[list[int]], pad_id: int):
    """Left-pad token lists → (input_ids, attention_mask, position_ids). Positions count real tokens only, so a
    padded sequence sees the same positions as it would alone (generation and training agree)."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            attn[i, width - len(s) :] = 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    return ids, attn, pos
