"""Prompts as data, item text, and the one tokenization training and decoding share.

A prompt is an instruction, optionally a history block listing the user's last N items as
quoted titles, and a response prefix. Where the tokenizer has a chat template the
instruction and history form one user turn and the template adds the generation prompt;
otherwise an Alpaca-style plain text layout (as BIGRec uses) is produced.

The response is exactly the target item's text (`item_text`), tokenized on its own with no
special tokens, followed by eos. The decoding trie is built from the same `response_ids`,
so every sequence the model is trained to emit is a path in the trie.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from benchmark.errors import ConfigError
from benchmark.types import Catalog

IGNORE = -100  # label value that carries no loss (prompt tokens, padding)

ITEM_TEXT_STYLES = ("title", "title_year", "title_year_genres")

_PLACEHOLDER = "\u2063USER\u2063MESSAGE\u2063"  # invisible separators: never in real text


@dataclass(frozen=True)
class PromptTemplate:
    """The text around a user's history. `{history}` in `history_block` is the joined items;
    `{n}` is how many items it lists. `system` None keeps the chat template's own default."""

    instruction: str = (
        "Given the movies a user watched recently, in order, recommend the one movie the user will watch next. "
        "Answer with its title only."
    )
    history_block: str = "The user watched these {n} movies: {history}"
    response_prefix: str = ""
    system: str | None = "You are a movie recommender."
    item_quote: str = '"'
    item_separator: str = ", "
    use_chat_template: bool = True
    plain_layout: str = "### Instruction:\n{instruction}\n\n{input}### Response:\n"
    plain_preamble: str = ""  # plain layout: text before "### Instruction:" (Alpaca's task sentence)
    plain_preamble_no_input: str | None = None  # ... when the prompt has no history block (None: the same)
    response_quote: str = ""  # the response is quote + item text + quote (BIGRec writes "Title (Year)")

    def response(self, item_text: str) -> str:
        """The text the model is trained to answer with for an item."""
        return f"{self.response_quote}{item_text}{self.response_quote}"

    def strip_response(self, text: str) -> str:
        """An answer back to item text: surrounding space and quotes removed (as BIGRec/CFT's evaluation does)."""
        text = text.strip()
        if self.response_quote:
            text = text.strip(self.response_quote).strip()
        return text

    def user_message(self, history_texts: Sequence[str], with_history: bool = True) -> str:
        if not with_history:
            return self.instruction
        return f"{self.instruction}\n\n{self.history_block.format(history=self.join(history_texts), n=len(history_texts))}"

    def join(self, history_texts: Sequence[str]) -> str:
        q = self.item_quote
        return self.item_separator.join(f"{q}{t}{q}" for t in history_texts)


DEFAULT_TEMPLATE = PromptTemplate()

GENERIC_TEMPLATE = PromptTemplate(
    instruction=(
        "Given the items a user interacted with recently, in order, recommend the one item the user will "
        "interact with next. Answer with its name only."
    ),
    history_block="The user interacted with these {n} items: {history}",
    system="You are a recommender system.",
)

# BIGRec's movie prompt (SAI990323/BIGRec data/movie/process.ipynb, cell 5: instruction, the
# "input" history sentence, the quoted target) in the Alpaca layout of CFT's and BIGRec's
# train.py `generate_prompt` (itsmeyjt/CFT train.py: the preamble without input for the
# counterfactual prompt). The reference's data files are not released for CFT; it reads this format.
_ALPACA = "Below is an instruction that describes a task, paired with an input that provides further context. " \
          "Write a response that appropriately completes the request.\n\n"
_ALPACA_NO_INPUT = "Below is an instruction that describes a task. Write a response that appropriately " \
                   "completes the request.\n\n"
BIGREC_TEMPLATE = PromptTemplate(
    instruction="Given a list of movies the user has watched before, please recommend a new movie that the user "
                "likes to the user.",
    history_block="The user has watched the following movies before:{history}\n ",
    system=None,
    use_chat_template=False,
    plain_preamble=_ALPACA,
    plain_preamble_no_input=_ALPACA_NO_INPUT,
    response_quote='"',
)
BIGREC_GENERIC_TEMPLATE = dataclasses.replace(
    BIGREC_TEMPLATE,
    instruction="Given a list of items the user has interacted with before, please recommend a new item that the "
                "user likes to the user.",
    history_block="The user has interacted with the following items before:{history}\n ",
)

TEMPLATES = {"movie": DEFAULT_TEMPLATE, "generic": GENERIC_TEMPLATE, "bigrec": BIGREC_TEMPLATE,
             "bigrec_generic": BIGREC_GENERIC_TEMPLATE}


def get_template(name: str | PromptTemplate) -> PromptTemplate:
    if isinstance(name, PromptTemplate):
        return name
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ConfigError(f"unknown prompt template {name!r}; known: {', '.join(TEMPLATES)}") from None


# -- item text ------------------------------------------------------------------------------


def item_text(catalog: Catalog, item: int, style: str = "title_year") -> str:
    """THE text of an item, used by prompts, the decoding trie and grounding alike.

    styles: "title", "title_year" ("Heat (1995)"), "title_year_genres" ("Heat (1995) [Action|Crime]").
    An item without a title is named by its raw id so that its text is never empty.
    """
    if style not in ITEM_TEXT_STYLES:
        raise ConfigError(f"unknown item text style {style!r}; use one of {', '.join(ITEM_TEXT_STYLES)}")
    if not catalog.titles[item]:
        return f"Item {catalog.raw_ids[item]}"
    return catalog.text(item, with_year=style != "title", with_genres=style == "title_year_genres")


def catalog_texts(catalog: Catalog, style: str = "title_year") -> list[str]:
    """`item_text` of every catalog item, in internal-id order."""
    return [item_text(catalog, i, style) for i in range(len(catalog))]


# -- tokenization -----------------------------------------------------------------------------


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_frame(llm: Any, template: PromptTemplate) -> tuple[str, str, bool]:
    """(text before the user message, text after it, whether to add the tokenizer's special tokens).

    Rendered once per call with a placeholder message, so prompts for many users are plain
    string joins (fast) and identical to rendering each prompt through the template.
    """
    tokenizer = llm.tokenizer
    if template.use_chat_template and _has_chat_template(tokenizer):
        messages = []
        if template.system is not None:
            messages.append({"role": "system", "content": template.system})
        messages.append({"role": "user", "content": _PLACEHOLDER})
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if rendered.count(_PLACEHOLDER) != 1:
            raise ConfigError("the tokenizer's chat template does not place the user message verbatim; "
                              "set use_chat_template=False in the prompt template")
        before, after = rendered.split(_PLACEHOLDER)
        return before, after + template.response_prefix, False
    layout = template.plain_layout
    before, _, after = layout.partition("{instruction}")
    # plain layout: the user message is the instruction, the history goes in the input block
    return before, after, True


def prompt_text(llm: Any, template: PromptTemplate, history_texts: Sequence[str], with_history: bool = True) -> str:
    before, after, _ = prompt_frame(llm, template)
    return _fill(template, before, after, history_texts, with_history)


def _fill(template: PromptTemplate, before: str, after: str, history_texts: Sequence[str], with_history: bool) -> str:
    if "{input}" in after:  # plain layout
        block = ""
        preamble = template.plain_preamble
        if with_history:
            block = "### Input:\n" + template.history_block.format(
                history=template.join(history_texts), n=len(history_texts)
            ) + "\n\n"
        elif template.plain_preamble_no_input is not None:
            preamble = template.plain_preamble_no_input
        return preamble + before + template.instruction + after.replace("{input}", block) + template.response_prefix
    return before + template.user_message(history_texts, with_history) + after


def _tokenize(tokenizer: Any, texts: list[str], add_special: bool) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=add_special)["input_ids"]]


def prompt_ids_batch(
    llm: Any, template: PromptTemplate, histories: Sequence[Sequence[str]], with_history: bool = True
) -> list[list[int]]:
    """Token ids of many prompts (one fast batched tokenizer call)."""
    before, after, add_special = prompt_frame(llm, template)
    texts = [_fill(template, before, after, h, with_history) for h in histories]
    return _tokenize(llm.tokenizer, texts, add_special)


def prompt_ids(llm: Any, template: PromptTemplate, history_texts: Sequence[str], with_history: bool = True) -> list[int]:
    """Token ids of one prompt, ending where the response starts."""
    return prompt_ids_batch(llm, template, [history_texts], with_history)[0]


def response_ids(llm: Any, text: str) -> list[int]:
    """Token ids of a response (an item's text) on its own, no special tokens, no eos."""
    return list(llm.tokenizer(text, add_special_tokens=False)["input_ids"])


def response_ids_batch(llm: Any, texts: Sequence[str]) -> list[list[int]]:
    return _tokenize(llm.tokenizer, list(texts), False)


def encode_example(
    llm: Any,
    template: PromptTemplate,
    history_texts: Sequence[str],
    target_text: str | None,
    with_history: bool = True,
) -> tuple[list[int], list[int]]:
    """(input_ids, labels): prompt + response + eos; labels are IGNORE on every prompt token.

    target_text None gives the prompt alone (all labels IGNORE).
    with_history=False drops the history block (the counterfactual prompt); instruction and
    target stay.
    """
    prompt = prompt_ids(llm, template, history_texts, with_history)
    if target_text is None:
        return prompt, [IGNORE] * len(prompt)
    response = response_ids(llm, template.response(target_text)) + [llm.eos_id]
    return prompt + response, [IGNORE] * len(prompt) + response


def encode_examples(
    llm: Any,
    template: PromptTemplate,
    histories: Sequence[Sequence[str]],
    targets: Sequence[str],
    with_history: bool = True,
    chunk: int = 8192,
    train_on_inputs: bool = False,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """`encode_example` for many examples, as int32 arrays (same ids; batched tokenization in
    chunks, so a million examples take ~1 GB rather than the ~10 GB of Python int lists).

    train_on_inputs: label the prompt tokens too (BIGRec's `--train_on_inputs`); the first
    token has no predecessor and stays unlabelled."""
    if len(histories) != len(targets):
        raise ValueError(f"{len(histories)} histories but {len(targets)} targets")
    # the same target text recurs often: tokenize each distinct one once
    distinct = sorted(set(targets))
    answers = response_ids_batch(llm, [template.response(t) for t in distinct])
    table = {t: np.asarray(ids + [llm.eos_id], dtype=np.int32) for t, ids in zip(distinct, answers)}
    out = []
    for start in range(0, len(histories), chunk):
        prompts = prompt_ids_batch(llm, template, histories[start : start + chunk], with_history)
        for prompt, target in zip(prompts, targets[start : start + chunk]):
            response = table[target]
            ids = np.concatenate([np.asarray(prompt, dtype=np.int32), response])
            if train_on_inputs:
                labels = ids.copy()
                labels[0] = IGNORE
            else:
                labels = np.concatenate([np.full(len(prompt), IGNORE, dtype=np.int32), response])
            out.append((ids, labels))
    return out
