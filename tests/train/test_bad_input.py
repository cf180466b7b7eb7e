"""Bad-input matrix (issue 5.6): every input a user can get wrong ends the run with exit code 2
and ONE line ``chatlm: error: ...`` naming the file, column or key (no traceback unless
``CHATLM_DEBUG=1`` / ``--run.debug true``), and leaves the run directory of an earlier good
run byte-for-byte unchanged (checkpoints, hf/ export, losses.jsonl, summary.json, ...).

Each case runs ``python -m src fit`` in-process (``chatlm.train.cli.main``) against a copy of one
good run directory.
"""

from __future__ import annotations

import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from helpers import error_lines, fit_args, fit_inprocess, load_ckpt, tiny_data, tree_digest


class Evil:
    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Good data, a good finished run (with hf/ export), and every bad file of the matrix."""
    root = tmp_path_factory.mktemp("bad-input")
    data = tiny_data(root / "data")
    good_run = root / "good-run"
    code, err = fit_inprocess(*fit_args(good_run, data, "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
                                        "--run.checkpoint_every_n_steps", "2", "--run.export_hf", "true"))
    assert code == 0, err[-3000:]
    assert (good_run / "hf").is_dir() and (good_run / "summary.json").exists()
    bad = root / "bad"
    bad.mkdir()
    train = data["train"]
    raw = open(train, "rb").read()
    files = {
        "empty": bad / "empty.parquet",
        "truncated": bad / "truncated.parquet",
        "not_parquet": bad / "not_parquet.parquet",
        "csv": bad / "data.csv",
        "no_response": bad / "no_response.parquet",
        "all_null": bad / "all_null.parquet",
        "some_null": bad / "some_null.parquet",
        "bad_utf8_jsonl": bad / "bad_utf8.jsonl",
        "bad_utf8_parquet": bad / "bad_utf8.parquet",
        "long": bad / "long.parquet",
    }
    files["empty"].write_bytes(b"")
    files["truncated"].write_bytes(raw[: len(raw) // 2])
    files["not_parquet"].write_text("prompt,response\nhello,world\n")
    files["csv"].write_text("prompt,response\nhello,world\n")
    pq.write_table(pa.table({"prompt": ["a", "b"], "answer": ["c", "d"]}), files["no_response"])
    pq.write_table(pa.table({"prompt": ["a", None, "c", ""] * 3,
                             "response": pa.array([None, "", None, ""] * 3, pa.string())}), files["all_null"])
    pq.write_table(pa.table({"prompt": ["加 1 2", None, "", "spell 7"] * 4,
                             "response": ["3", "x", None, ""] * 4}), files["some_null"])
    files["bad_utf8_jsonl"].write_bytes(b'{"prompt": "ok", "response": "ok"}\n{"prompt": "\xff\xfe", "response": "x"}\n')
    pq.write_table(pa.table({"prompt": pa.array([b"ok", b"\xff\xfe bad"], pa.binary()).view(pa.string()),
                             "response": ["a", "b"]}), files["bad_utf8_parquet"])
    pq.write_table(pa.table({"prompt": ["加 " + "1 2 " * 3000] * 8, "response": ["数" * 5000] * 8}), files["long"])
    # tokenizers
    from chatlm.data.sample import sample_tokenizer_dir
    from chatlm.data.tokenizer import train_tokenizer

    for token in ("pad_token", "eos_token"):
        d = bad / f"tok_no_{token}"
        shutil.copytree(sample_tokenizer_dir(), d)
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        cfg.pop(token)
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
        files[f"tok_no_{token}"] = d
    files["tok_small"] = bad / "tok_small"
    train_tokenizer([train], 300, str(files["tok_small"]))
    # checkpoints
    good_ckpt = good_run / "checkpoints" / "last.ckpt"
    files["ckpt_truncated"] = bad / "truncated.ckpt"
    files["ckpt_truncated"].write_bytes(good_ckpt.read_bytes()[: good_ckpt.stat().st_size // 3])
    files["ckpt_garbage"] = bad / "garbage.ckpt"
    files["ckpt_garbage"].write_bytes(os.urandom(20_000))
    files["marker"] = bad / "PWNED"
    files["ckpt_evil"] = bad / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "payload": Evil(files["marker"])}, files["ckpt_evil"])
    files["bin_evil"] = bad / "evil.bin"
    torch.save({"shared.weight": torch.zeros(4, 4), "payload": Evil(files["marker"])}, files["bin_evil"],
               _use_new_zipfile_serialization=False)
    files["yaml_unknown"] = bad / "unknown.yaml"
    files["yaml_unknown"].write_text("model:\n  d_modle: 32\n")
    return {"data": data, "good_run": good_run, "good_ckpt": good_ckpt, **{k: str(v) for k, v in files.items()}}


# name -> (extra arguments, substrings the one error line must contain)
CASES = {
    "missing file": (lambda w: ["--data.train_file", w["data"]["train"] + ".missing"],
                     lambda w: [w["data"]["train"] + ".missing", "not found"]),
    "empty file": (lambda w: ["--data.train_file", w["empty"]], lambda w: [w["empty"], "empty"]),
    "truncated parquet": (lambda w: ["--data.train_file", w["truncated"]], lambda w: [w["truncated"], "parquet"]),
    "not a parquet file": (lambda w: ["--data.train_file", w["not_parquet"]], lambda w: [w["not_parquet"], "parquet"]),
    "unsupported file type": (lambda w: ["--data.train_file", w["csv"]], lambda w: [w["csv"], "unsupported"]),
    "missing column": (lambda w: ["--data.train_file", w["no_response"]],
                       lambda w: [w["no_response"], "'response'"]),
    "missing column (flag)": (lambda w: ["--data.response_column", "answer_text"],
                              lambda w: [w["data"]["train"], "'answer_text'"]),
    "null and empty strings in every row": (lambda w: ["--data.train_file", w["all_null"]],
                                            lambda w: [w["all_null"], "'response'", "every row"]),
    "invalid UTF-8 (jsonl)": (lambda w: ["--data.train_file", w["bad_utf8_jsonl"]],
                              lambda w: [w["bad_utf8_jsonl"], "UTF-8"]),
    "invalid UTF-8 (parquet)": (lambda w: ["--data.train_file", w["bad_utf8_parquet"]],
                                lambda w: [w["bad_utf8_parquet"], "'prompt'", "UTF-8"]),
    "unknown config key (flag)": (lambda w: ["--model.d_modle", "32"], lambda w: ["model.d_modle"]),
    "unknown config key (yaml)": (lambda w: ["--config", w["yaml_unknown"]], lambda w: ["d_modle"]),
    "wrong value type": (lambda w: ["--data.batch_size", "many"], lambda w: ["data.batch_size", "many"]),
    "wrong value type (choice)": (lambda w: ["--model.optimizer", "sgdd"], lambda w: ["optimizer", "sgdd"]),
    "missing tokenizer directory": (lambda w: ["--data.tokenizer", w["empty"] + ".dir"],
                                    lambda w: [w["empty"] + ".dir", "tokenizer"]),
    "tokenizer without pad token": (lambda w: ["--data.tokenizer", w["tok_no_pad_token"]],
                                    lambda w: [w["tok_no_pad_token"], "pad token"]),
    "tokenizer without eos token": (lambda w: ["--data.tokenizer", w["tok_no_eos_token"]],
                                    lambda w: [w["tok_no_eos_token"], "eos token"]),
    "checkpoint of another vocabulary": (lambda w: ["--data.tokenizer", w["tok_small"], "--ckpt_path", str(w["good_ckpt"])],
                                         lambda w: [str(w["good_ckpt"]), "vocabulary", "768"]),
    "checkpoint of another vocabulary (last)": (lambda w: ["--data.tokenizer", w["tok_small"], "--ckpt_path", "last"],
                                                lambda w: ["last.ckpt", "vocabulary"]),
    "checkpoint of another model size": (lambda w: ["--model.d_ff", "48", "--ckpt_path", "last"],
                                         lambda w: ["last.ckpt", "shape"]),
    "truncated checkpoint": (lambda w: ["--ckpt_path", w["ckpt_truncated"]],
                             lambda w: [w["ckpt_truncated"], "corrupt or truncated"]),
    "garbage checkpoint": (lambda w: ["--ckpt_path", w["ckpt_garbage"]],
                           lambda w: [w["ckpt_garbage"], "corrupt or truncated"]),
    "missing checkpoint": (lambda w: ["--ckpt_path", w["ckpt_garbage"] + ".missing"],
                           lambda w: [w["ckpt_garbage"] + ".missing", "not found"]),
    "crafted pickle checkpoint": (lambda w: ["--ckpt_path", w["ckpt_evil"]],
                                  lambda w: [w["ckpt_evil"], "refused as unsafe"]),
    "crafted pickle .bin as pretrained weights": (lambda w: ["--model.pretrained", w["bin_evil"]],
                                                  lambda w: [w["bin_evil"], "refused as unsafe"]),
    "corrupt pretrained weights": (lambda w: ["--model.pretrained", w["ckpt_garbage"].replace(".ckpt", ".bin")],
                                   lambda w: [w["ckpt_garbage"].replace(".ckpt", ".bin")]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gives_one_line_exit_2_and_overwrites_nothing(case, world, tmp_path):
    args_of, expected_of = CASES[case]
    if case == "corrupt pretrained weights":
        shutil.copy(world["ckpt_garbage"], world["ckpt_garbage"].replace(".ckpt", ".bin"))
    run = tmp_path / "run"
    shutil.copytree(world["good_run"], run)
    before = tree_digest(run)
    code, err = fit_inprocess(*fit_args(run, world["data"], "--trainer.max_steps", "8",
                                        "--trainer.val_check_interval", "2", *args_of(world)))
    lines = error_lines(err)
    assert code == 2, f"exit {code}\n{err[-3000:]}"
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err
    for part in expected_of(world):
        assert part in lines[0], (part, lines[0])
    after = tree_digest(run)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"the run directory of the good run changed: {changed}"
    assert not os.path.exists(world["marker"])  # a crafted pickle never ran


def test_debug_flag_shows_the_full_traceback(world, tmp_path, monkeypatch):
    from chatlm.train.cli import main
    from chatlm.errors import DataError

    monkeypatch.setenv("CHATLM_DEBUG", "1")
    monkeypatch.setattr("sys.argv", ["python"])
    with pytest.raises(DataError, match="not found"):
        main(fit_args(tmp_path / "run", world["data"], "--data.train_file", "/nonexistent/train.parquet"))
    monkeypatch.delenv("CHATLM_DEBUG")
    with pytest.raises(DataError, match="file is empty"):  # --run.debug true does the same
        main(fit_args(tmp_path / "run", world["data"], "--data.train_file", world["empty"], "--run.debug", "true"))


def test_some_null_and_empty_strings_train_like_the_legacy_scripts(world, tmp_path):
    """Nulls become "" and the rows are kept (legacy behaviour): the run trains, losses are finite."""
    run = tmp_path / "run"
    code, err = fit_inprocess(*fit_args(run, {"train": world["some_null"], "val": world["data"]["val"]},
                                        "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0"))
    assert code == 0, err[-3000:]
    rows = [json.loads(line) for line in open(run / "losses.jsonl")]
    assert len(rows) == 3 and all(r["loss"] == r["loss"] and r["loss"] < float("inf") for r in rows)


def test_rows_far_longer_than_max_seq_len_are_truncated_not_fatal(world, tmp_path):
    """10 000-character rows with --data.max_seq_len 32: batches stay short, the run trains."""
    from chatlm.data import ChatDataModule

    dm = ChatDataModule(train_file=world["long"], val_file=world["data"]["val"], max_seq_len=32, batch_size=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[1] <= 3 * 32 and batch["labels"].shape[1] <= 3 * 32  # bytes per char <= 3
    run = tmp_path / "run"
    code, err = fit_inprocess(*fit_args(run, {"train": world["long"], "val": world["data"]["val"]},
                                        "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0"))
    assert code == 0, err[-3000:]
    assert load_ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == 2
