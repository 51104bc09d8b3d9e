"""Conditioning templates (method.md §5) rendered with SmolLM2's real tokenizer.

Expected ids always come from the *pristine* session tokenizer (no tokens added), so a template that
tokenised feedback and prompt together, or let added tokens leak into text, would not match.
"""

from __future__ import annotations

import pytest
import torch

from altlm import models
from altlm.config import TOXICITY_WORDS
from altlm.template import Template, append_eos, left_pad

PROMPT = "The quick brown fox said that"
# A prompt holding the prefix template's own delimiter: the official code split strings on it (method.md §5).
TRICKY = "Q: what comes after input: and feedback: here? input: 42"


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


# --------------------------------------------------------------------------- tag_separator


def test_tag_separator_ids_and_embedding(tiny, fresh_tiny):
    _, base_tok = tiny
    model, tok = fresh_tiny
    t = Template(style="tag_separator")
    new, init = t.new_tokens(TOXICITY_WORDS)
    assert (new, init) == (["<|separator|>"], "eos")
    n_before = len(tok)
    (sep,) = models.add_tokens(model, tok, new, init)
    assert sep == n_before  # a genuinely new id, not an existing token
    assert len(tok) == n_before + 1
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == len(tok)
    assert torch.equal(emb[sep], emb[tok.eos_token_id])
    assert tok.decode([sep]) == "<|separator|>"

    for fb in TOXICITY_WORDS:
        got = t.input_ids(tok, fb, PROMPT)
        assert got == ids(base_tok, fb) + [sep] + ids(base_tok, PROMPT)
        assert got.count(sep) == 1
    # idempotent: adding again neither grows the vocabulary nor moves the id
    assert models.add_tokens(model, tok, new, init) == [sep] and len(tok) == n_before + 1


def test_tag_separator_prompt_with_delimiter_text(tiny, fresh_tiny):
    _, base_tok = tiny
    model, tok = fresh_tiny
    t = Template(style="tag_separator")
    (sep,) = models.add_tokens(model, tok, *t.new_tokens(TOXICITY_WORDS))
    got = t.input_ids(tok, "Lowest Toxicity", TRICKY)
    assert got == ids(base_tok, "Lowest Toxicity") + [sep] + ids(base_tok, TRICKY)


# --------------------------------------------------------------------------- prefix


@pytest.mark.parametrize("fmt", ["{feedback} input: ", "feedback: {feedback} input: ", "{feedback}.\n\n"])
@pytest.mark.parametrize("feedback", ["Excellent.", "Harmless and very helpful", "coherent but misses the main point"])
@pytest.mark.parametrize("prompt", [PROMPT, TRICKY])
def test_prefix_variants(tiny, fmt, feedback, prompt):
    model, tok = tiny
    t = Template(style="prefix", prefix_format=fmt)
    assert t.new_tokens(TOXICITY_WORDS)[0] == []  # prefix adds no tokens
    p = ids(tok, prompt)
    got = t.input_ids(tok, feedback, prompt)
    cond = got[: len(got) - len(p)]
    assert got[len(cond) :] == p  # the prompt's ids follow unchanged
    assert cond == ids(tok, fmt.format(feedback=feedback))
    assert tok.decode(cond) == fmt.format(feedback=feedback)
    assert t.condition_ids(tok, feedback) == cond


def test_prefix_paper_strings(tiny):
    _, tok = tiny
    assert tok.decode(Template("prefix", "{feedback} input: ").condition_ids(tok, "Excellent.")) == "Excellent. input: "
    assert (
        tok.decode(Template("prefix", "feedback: {feedback} input: ").condition_ids(tok, "Good summary"))
        == "feedback: Good summary input: "
    )
    assert tok.decode(Template("prefix", "{feedback}.\n\n").condition_ids(tok, "Harmful")) == "Harmful.\n\n"


@pytest.mark.parametrize("prompt", [PROMPT, TRICKY, "a prompt with {braces} and {feedback} in it"])
def test_prompt_placeholder_in_prefix_format_puts_the_feedback_around_the_prompt(tiny, prompt):
    """Chain-of-Hindsight's "{prompt} {feedback}:": ids(prompt), then ids(" A good summary:") — each part tokenised
    on its own, the prompt's span unchanged (braces in it stay text) and the only part max_prompt_tokens cuts."""
    _, tok = tiny
    t = Template(style="prefix", prefix_format="Q: {prompt} {feedback}:")
    got = t.input_ids(tok, "A good summary", prompt)
    assert got == ids(tok, "Q: ") + ids(tok, prompt) + ids(tok, " A good summary:")
    assert t.condition_ids(tok, "A good summary") == ids(tok, "Q: ")
    assert t.after_prompt_ids(tok, "A good summary") == ids(tok, " A good summary:")
    assert t.input_ids(tok, None, prompt) == ids(tok, prompt)  # unconditioned: the prompt alone
    p = ids(tok, prompt)
    cut = t.input_ids(tok, "A good summary", prompt, max_prompt_tokens=3)
    assert cut == ids(tok, "Q: ") + p[-3:] + ids(tok, " A good summary:")


@pytest.mark.parametrize("style", ["tag_separator", "prefix"])
def test_prompt_format_wraps_the_prompt_text_before_tokenising(fresh_tiny, style):
    """`prompt_format` shapes the prompt's text (e.g. a dialogue's turn markers); the feedback goes before it as
    usual, and braces in the prompt are not format fields."""
    model, tok = fresh_tiny
    t = Template(style=style, prompt_format="Human: {prompt}\n\nAssistant:")
    if style == "tag_separator":
        models.add_tokens(model, tok, [t.separator_token], "eos")
    prompt = "What is {x} in 2 + {y}?"
    wrapped = ids(tok, f"Human: {prompt}\n\nAssistant:")
    assert t.input_ids(tok, None, prompt) == wrapped
    assert t.input_ids(tok, "Harmful", prompt) == t.condition_ids(tok, "Harmful") + wrapped
    assert t.input_ids(tok, None, prompt, max_prompt_tokens=4) == wrapped[-4:]  # the wrapped text is the prompt


# --------------------------------------------------------------------------- quark


def test_quark_tokens(tiny, fresh_tiny):
    _, base_tok = tiny
    model, tok = fresh_tiny
    t = Template(style="quark")
    new, init = t.new_tokens(TOXICITY_WORDS)
    assert (new, init) == (TOXICITY_WORDS, "stats")
    n_before = len(tok)
    added = models.add_tokens(model, tok, new, init)
    assert added == list(range(n_before, n_before + len(TOXICITY_WORDS)))
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == len(tok)
    # drawn from the mean/std of existing rows: distinct rows, none a copy of EOS
    assert len({tuple(emb[i].tolist()) for i in added}) == len(added)
    assert not any(torch.equal(emb[i], emb[tok.eos_token_id]) for i in added)
    for word, wid in zip(TOXICITY_WORDS, added):
        assert t.condition_ids(tok, word) == [wid]  # one id per feedback word
        assert t.input_ids(tok, word, PROMPT) == [wid] + ids(base_tok, PROMPT)


def test_quark_prompt_text_containing_a_feedback_word_stays_text(tiny, fresh_tiny):
    _, base_tok = tiny
    model, tok = fresh_tiny
    t = Template(style="quark")
    added = models.add_tokens(model, tok, *t.new_tokens(TOXICITY_WORDS))
    prompt = "He showed Maximum Toxicity today"
    got = t.input_ids(tok, "Lowest Toxicity", prompt)
    assert got == [added[0]] + ids(base_tok, prompt)
    assert t.target_ids(tok, " with Lowest Toxicity.", False) == ids(base_tok, " with Lowest Toxicity.") + [
        tok.eos_token_id
    ]


# --------------------------------------------------------------------------- no feedback, truncation


@pytest.mark.parametrize("style", ["tag_separator", "prefix", "quark"])
def test_no_feedback_is_just_the_prompt(fresh_tiny, style):
    model, tok = fresh_tiny
    t = Template(style=style)
    new, init = t.new_tokens(TOXICITY_WORDS)
    if new:
        models.add_tokens(model, tok, new, init)
    assert t.condition_ids(tok, None) == []
    assert t.input_ids(tok, None, PROMPT) == ids(tok, PROMPT)
    assert t.input_ids(tok, None, TRICKY) == ids(tok, TRICKY)


@pytest.mark.parametrize(
    "style,feedback", [("tag_separator", "Lowest Toxicity"), ("prefix", "Good"), ("quark", "<|q0|>")]
)
def test_bos_token_goes_first_with_and_without_feedback(fresh_tiny, style, feedback):
    model, tok = fresh_tiny
    t = Template(style=style, bos_token="<|endoftext|>")
    new, init = t.new_tokens(["<|q0|>", "<|q1|>"])
    if new:
        models.add_tokens(model, tok, new, init)
    bos = tok.convert_tokens_to_ids("<|endoftext|>")
    plain = Template(style=style)
    assert t.input_ids(tok, None, PROMPT) == [bos] + ids(tok, PROMPT)
    assert t.input_ids(tok, feedback, PROMPT) == [bos] + plain.input_ids(tok, feedback, PROMPT)
    # the prompt limit cuts the prompt only, never the BOS or the feedback
    assert t.input_ids(tok, feedback, PROMPT, max_prompt_tokens=2) == [bos] + plain.input_ids(tok, feedback, PROMPT, 2)
    # a checkpoint written before the option existed has no bos_token in its template record: none
    assert Template(**{k: v for k, v in t.to_dict().items() if k != "bos_token"}).input_ids(tok, None, PROMPT) == ids(
        tok, PROMPT
    )


def test_max_prompt_tokens_cuts_from_the_left(tiny):
    _, tok = tiny
    prompt = "one two three four five six seven eight nine ten eleven twelve"
    p = ids(tok, prompt)
    assert len(p) > 5
    t = Template(style="prefix")
    cond = t.condition_ids(tok, "Good.")
    assert t.input_ids(tok, "Good.", prompt, max_prompt_tokens=5) == cond + p[-5:]
    assert tok.decode(p[-5:]).strip().endswith("twelve")  # the end the model continues is kept
    assert t.input_ids(tok, None, prompt, max_prompt_tokens=5) == p[-5:]
    # the condition never counts against the limit, and a long enough limit changes nothing
    assert t.input_ids(tok, "Good.", prompt, max_prompt_tokens=len(p)) == cond + p
    assert t.input_ids(tok, "Good.", prompt, max_prompt_tokens=None) == cond + p


# --------------------------------------------------------------------------- targets and the EOS rule


def test_completion_prefix(tiny):
    _, tok = tiny
    t = Template(style="prefix", completion_prefix=" ")
    assert t.target_ids(tok, "A short summary.", truncated=False) == ids(tok, " A short summary.") + [tok.eos_token_id]
    t0 = Template(style="prefix")
    assert t0.target_ids(tok, " continues here.", truncated=False) == ids(tok, " continues here.") + [tok.eos_token_id]


@pytest.mark.parametrize(
    "completion,truncated,expected",
    [
        (" and so it goes", False, True),  # finished: EOS
        (" and that was the end.", True, True),  # cut at the limit but a sentence ended: EOS
        (" did it?", True, True),
        (' he said "stop."', True, True),  # closing quote after the full stop
        (" and then the", True, False),  # cut mid-sentence: no EOS
        (" e.g. the", True, False),
        ("", False, True),
    ],
)
def test_eos_unless_truncated(tiny, completion, truncated, expected):
    _, tok = tiny
    assert append_eos("unless_truncated", completion, truncated) is expected
    got = Template(eos_rule="unless_truncated").target_ids(tok, completion, truncated)
    assert got == ids(tok, completion) + ([tok.eos_token_id] if expected else [])


@pytest.mark.parametrize("completion,truncated", [(" and then the", True), (" the end.", False), (" the end.", True)])
def test_eos_always_and_never(tiny, completion, truncated):
    _, tok = tiny
    assert append_eos("always", completion, truncated) is True
    assert append_eos("never", completion, truncated) is False
    assert Template(eos_rule="always").target_ids(tok, completion, truncated) == ids(tok, completion) + [
        tok.eos_token_id
    ]
    assert Template(eos_rule="never").target_ids(tok, completion, truncated) == ids(tok, completion)


def test_from_config_and_roundtrip():
    from altlm.config import ALTConfig

    cfg = ALTConfig(
        template="prefix", prefix_format="{feedback}.\n\n", completion_prefix=" ", eos_rule="never", bos_token="<s>"
    )
    t = Template.from_config(cfg)
    assert (t.style, t.prefix_format, t.completion_prefix, t.eos_rule, t.bos_token) == (
        "prefix",
        "{feedback}.\n\n",
        " ",
        "never",
        "<s>",
    )
    assert Template(**t.to_dict()) == t


# --------------------------------------------------------------------------- left padding


def test_left_pad():
    ids_, attn, pos = left_pad([[5, 6, 7], [8], [9, 10]], pad_id=0)
    assert ids_.tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert attn.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    # positions count real tokens only: each row sees 0, 1, 2... as it would alone
    assert pos[attn.bool()].tolist() == [0, 1, 2, 0, 0, 1]
    assert pos.tolist()[1][2] == 0 and pos.tolist()[2][1:] == [0, 1]
    assert ids_.dtype == attn.dtype == pos.dtype == torch.long


def test_left_pad_empty_row_and_pad_id():
    ids_, attn, pos = left_pad([[], [3, 4]], pad_id=2)
    assert ids_.tolist() == [[2, 2], [3, 4]]
    assert attn.tolist() == [[0, 0], [1, 1]]
    assert pos.tolist()[1] == [0, 1]
