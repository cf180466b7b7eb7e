"""chatlm.data: sources, legacy-exact formatting and collators, batch order, resume, DataModule.

    .venv/bin/python -m pytest tests/test_data.py -q
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch
from helpers import write_parquet

from chatlm.data import (
    CausalCollator,
    ChatDataModule,
    DataError,
    ResumableDataLoader,
    Seq2SeqCollator,
    ShardedBatchSampler,
    TextCollator,
    epoch_batches,
    legacy_texts,
    load_prompt_response,
    load_text,
    prompt_ids_for_generation,
)
from chatlm.data.formatting import EOS_TEXT, PLAIN_SEPARATOR
from chatlm.data.sample import generate_rows, sample_file, spell_chinese, spell_english


# ============================================================================ formatting
def test_legacy_texts_truncate_by_characters_then_append_eos():
    assert EOS_TEXT == "[EOS]"
    assert legacy_texts("abcdefghij", "xyz", 8) == ("abc[EOS]", "xyz[EOS]")
    assert legacy_texts("你好世界，今天天气很好", "好的", 10) == ("你好世界，[EOS]", "好的[EOS]")
    assert legacy_texts("", "", 256) == ("[EOS]", "[EOS]")


def _legacy_collate_reference(tokenizer, rows, max_seq_len):
    """train_low_mem.py's dataset + collate, as legacy-spec.md describes it."""
    prompts = [r["prompt"][0 : max_seq_len - 5] + "[EOS]" for r in rows]
    responses = [r["response"][0 : max_seq_len - 5] + "[EOS]" for r in rows]
    p = tokenizer(prompts, padding=True, return_token_type_ids=False)
    r = tokenizer(responses, padding=True, return_token_type_ids=False)
    input_ids = torch.LongTensor(p.input_ids)
    input_mask = torch.LongTensor(p.attention_mask)
    target_ids = torch.LongTensor(r.input_ids)
    target_ids[target_ids == tokenizer.pad_token_id] = -100
    return input_ids, input_mask, target_ids


def test_seq2seq_collator_hand_computed(tiny_tokenizer):
    tok = tiny_tokenizer
    rows = [{"prompt": "spell 7", "response": "7 is seven"},
            {"prompt": "add 3 and 5 and more", "response": "3 + 5 = 8"}]
    batch = Seq2SeqCollator(tok, max_seq_len=12)(rows)
    # max_seq_len 12 keeps 7 characters, then "[EOS]" (id 1); pads are 0 / -100.
    p0 = tok("spell 7", add_special_tokens=False).input_ids + [1]
    p1 = tok("add 3 a", add_special_tokens=False).input_ids + [1]
    r0 = tok("7 is se", add_special_tokens=False).input_ids + [1]
    r1 = tok("3 + 5 =", add_special_tokens=False).input_ids + [1]
    width, rwidth = max(len(p0), len(p1)), max(len(r0), len(r1))
    assert batch["input_ids"].tolist() == [p0 + [0] * (width - len(p0)), p1 + [0] * (width - len(p1))]
    assert batch["attention_mask"].tolist() == [[1] * len(p0) + [0] * (width - len(p0)),
                                                [1] * len(p1) + [0] * (width - len(p1))]
    assert batch["labels"].tolist() == [r0 + [-100] * (rwidth - len(r0)), r1 + [-100] * (rwidth - len(r1))]
    assert all(t.dtype == torch.int64 for t in batch.values())
    assert set(batch) == {"input_ids", "attention_mask", "labels"}


def test_seq2seq_collator_equals_legacy_reference(tiny_tokenizer):
    rows = generate_rows(16, seed=5) + [{"prompt": "你好" * 200, "response": "好的" * 300}]
    for max_seq_len in (16, 64, 512):
        batch = Seq2SeqCollator(tiny_tokenizer, max_seq_len)(rows)
        input_ids, input_mask, target_ids = _legacy_collate_reference(tiny_tokenizer, rows, max_seq_len)
        assert torch.equal(batch["input_ids"], input_ids)
        assert torch.equal(batch["attention_mask"], input_mask)
        assert torch.equal(batch["labels"], target_ids)


def test_causal_collator_masks_prompt_and_pads(tiny_tokenizer):
    tok = tiny_tokenizer
    rows = [{"prompt": "spell 7", "response": "7 is seven"}, {"prompt": "add 3 and 5", "response": "3 + 5 = 8"}]
    batch = CausalCollator(tok, max_seq_len=64)(rows)
    for i, row in enumerate(rows):
        prompt = tok(row["prompt"] + PLAIN_SEPARATOR, add_special_tokens=False).input_ids
        answer = tok(row["response"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        n = len(prompt) + len(answer)
        ids = batch["input_ids"][i].tolist()
        labels = batch["labels"][i].tolist()
        assert ids[:n] == prompt + answer
        assert ids[n:] == [tok.pad_token_id] * (len(ids) - n)
        assert labels == [-100] * len(prompt) + answer + [-100] * (len(ids) - n)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (len(ids) - n)
    unmasked = CausalCollator(tok, max_seq_len=64, mask_prompt=False)(rows)
    real = unmasked["attention_mask"].bool()
    assert torch.equal(unmasked["labels"][real], unmasked["input_ids"][real])


def test_causal_collator_truncates_keeping_the_beginning(tiny_tokenizer):
    row = {"prompt": "spell 123", "response": "123 is one hundred twenty-three"}
    full = CausalCollator(tiny_tokenizer, max_seq_len=512)([row])["input_ids"][0].tolist()
    cut = CausalCollator(tiny_tokenizer, max_seq_len=8)([row])
    assert cut["input_ids"][0].tolist() == full[:8]
    assert cut["input_ids"].shape == (1, 8)


def test_chat_template_collator_matches_rendered_conversation(tiny_tokenizer):
    tok = tiny_tokenizer
    row = {"prompt": "translate 猫", "response": "猫 means cat"}
    batch = CausalCollator(tok, max_seq_len=128, template="chat_template")([row])
    prompt = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True,
                                     tokenize=True, return_dict=True)["input_ids"]
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert ids[: len(prompt)] == prompt
    assert labels[: len(prompt)] == [-100] * len(prompt)
    assert ids[-1] == tok.eos_token_id
    rendered = tok.apply_chat_template([{"role": "user", "content": row["prompt"]},
                                        {"role": "assistant", "content": row["response"]}], tokenize=False)
    assert tok.decode(ids) == rendered.rstrip("\n")


def test_text_collator(tiny_tokenizer):
    tok = tiny_tokenizer
    batch = TextCollator(tok, max_seq_len=6)([{"text": "spell 7"}, {"text": "one hundred twenty-three"}])
    short = tok("spell 7", add_special_tokens=False).input_ids + [1]
    assert len(short) < 6
    assert batch["input_ids"][0].tolist() == short + [0] * (6 - len(short))
    assert batch["labels"][0].tolist() == short + [-100] * (6 - len(short))
    long = (tok("one hundred twenty-three", add_special_tokens=False).input_ids + [1])[:6]
    assert batch["input_ids"][1].tolist() == long and batch["labels"][1].tolist() == long


def test_prompt_ids_for_generation(tiny_tokenizer):
    tok = tiny_tokenizer
    rows = [{"prompt": "spell 7", "response": "x"}, {"prompt": "add 3 and 5", "response": "y"}]
    legacy = prompt_ids_for_generation(tok, [r["prompt"] for r in rows], "legacy", 12)
    train = Seq2SeqCollator(tok, 12)(rows)
    assert torch.equal(legacy["input_ids"], train["input_ids"])
    assert torch.equal(legacy["attention_mask"], train["attention_mask"])
    for fmt, template in (("causal", "plain"), ("chat_template", "chat_template")):
        gen = prompt_ids_for_generation(tok, [r["prompt"] for r in rows], fmt, 64)
        batch = CausalCollator(tok, 64, template=template)(rows)
        for i in range(len(rows)):
            n_prompt = int((batch["labels"][i] == -100).logical_and(batch["attention_mask"][i] == 1).sum())
            mask = gen["attention_mask"][i].bool()
            assert gen["input_ids"][i][mask].tolist() == batch["input_ids"][i][:n_prompt].tolist()
            assert mask[-1]  # left padding: every prompt ends at the last position
            assert not mask[: int((~mask).sum())].any()


# ============================================================================ sources
def test_parquet_is_memory_mapped(sample_parquet, sample_rows, data_cache_dir):
    ds = load_prompt_response(sample_parquet(), cache_dir=data_cache_dir)
    assert ds.column_names == ["prompt", "response"]
    assert len(ds) == len(sample_rows)
    assert ds[3] == sample_rows[3]
    assert ds.cache_files and ds.cache_files[0]["filename"].startswith(data_cache_dir)


def test_arrow_cache_is_reused_and_refreshed(tmp_path, sample_rows, data_cache_dir):
    path = write_parquet(tmp_path / "d.parquet", sample_rows)
    first = load_prompt_response(path, cache_dir=data_cache_dir).cache_files[0]["filename"]
    again = load_prompt_response(path, cache_dir=data_cache_dir).cache_files[0]["filename"]
    assert first == again
    write_parquet(path, sample_rows[:5])
    os.utime(path, ns=(1, 1))  # make sure the mtime changes
    fresh = load_prompt_response(path, cache_dir=data_cache_dir)
    assert len(fresh) == 5 and fresh.cache_files[0]["filename"] != first


def test_jsonl_and_json_array(tmp_path, data_cache_dir):
    rows = [{"prompt": "a", "response": "b", "extra": 1}, {"prompt": "c", "response": 7}]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", encoding="utf-8")
    ds = load_prompt_response(str(jsonl), cache_dir=data_cache_dir)
    assert ds.to_list() == [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "7"}]
    array = tmp_path / "d.json"
    array.write_text(json.dumps(rows), encoding="utf-8")
    assert load_prompt_response(str(array), cache_dir=data_cache_dir).to_list() == ds.to_list()


def test_nulls_become_empty_strings(tmp_path, data_cache_dir):
    schema = pa.schema([("prompt", pa.string()), ("response", pa.string())])
    path = write_parquet(tmp_path / "n.parquet", [{"prompt": None, "response": "r"}, {"prompt": "p", "response": None}],
                         schema=schema)
    assert load_prompt_response(path, cache_dir=data_cache_dir).to_list() == [
        {"prompt": "", "response": "r"}, {"prompt": "p", "response": ""}]


def test_custom_columns_and_input_target_fallback(tmp_path, data_cache_dir):
    path = write_parquet(tmp_path / "q.parquet", [{"question": "q1", "answer": "a1"}])
    ds = load_prompt_response(path, "question", "answer", cache_dir=data_cache_dir)
    assert ds.to_list() == [{"prompt": "q1", "response": "a1"}]
    legacy = write_parquet(tmp_path / "legacy.parquet", [{"input": "i1", "target": "t1"}])
    assert load_prompt_response(legacy, cache_dir=data_cache_dir).to_list() == [{"prompt": "i1", "response": "t1"}]


def test_dataset_info_entry(tmp_path, data_cache_dir):
    write_parquet(tmp_path / "alpaca.parquet", [{"instruction": "translate", "input": "猫", "output": "cat"},
                                               {"instruction": "say hi", "input": "", "output": "hi"}])
    write_parquet(tmp_path / "legacy.parquet", [{"prompt": "p", "response": "r"}])
    info = {
        "alpaca_ds": {"file_name": "alpaca.parquet", "formatting": "alpaca",
                      "columns": {"prompt": "instruction", "query": "input", "response": "output"}},
        # The legacy script maps prompt -> input, response -> target, but its files have
        # prompt/response columns: the input/target <-> prompt/response fallback handles it.
        "custom_t5_dataset": {"file_name": "legacy.parquet", "formatting": "alpaca",
                              "columns": {"prompt": "input", "response": "target"}, "split": "train"},
    }
    (tmp_path / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    ds = load_prompt_response(f"{tmp_path}/dataset_info.json#alpaca_ds", cache_dir=data_cache_dir)
    assert ds.to_list() == [{"prompt": "translate\n猫", "response": "cat"}, {"prompt": "say hi", "response": "hi"}]
    ds = load_prompt_response(f"{tmp_path}/dataset_info.json#custom_t5_dataset", cache_dir=data_cache_dir)
    assert ds.to_list() == [{"prompt": "p", "response": "r"}]
    with pytest.raises(DataError, match=r"dataset_info\.json: no dataset 'nope'; datasets are \['alpaca_ds', "):
        load_prompt_response(f"{tmp_path}/dataset_info.json#nope", cache_dir=data_cache_dir)


def test_load_text(tmp_path, data_cache_dir):
    txt = tmp_path / "corpus.txt"
    txt.write_text("first doc\n\n   \nsecond 文档\n", encoding="utf-8")
    assert load_text(str(txt), cache_dir=data_cache_dir)["text"] == ["first doc", "second 文档"]
    assert load_text(str(txt), "ignored", cache_dir=data_cache_dir)["text"] == ["first doc", "second 文档"]
    with pytest.raises(DataError, match=r"corpus\.txt: a \.txt file has no prompt/response columns"):
        load_prompt_response(str(txt), cache_dir=data_cache_dir)
    path = write_parquet(tmp_path / "t.parquet", [{"body": "x y"}])
    assert load_text(path, "body", cache_dir=data_cache_dir).to_list() == [{"text": "x y"}]
    with pytest.raises(DataError, match=r"t\.parquet: no column 'text'; columns are \['body'\]"):
        load_text(path, cache_dir=data_cache_dir)


def _error(call) -> str:
    with pytest.raises(DataError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_source_errors_name_the_file_and_column(tmp_path, sample_rows, data_cache_dir):
    good = write_parquet(tmp_path / "good.parquet", sample_rows)
    load = lambda p, **kw: load_prompt_response(str(p), cache_dir=data_cache_dir, **kw)

    missing = tmp_path / "missing.parquet"
    assert _error(lambda: load(missing)) == f"{missing}: file not found"

    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    assert _error(lambda: load(empty)) == f"{empty}: file is empty"

    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"this is not parquet at all" * 10)
    assert _error(lambda: load(garbage)).startswith(f"{garbage}: not a readable parquet file")

    truncated = tmp_path / "truncated.parquet"
    data = Path(good).read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    assert _error(lambda: load(truncated)).startswith(f"{truncated}: ")

    no_rows = write_parquet(tmp_path / "no_rows.parquet", [],
                            schema=pa.schema([("prompt", pa.string()), ("response", pa.string())]))
    assert _error(lambda: load(no_rows)) == f"{no_rows}: no rows"

    message = _error(lambda: load(good, response_column="answer"))
    assert message == f"{good}: no column 'answer'; columns are ['prompt', 'response']"

    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "a", "response": "b"}\n{oops\n', encoding="utf-8")
    assert _error(lambda: load(bad_json)).startswith(f"{bad_json}: line 2 is not valid JSON")

    nested = write_parquet(tmp_path / "nested.parquet", [{"prompt": [1, 2], "response": "r"}])
    assert "column 'prompt' has type" in _error(lambda: load(nested))

    unknown = tmp_path / "data.csv"
    unknown.write_text("prompt,response\na,b\n")
    assert _error(lambda: load(unknown)).startswith(f"{unknown}: unsupported file type")


# ============================================================================ batch order
def test_epoch_batches_is_a_pure_function_of_seed_and_epoch():
    a = epoch_batches(103, 8, seed=1, epoch=0)
    assert a == epoch_batches(103, 8, seed=1, epoch=0)
    assert a != epoch_batches(103, 8, seed=1, epoch=1)
    assert a != epoch_batches(103, 8, seed=2, epoch=0)
    for batches in (a, epoch_batches(103, 8, seed=1, epoch=5)):
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(103))
        assert [len(b) for b in batches] == [8] * 12 + [7]


def test_epoch_batches_unshuffled_and_drop_last():
    assert epoch_batches(7, 3, seed=0, epoch=4, shuffle=False) == [[0, 1, 2], [3, 4, 5], [6]]
    assert epoch_batches(7, 3, seed=0, epoch=4, shuffle=False, drop_last=True) == [[0, 1, 2], [3, 4, 5]]
    assert epoch_batches(0, 3, seed=0, epoch=0) == []


def _padding(batches, lengths):
    return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)


def test_group_by_length_cuts_padding_and_puts_the_heaviest_batch_first():
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.lognormal(3.5, 1.0, 5000).astype(int) + 1, 2000)  # long tail
    plain = epoch_batches(5000, 16, seed=3, epoch=0)
    grouped = epoch_batches(5000, 16, seed=3, epoch=0, lengths=lengths, group_by_length=True)
    assert sorted(i for b in grouped for i in b) == list(range(5000))
    assert _padding(grouped, lengths) < 0.2 * _padding(plain, lengths)
    weight = [len(b) * max(lengths[i] for i in b) for b in grouped]
    assert weight[0] == max(weight)
    again = epoch_batches(5000, 16, seed=3, epoch=0, lengths=lengths, group_by_length=True)
    assert grouped == again
    assert grouped != epoch_batches(5000, 16, seed=3, epoch=1, lengths=lengths, group_by_length=True)


@pytest.mark.parametrize("n", [64, 70, 65, 3])
@pytest.mark.parametrize("group_by_length", [False, True])
def test_two_ranks_at_b_see_what_one_rank_sees_at_2b(n, group_by_length):
    lengths = (np.arange(n) * 7919) % 101
    kw = {"seed": 11, "lengths": lengths, "group_by_length": group_by_length}
    one = ShardedBatchSampler(n, 8, **kw)
    ranks = [ShardedBatchSampler(n, 4, num_replicas=2, rank=r, **kw) for r in range(2)]
    for epoch in (0, 1):
        for s in [one, *ranks]:
            s.set_epoch(epoch)
        single = list(one)
        per_rank = [list(s) for s in ranks]
        assert len(per_rank[0]) == len(per_rank[1]) == len(ranks[0]) == len(ranks[1])
        assert all(len(b) > 0 for r in per_rank for b in r)
        joined = [a + b for a, b in zip(*per_rank)]
        # identical global batches, except that a last batch too short to split is dropped
        assert joined == [b for b in single if len(b) >= 2]
    assert len(one) == len(list(one))


def test_sampler_state_dict_resumes_mid_epoch():
    full = ShardedBatchSampler(50, 4, seed=7)
    full.set_epoch(2)
    expected = list(full)
    first = ShardedBatchSampler(50, 4, seed=7)
    first.set_epoch(2)
    it = iter(first)
    head = [next(it) for _ in range(5)]
    state = first.state_dict()
    assert state == {"epoch": 2, "batches_done": 5}
    resumed = ShardedBatchSampler(50, 4, seed=7)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)
    assert head + list(resumed) == expected
    resumed.set_epoch(3)
    assert len(list(resumed)) == len(expected)  # later epochs start from 0


def _identity(batch):
    return batch


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumable_dataloader_resumes_exactly(num_workers):
    def make():
        return ResumableDataLoader(list(range(61)), batch_sampler=ShardedBatchSampler(61, 4, seed=5),
                                   collate_fn=_identity, num_workers=num_workers)

    reference = make()
    reference.batch_sampler.set_epoch(1)
    epoch1 = list(reference)
    reference.batch_sampler.set_epoch(2)
    epoch2 = list(reference)

    loader = make()
    loader.batch_sampler.set_epoch(1)
    it = iter(loader)
    head = [next(it) for _ in range(6)]  # workers have prefetched more than that
    state = loader.state_dict()
    assert state == {"epoch": 1, "batches_done": 6}
    del it

    restored = make()
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    it = iter(restored)  # Lightning creates the iterator before calling set_epoch
    restored.batch_sampler.set_epoch(1)
    assert head + list(it) == epoch1
    assert restored.state_dict() == {"epoch": 1, "batches_done": len(epoch1)}
    restored.batch_sampler.set_epoch(2)
    assert restored.state_dict() == {"epoch": 2, "batches_done": 0}
    assert list(restored) == epoch2


# ============================================================================ DataModule
def test_datamodule_defaults_to_the_bundled_sample(tiny_tokenizer, data_cache_dir):
    dm = ChatDataModule(cache_dir=data_cache_dir)
    assert dm.train_file == sample_file("train") and dm.val_file == sample_file("val")
    assert dm.vocab_size == len(tiny_tokenizer) and dm.pad_token_id == 0 and dm.eos_token_id == 1
    assert dm.is_seq2seq_format and dm.has_validation
    assert dm.eval_batch_size == 16
    dm.setup("fit")
    assert len(dm.raw_split("train")) == 6000 and len(dm.raw_split("val")) == 200
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8 and batch["labels"].dtype == torch.int64
    val = list(dm.val_dataloader())
    assert [len(b["input_ids"]) for b in val] == [16] * 12 + [8]


def test_datamodule_reports_every_bad_argument_at_once(tmp_path):
    with pytest.raises(DataError) as info:
        ChatDataModule(train_file=str(tmp_path / "nope.parquet"), tokenizer=str(tmp_path / "no_tok"),
                       batch_size=0, max_seq_len=4, eval_batch_size=0, num_workers=-1, val_max_samples=0)
    message = str(info.value)
    for flag in ("train_file", "tokenizer", "batch_size", "max_seq_len", "eval_batch_size", "num_workers",
                 "val_max_samples"):
        assert f"--data.{flag}" in message
    assert "\n" not in message


def test_datamodule_user_files_validation_and_sharding(tmp_path, data_cache_dir):
    train = write_parquet(tmp_path / "train.parquet", generate_rows(37, seed=9))
    val = write_parquet(tmp_path / "val.parquet", generate_rows(30, seed=10))
    dm = ChatDataModule(train_file=train, cache_dir=data_cache_dir, batch_size=4)
    assert not dm.has_validation and dm.val_dataloader() == []
    dm = ChatDataModule(train_file=train, val_file=val, val_max_samples=10, cache_dir=data_cache_dir,
                        batch_size=4, format="causal")
    dm.setup("fit")
    assert len(dm.raw_split("val")) == 10 and dm.raw_split("validate")[0] == generate_rows(30, seed=10)[0]
    assert not dm.is_seq2seq_format

    single = ChatDataModule(train_file=train, cache_dir=data_cache_dir, batch_size=8).train_dataloader()
    shards = []
    for rank in range(2):
        dm = ChatDataModule(train_file=train, cache_dir=data_cache_dir, batch_size=4)
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        shards.append(dm.train_dataloader())
    assert len(shards[0]) == len(shards[1]) == len(single) == 5
    for whole, a, b in zip(single.batch_sampler, shards[0].batch_sampler, shards[1].batch_sampler):
        assert whole == a + b


def test_datamodule_group_by_length_and_text_format(tmp_path, data_cache_dir):
    rows = [{"prompt": "p" * (i % 50 + 1), "response": "回" * (i % 7)} for i in range(200)]
    dm = ChatDataModule(train_file=write_parquet(tmp_path / "t.parquet", rows), cache_dir=data_cache_dir,
                        batch_size=4, group_by_length=True)
    lengths = dm.lengths("train")  # seq2seq: the longer side, in UTF-8 bytes
    assert lengths.tolist() == [max(len(r["prompt"]), 3 * len(r["response"])) for r in rows]
    causal = ChatDataModule(train_file=write_parquet(tmp_path / "t.parquet", rows), cache_dir=data_cache_dir,
                            format="causal", batch_size=4, group_by_length=True)
    assert causal.lengths("train").tolist() == [len(r["prompt"]) + 3 * len(r["response"]) for r in rows]
    cut = ChatDataModule(train_file=write_parquet(tmp_path / "t.parquet", rows), cache_dir=data_cache_dir,
                         max_seq_len=20, batch_size=4, group_by_length=True)
    assert cut.lengths("train").max() == 20  # cut as the legacy collator cuts the texts
    loader = dm.train_dataloader()
    assert sorted(i for b in loader.batch_sampler for i in b) == list(range(200))

    txt = tmp_path / "c.txt"
    txt.write_text("one two\nthree four five\n", encoding="utf-8")
    dm = ChatDataModule(train_file=str(txt), format="text", cache_dir=data_cache_dir, batch_size=2)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    with pytest.raises(DataError, match="--data.train_file is required with --data.format text"):
        ChatDataModule(format="text")


def test_sample_task_is_regular():
    rows = generate_rows(400, seed=0)
    assert rows == generate_rows(400, seed=0)
    assert all(len(r["prompt"]) < 40 and 6 <= len(r["response"]) < 40 for r in rows)
    assert spell_english(472) == "four hundred seventy-two" and spell_english(15) == "fifteen"
    assert spell_chinese(472) == "四百七十二" and spell_chinese(105) == "一百零五" and spell_chinese(12) == "十二"
    assert spell_chinese(0) == "零" and spell_chinese(110) == "一百一十"


# ============================================================================ Lightning resume
class _Recorder:
    """A LightningModule factory that records the rows of every training batch."""

    @staticmethod
    def make():
        import lightning as L

        class Module(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.weight = torch.nn.Parameter(torch.zeros(1))
                self.seen: list[list[tuple[int, ...]]] = []

            def training_step(self, batch, batch_idx):
                self.seen.append([tuple(row) for row in batch["input_ids"].tolist()])
                return (self.weight * batch["input_ids"].float().mean()) ** 2

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.0)

        return Module()


def _fit(tmp_path, dm, ckpt_path=None, callbacks=()):
    import lightning as L

    module = _Recorder.make()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        default_root_dir=str(tmp_path), callbacks=list(callbacks))
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module.seen


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_checkpoint_resumes_the_batch_order(tmp_path, data_cache_dir):
    from lightning.pytorch.callbacks import ModelCheckpoint

    rows = [{"prompt": f"row {i}", "response": "r"} for i in range(40)]  # distinct input_ids per row
    train = write_parquet(tmp_path / "rows.parquet", rows)

    def dm():
        return ChatDataModule(train_file=train, cache_dir=data_cache_dir, batch_size=4, seed=3)

    ckpt_dir = tmp_path / "ckpt"
    steps = ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=3, save_top_k=-1)
    epochs = ModelCheckpoint(dirpath=ckpt_dir, filename="end-{epoch}", every_n_epochs=1, save_top_k=-1,
                             save_on_train_epoch_end=True)
    full = _fit(tmp_path / "a", dm(), callbacks=[steps, epochs])
    assert len(full) == 20 and full[:10] != full[10:]
    assert len({row for batch in full[:10] for row in batch}) == 40

    for name, done in (("step=3.ckpt", 3), ("step=12.ckpt", 12), ("end-epoch=0.ckpt", 10)):
        resumed = _fit(tmp_path / name, dm(), ckpt_path=str(ckpt_dir / name))
        assert resumed == full[done:], name
