"""The gateway's tokenizer/chat template against transformers, and incremental detokenization."""

from __future__ import annotations

import pytest

from gateway.codec import TemplateError, TextCodec
from gateway.textstream import TextAssembler

pytestmark = pytest.mark.unit

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "  and times three?\n"}],
    [{"role": "user", "content": "Ünïcödé → 漢字 😀 \"quotes\" <tags> {{ braces }}"}],
]
TEXTS = ["Hello world", "  leading spaces\nand\ttabs", "naïve café 😀 漢字", "<|im_start|>user"]


@pytest.fixture(scope="module", params=["tiny-random", "smollm2-135m"])
def model_dir(request, tiny_dir, smollm2_dir):
    return tiny_dir if request.param == "tiny-random" else smollm2_dir


def test_chat_ids_equal_transformers_apply_chat_template(model_dir) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    codec = TextCodec(model_dir)
    for messages in CONVERSATIONS:
        expected = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
        assert codec.encode_chat(messages) == list(expected), messages


def test_plain_prompt_ids_equal_transformers(model_dir) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    codec = TextCodec(model_dir)
    for text in TEXTS:
        assert codec.encode(text) == hf(text)["input_ids"], text


def test_eos_ids_and_decode_strips_eos(tiny_dir) -> None:
    codec = TextCodec(tiny_dir)
    assert codec.eos_ids == (2,)
    ids = codec.encode("Hello world")
    assert codec.decode(ids + [2]) == codec.decode(ids) == "Hello world"


def test_template_errors_are_template_errors(tmp_path, tiny_dir) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"):
        (tmp_path / name).write_bytes((tiny_dir / name).read_bytes())
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(TemplateError, match="roles must alternate"):
        TextCodec(tmp_path).encode_chat([{"role": "user", "content": "x"}])


def _feed(codec: TextCodec, ids: list[int], stops=(), group: int = 1) -> tuple[list[str], TextAssembler]:
    asm = TextAssembler(codec, stops)
    deltas = []
    for i in range(0, len(ids), group):
        chunk = ids[i:i + group]
        deltas.append(asm.add(chunk, final=i + group >= len(ids)))
    return deltas, asm


@pytest.mark.parametrize("group", [1, 3])
def test_incremental_text_concatenates_to_the_full_decode(tiny_dir, group) -> None:
    codec = TextCodec(tiny_dir)
    ids = codec.encode("naïve café 😀 漢字 end") + [2]
    deltas, asm = _feed(codec, ids, group=group)
    assert "".join(deltas) == codec.decode(ids) == asm.text
    assert all("\ufffd" not in d for d in deltas)  # partial UTF-8 is held back, never sent
    assert not asm.stopped


def test_stop_string_cuts_the_output_and_holds_back_prefixes(tiny_dir) -> None:
    codec = TextCodec(tiny_dir)
    ids = codec.encode("one two three four five")
    deltas, asm = _feed(codec, ids, stops=("four", "zzz"))
    assert "".join(deltas) == asm.text == "one two three "
    assert asm.stopped
    assert asm.add(codec.encode(" more"), final=True) == ""  # nothing after a stop


def test_stop_prefix_released_when_it_does_not_complete(tiny_dir) -> None:
    codec = TextCodec(tiny_dir)
    asm = TextAssembler(codec, ("STOP",))
    first = asm.add(codec.encode("go ST"), final=False)
    assert first == "go "  # "ST" may start "STOP"
    rest = asm.add(codec.encode("ART"), final=True)
    assert first + rest == codec.decode(codec.encode("go ST") + codec.encode("ART")) and not asm.stopped
