"""chatlm.data.tokenizer: special ids, "[EOS]" in text, round trips, the CLI, load errors.

    .venv/bin/python -m pytest tests/test_tokenizer.py -q
"""

from __future__ import annotations

import json
import os

import pytest
from helpers import write_parquet
from transformers import AutoTokenizer

from chatlm.data.sample import generate_rows
from chatlm.errors import DataError
from chatlm.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, main, train_tokenizer

TEXTS = ["你好，世界！", "spell 472", "472 读作 四百七十二", "  two  spaces\tand tab\n",
         "emoji 🙂 and ümlaut", "add 12 and 35", ""]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tok")
    rows = generate_rows(300, seed=1) + [{"prompt": "你好，世界！今天天气很好", "response": "我们去公园散步吧"}] * 5
    data = write_parquet(tmp / "train.parquet", rows)
    out = tmp / "tokenizer"
    tok = train_tokenizer([data], vocab_size=400, out_dir=str(out))
    return tok, str(out), data


def test_special_token_ids(trained, tiny_tokenizer):
    for tok in (trained[0], load_tokenizer(trained[1]), tiny_tokenizer):
        assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
        assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.bos_token_id) == (0, 1, 2, 3)
        assert tok.pad_token == "[PAD]" and tok.eos_token == "[EOS]"


def test_eos_text_encodes_to_one_eos_and_nothing_is_added(trained, tiny_tokenizer):
    for tok in (load_tokenizer(trained[1]), tiny_tokenizer):
        ids = tok("你好[EOS]").input_ids
        assert ids[-1] == 1 and ids.count(1) == 1
        assert ids[0] not in (0, 1, 2, 3)
        assert tok("spell 7").input_ids == tok("spell 7", add_special_tokens=False).input_ids
        # transformers may install a TemplateProcessing post-processor, but one that adds nothing
        assert tok.backend_tokenizer.encode("spell 7").ids == tok.backend_tokenizer.encode(
            "spell 7", add_special_tokens=False).ids


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(trained, tiny_tokenizer, text):
    for tok in (load_tokenizer(trained[1]), tiny_tokenizer):
        ids = tok(text + "[EOS]").input_ids
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert tok.unk_token_id not in ids  # byte-level: nothing is unknown


def test_saved_directory_loads_with_plain_auto_tokenizer(trained):
    tok, out, _ = trained
    assert sorted(os.listdir(out)) == ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    again = AutoTokenizer.from_pretrained(out)
    assert len(again) == len(tok) <= 400
    assert again("spell 472[EOS]").input_ids == tok("spell 472[EOS]").input_ids
    assert again.model_max_length == 2048 and again.padding_side == "right"
    assert not any(name.startswith(".tmp") for name in os.listdir(os.path.dirname(out)))


def test_chat_template_ends_assistant_turns_with_eos(tiny_tokenizer):
    text = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], tokenize=False)
    assert text == "<|user|>\nhi\n<|assistant|>\nyo[EOS]\n"
    prompt = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                add_generation_prompt=True)
    assert prompt == "<|user|>\nhi\n<|assistant|>\n"


def test_training_is_deterministic(trained, tmp_path):
    _, out, data = trained
    train_tokenizer([data], vocab_size=400, out_dir=str(tmp_path / "again"))
    with open(os.path.join(out, "tokenizer.json"), encoding="utf-8") as a, \
            open(tmp_path / "again" / "tokenizer.json", encoding="utf-8") as b:
        assert json.load(a) == json.load(b)


def test_cli_main_writes_a_loadable_directory(tmp_path, capsys):
    data = write_parquet(tmp_path / "d.parquet", [{"q": r["prompt"], "a": r["response"]}
                                                  for r in generate_rows(200, seed=4)])
    text = tmp_path / "more.txt"
    text.write_text("extra line one\n\nextra line two\n", encoding="utf-8")
    out = tmp_path / "cli_tok"
    main(["--train_files", data, "--vocab_size", "320", "--out_dir", str(out), "--columns", "q", "a"])
    assert str(out) in capsys.readouterr().out
    tok = load_tokenizer(str(out))
    assert tok.eos_token_id == 1 and len(tok) <= 320
    main(["--train_files", str(text), "--vocab_size", "300", "--out_dir", str(out)])  # replaces the old one
    assert len(load_tokenizer(str(out))) <= 300


def test_train_errors_are_one_line(tmp_path):
    data = write_parquet(tmp_path / "d.parquet", [{"prompt": "a", "response": "b"}])
    with pytest.raises(DataError, match=r"d\.parquet: no column 'text'; columns are \['prompt', 'response'\]"):
        train_tokenizer([data], 400, str(tmp_path / "t"), columns=("text",))
    with pytest.raises(DataError, match="missing.parquet: file not found"):
        train_tokenizer([str(tmp_path / "missing.parquet")], 400, str(tmp_path / "t"))
    with pytest.raises(DataError, match="--vocab_size must be >= 300"):
        train_tokenizer([data], 100, str(tmp_path / "t"))
    assert not (tmp_path / "t").exists()


def test_load_tokenizer_errors(tmp_path, trained):
    with pytest.raises(DataError, match=r"nowhere: tokenizer directory not found"):
        load_tokenizer(str(tmp_path / "nowhere"))
    tok = AutoTokenizer.from_pretrained(trained[1])
    tok.pad_token = None
    tok.save_pretrained(str(tmp_path / "no_pad"))
    with pytest.raises(DataError, match=r"no_pad: tokenizer has no pad token"):
        load_tokenizer(str(tmp_path / "no_pad"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: cannot load tokenizer"):
        load_tokenizer(str(tmp_path / "empty"))
