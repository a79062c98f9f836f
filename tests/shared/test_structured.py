"""response_format's grammars checked against the model's tokenizer, as the last stage builds them: what
llguidance validates without a tokenizer, and what only the tokenizer can refuse."""

from __future__ import annotations

import json

import pytest

from shared.types.config import ModelArch
from shared.types.errors import RequestError
from shared.types.structured import Grammars, grammar_of

pytestmark = pytest.mark.unit


def _lark(source: str) -> str:
    return json.dumps({"grammars": [{"lark_grammar": source}]})


# label: (grammar, None if usable, else a word of the error)
GRAMMARS = {
    "json_object": (grammar_of({"type": "json_object"}), None),
    "json_schema": (grammar_of({"type": "json_schema", "json_schema": {"schema": {"enum": ["a", "b"]}}}), None),
    "a special token the tokenizer lacks": (_lark('start: <|no_such_token|> "a"'), "unknown special token"),
    "a token id past the vocabulary": (_lark("start: <[99999999]>"), "Token range"),
}


@pytest.mark.parametrize("grammar,error", list(GRAMMARS.values()), ids=list(GRAMMARS))
def test_check_builds_the_matcher_and_its_first_mask(tiny_dir, grammar, error) -> None:
    arch = ModelArch.from_model_dir(tiny_dir)
    grammars = Grammars(tiny_dir / "tokenizer.json", arch.vocab_size, arch.eos_token_ids)
    if error is None:
        grammars.check(grammar)
        return
    with pytest.raises(RequestError, match=error):
        grammars.check(grammar)
