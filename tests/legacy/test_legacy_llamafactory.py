"""legacy/train_with_real_llamafactory.py: defaults, written files, migration configs, LLaMA-Factory's
own data layouts vs chatlm.data.llamafactory, and ``llamafactory-cli train`` on the written YAML.

Loss-curve parity with the main path is in tests/test_parity_llamafactory.py.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
from helpers import TINY_SHAPE, REPO, load_script, read_jsonl, run, write_pairs
import yaml

SCRIPT = os.path.join(REPO, "legacy", "train_with_real_llamafactory.py")
CONFIGS = {
    "configs/legacy/llamafactory_pt.yaml": [],
    "configs/legacy/llamafactory_sft.yaml": ["--stage", "sft"],
    "configs/legacy/llamafactory_sft_lora.yaml": ["--stage", "sft", "--finetuning_type", "lora"],
}


legacy = load_script(SCRIPT, "legacy_llamafactory_script")


def tokenizer():
    from chatlm.data.sample import sample_tokenizer_dir
    from chatlm.data.tokenizer import load_tokenizer

    return load_tokenizer(sample_tokenizer_dir())


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """Tiny HF directories (bundled tokenizer): a llama and a T5."""
    import torch

    from chatlm.model.build import build_model
    from chatlm.model.export import save_hf

    tok = tokenizer()
    out = {}
    for arch in ("llama", "t5"):
        torch.manual_seed(0)
        model = build_model(arch, len(tok), shape=TINY_SHAPE, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        out[arch] = str(save_hf(model, tok, tmp_path_factory.mktemp(arch) / "hf"))
    return out


# ----------------------------------------------------------------------------- arguments
def test_defaults_are_the_originals():
    args, extra = legacy.parse_arguments([])
    cfg, _ = legacy.llamafactory_config(args, extra)
    expected = {
        "model_name_or_path": "./model_save/ChatLM-mini-Chinese/", "finetuning_type": "full",
        "dataset": "custom_t5_dataset", "template": "default", "cutoff_len": 512,
        "preprocessing_num_workers": 4, "stage": "pt", "do_train": True, "do_eval": True,
        "output_dir": "./model_save/llamafactory_output", "per_device_train_batch_size": 16,
        "per_device_eval_batch_size": 32, "gradient_accumulation_steps": 8, "learning_rate": 1e-4,
        "num_train_epochs": 5.0, "max_steps": -1, "optim": "adafactor", "lr_scheduler_type": "cosine",
        "warmup_steps": 1024, "max_grad_norm": 1.0, "disable_gradient_checkpointing": False,
        "logging_steps": 50, "save_steps": 5000, "save_total_limit": 8, "eval_strategy": "steps",
        "eval_steps": 5000, "load_best_model_at_end": True, "metric_for_best_model": "eval_loss",
        "ddp_timeout": 1800, "dataloader_num_workers": 0, "dataloader_pin_memory": False,
        "eval_dataset": "custom_t5_dataset_eval",
    }
    assert {k: cfg[k] for k in expected} == expected
    # keys that LLaMA-Factory 0.9.5 / transformers 5 no longer accept are gone
    for gone in ("evaluation_strategy", "overwrite_output_dir", "deepspeed", "gradient_checkpointing"):
        assert gone not in cfg
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        assert cfg["bf16"] is False and cfg["use_cpu"] is (not torch.cuda.is_available())
    info = legacy.dataset_info(args)
    assert info["custom_t5_dataset"]["formatting"] == "alpaca"
    assert info["custom_t5_dataset"]["columns"] == {"prompt": "text"}  # pt reads one text column
    assert info["custom_t5_dataset_eval"]["split"] == "train"  # one parquet file has no validation split


def test_flags_aliases_and_passthrough():
    args, extra = legacy.parse_arguments([
        "--stage", "sft", "--finetuning_type", "lora", "--evaluation_strategy", "epoch",
        "--save_strategy", "epoch", "--adam_beta2", "0.95", "--neftune_noise_alpha=5", "--disable_tqdm"])
    cfg, notes = legacy.llamafactory_config(args, extra)
    assert cfg["eval_strategy"] == "epoch" and cfg["load_best_model_at_end"] is True
    assert cfg["adam_beta2"] == 0.95 and cfg["neftune_noise_alpha"] == 5 and cfg["disable_tqdm"] is True
    assert (cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_target"]) == (8, 16, "all")
    assert legacy.dataset_info(args)["custom_t5_dataset"]["columns"] == {"prompt": "prompt", "response": "response"}

    args, extra = legacy.parse_arguments(["--validation_file", ""])
    cfg, notes = legacy.llamafactory_config(args, extra)
    assert (cfg["do_eval"], cfg["eval_strategy"], cfg["load_best_model_at_end"]) == (False, "no", False)
    assert "eval_dataset" not in cfg and any("no --validation_file" in n for n in notes)
    assert "custom_t5_dataset_eval" not in legacy.dataset_info(args)

    with pytest.raises(SystemExit):
        legacy.parse_arguments(["stray"])


def test_print_lightning_config_matches_the_shipped_configs():
    for path, flags in CONFIGS.items():
        with open(os.path.join(REPO, path), encoding="utf-8") as f:
            first = f.readline()
            shipped = yaml.safe_load(first + f.read())
        assert first.strip() == f"# python -m src fit --config {path}"
        printed = legacy.lightning_config(*legacy.parse_arguments(flags))[0]
        assert shipped == printed, path
    with open(os.path.join(REPO, "configs/legacy/llamafactory_pt.yaml"), encoding="utf-8") as f:
        pt = yaml.safe_load(f)
    assert pt["data"]["packing"] is True and pt["trainer"]["gradient_clip_val"] == pytest.approx(512 / 511)


def test_print_lightning_config_cli(models):
    out = run([sys.executable, SCRIPT, "--stage", "sft", "--model_name_or_path", models["t5"],
               "--optim", "adamw_torch", "--max_steps", "7", "--print_lightning_config"]).stdout
    cfg = yaml.safe_load(out)
    assert out.startswith("# python -m src fit --config")
    assert cfg["model"]["arch"] == "t5" and cfg["data"]["format"] == "legacy"  # a T5: trained as seq2seq
    assert "decoder-only" in out and cfg["trainer"]["max_steps"] == 7 and cfg["model"]["optim"]["optimizer"] == "adamw"


# ----------------------------------------------------------------------------- written files
def test_export_only_writes_what_llamafactory_reads(tmp_path, models, capsys):
    import pyarrow.parquet as pq

    # a JSON lines file with the legacy input/target columns and a null, read by chatlm.data
    src = tmp_path / "pairs.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in [{"input": "你好", "target": "你好！"},
                                                      {"input": "2+2?", "target": None}]) + "\n", encoding="utf-8")
    common = ["--model_name_or_path", models["llama"], "--train_file", str(src), "--validation_file", str(src),
              "--export_only"]
    for stage, pt_text, column, want in [
            ("sft", "prompt_response", None, {"prompt": ["你好", "2+2?"], "response": ["你好！", ""]}),
            ("pt", "prompt_response", "text", {"text": ["你好\n你好！", "2+2?\n"]}),
            ("pt", "prompt", "text", {"text": ["你好", "2+2?"]})]:
        d = tmp_path / f"{stage}-{pt_text}"
        assert legacy.main(common + ["--stage", stage, "--pt_text", pt_text, "--dataset_dir", str(d / "data"),
                                     "--config_file", str(d / "lf.yaml"), "--output_dir", str(d / "out")]) == 0
        info = json.loads((d / "data" / "dataset_info.json").read_text(encoding="utf-8"))
        entry = info["custom_t5_dataset"]
        assert pq.read_table(d / "data" / entry["file_name"]).to_pydict() == want
        assert set(info) == {"custom_t5_dataset", "custom_t5_dataset_eval"}
        assert entry["columns"] == ({"prompt": "prompt", "response": "response"} if column is None
                                    else {"prompt": "text"})
        text = (d / "lf.yaml").read_text(encoding="utf-8")
        assert text.startswith(f"# llamafactory-cli train {d / 'lf.yaml'}")
        cfg = yaml.safe_load(text)
        assert cfg["dataset_dir"] == str(d / "data") and cfg["stage"] == stage and cfg["do_eval"] is True
        assert not (d / "out").exists()  # nothing trained
    # a text corpus is exported as is for pt
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("first document\n\nsecond one\n", encoding="utf-8")
    d = tmp_path / "txt"
    legacy.main(["--model_name_or_path", models["llama"], "--train_file", str(corpus), "--validation_file", "",
                 "--dataset_dir", str(d), "--config_file", str(d / "lf.yaml"), "--export_only"])
    assert pq.read_table(d / "custom_t5_dataset.pt.parquet").to_pydict() == {"text": ["first document", "second one"]}
    capsys.readouterr()


def test_t5_gets_a_clear_warning(tmp_path, models, capsys):
    train = write_pairs(tmp_path / "train.parquet", 8, seed=3)
    for stage, phrase in (("sft", "encoder reads prompt AND answer"), ("pt", "copy task")):
        legacy.main(["--model_name_or_path", models["t5"], "--stage", stage, "--train_file", train,
                     "--validation_file", "", "--dataset_dir", str(tmp_path / stage),
                     "--config_file", str(tmp_path / f"{stage}.yaml"), "--export_only"])
        err = capsys.readouterr().err
        assert "WARNING" in err and "decoder-only" in err and phrase in err
    legacy.main(["--model_name_or_path", models["llama"], "--stage", "sft", "--train_file", train,
                 "--validation_file", "", "--dataset_dir", str(tmp_path / "l"),
                 "--config_file", str(tmp_path / "l.yaml"), "--export_only"])
    assert "WARNING" not in capsys.readouterr().err


def test_missing_llamafactory_prints_an_install_hint(tmp_path, models, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llamafactory", None)
    train = write_pairs(tmp_path / "train.parquet", 8, seed=3)
    code = legacy.main(["--model_name_or_path", models["llama"], "--train_file", train, "--validation_file", "",
                        "--dataset_dir", str(tmp_path / "d"), "--config_file", str(tmp_path / "lf.yaml"),
                        "--output_dir", str(tmp_path / "out")])
    assert code == 1 and "pip install" in capsys.readouterr().err


# ----------------------------------------------------------------------------- chatlm layouts
def test_llamafactory_layout_and_packing_helpers():
    import torch

    from chatlm.data.collate import make_collator, prompt_ids_for_generation
    from chatlm.data.llamafactory import infer_seqlen, pack_token_ids, packing_groups

    tok = tokenizer()
    batch = make_collator("llamafactory", tok, 64)([{"prompt": "spell 7", "response": "7 is seven"}])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    enc = lambda s: tok.encode(s, add_special_tokens=False)
    source = enc("Human: spell 7") + [tok.eos_token_id] + enc("\nAssistant:")
    target = enc("7 is seven") + [tok.eos_token_id] + enc("\n")
    n = len(source) + len(target)
    assert batch["input_ids"].shape[1] % 8 == 0  # padded to a multiple of 8, as LLaMA-Factory's collator
    assert ids[:n] == source + target and set(ids[n:]) <= {tok.pad_token_id}
    assert labels[:n] == [-100] * len(source) + target and set(labels[n:]) <= {-100}
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (len(ids) - n)
    gen = prompt_ids_for_generation(tok, ["spell 7"], "llamafactory", 64)
    assert gen["input_ids"][0].tolist() == source
    # LLaMA-Factory's truncation rule
    assert infer_seqlen(10, 3, 8) == (5, 3) and infer_seqlen(3, 10, 8) == (3, 5) and infer_seqlen(10, 10, 8) == (4, 4)
    assert packing_groups(10, 1, None) == [(0, 10)]
    assert packing_groups(10, 3, 2) == [(0, 2), (2, 4), (4, 6), (6, 7), (7, 9), (9, 10)]  # shards 4, 3, 3
    assert packing_groups(11, 3, 3) == [(0, 3), (3, 4), (4, 7), (7, 8), (8, 11)]
    assert packing_groups(2, 4, None) == [(0, 1), (1, 2)]  # never more shards than rows
    assert pack_token_ids([[1, 2, 3], [4, 5], [6]], 4) == [[1, 2, 3, 4]]
    assert torch.equal(batch["labels"][:, n:], torch.full_like(batch["labels"][:, n:], -100))


def test_datamodule_packing(tmp_path):
    from chatlm.data import ChatDataModule
    from chatlm.errors import DataError

    corpus = tmp_path / "corpus.txt"
    docs = [f"document number {i} " + "x" * (i % 7) for i in range(40)]
    corpus.write_text("\n".join(docs) + "\n", encoding="utf-8")
    tok = tokenizer()
    dm = ChatDataModule(train_file=str(corpus), format="text", packing=True, max_seq_len=16, batch_size=4,
                        packing_group_rows=9, packing_shards=2, cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    blocks = [list(r["input_ids"]) for r in dm.raw_split("train")]
    want = []
    for start, stop in [(0, 9), (9, 18), (18, 20), (20, 29), (29, 38), (38, 40)]:
        flat = [t for d in docs[start:stop] for t in tok.encode(d, add_special_tokens=False) + [tok.eos_token_id]]
        want += [flat[i:i + 16] for i in range(0, len(flat) // 16 * 16, 16)]
    assert blocks == want
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 16) and bool((batch["labels"] == batch["input_ids"]).all())
    assert bool(batch["attention_mask"].all()) and list(dm.lengths("train")) == [16] * len(want)
    with pytest.raises(DataError, match="--data.packing needs --data.format text"):
        ChatDataModule(train_file=str(corpus), format="causal", packing=True)
    with pytest.raises(DataError, match="no full block"):
        ChatDataModule(train_file=str(corpus), format="text", packing=True, max_seq_len=4096,
                       cache_dir=str(tmp_path / "cache")).setup("fit")


@pytest.fixture
def quiet_llamafactory():
    """LLaMA-Factory in this process: its argument parser turns transformers' INFO logging on;
    put the verbosity back afterwards. (Not monkeypatch.setenv: ``datasets.map(num_proc>1)``
    replaces ``os.environ`` with a copy, so a monkeypatched variable would outlive the test.)"""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    yield
    hf_logging.set_verbosity(level)


@pytest.mark.llamafactory
def test_layouts_equal_llamafactorys_own_processing(tmp_path, models, quiet_llamafactory):
    """LLaMA-Factory's own tokenized datasets (sft: default template + truncation; pt: packing with
    2 preprocessing workers and batches of 7 rows) equal chatlm.data.llamafactory's, id for id."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    from chatlm.data.llamafactory import llamafactory_example, pack_text_dataset
    from chatlm.data.sample import generate_rows
    from chatlm.data.sources import load_text

    rows = generate_rows(48, 5)
    rows[3]["prompt"] = "x" * 120  # truncated by infer_seqlen
    rows[5]["response"] = "很长的回答" * 20
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "sft.parquet")
    pq.write_table(pa.table({"text": [r["prompt"] + "\n" + r["response"] for r in rows]}), tmp_path / "pt.parquet")
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "sft": {"file_name": "sft.parquet", "columns": {"prompt": "prompt", "response": "response"}},
        "pt": {"file_name": "pt.parquet", "columns": {"prompt": "text"}}}))
    tok = tokenizer()
    for stage in ("sft", "pt"):
        margs, dargs, targs, _, _ = get_train_args({
            "model_name_or_path": models["llama"], "stage": stage, "do_train": True, "finetuning_type": "full",
            "dataset": stage, "dataset_dir": str(tmp_path), "template": "default", "cutoff_len": 24,
            "output_dir": str(tmp_path / "out"), "preprocessing_num_workers": 2, "preprocessing_batch_size": 7,
            "use_cpu": True, "report_to": "none", "overwrite_cache": True})
        module = load_tokenizer(margs)
        template = get_template_and_fix_tokenizer(module["tokenizer"], dargs)
        theirs = get_dataset(template, margs, dargs, targs, stage=stage, **module)["train_dataset"]
        if stage == "sft":
            mine = [llamafactory_example(tok, r["prompt"], r["response"], 24) for r in rows]
            assert [list(x) for x in theirs["input_ids"]] == [m[0] for m in mine]
            assert [list(x) for x in theirs["labels"]] == [m[1] for m in mine]
        else:
            mine = pack_text_dataset(load_text(str(tmp_path / "pt.parquet"), cache_dir=str(tmp_path / "c")),
                                     tok, 24, shards=2, group_rows=7)
            assert [list(x) for x in theirs["input_ids"]] == [list(x) for x in mine["input_ids"]]
            assert len(mine) > 10


@pytest.mark.llamafactory
def test_llamafactory_accepts_every_written_config(tmp_path, models, quiet_llamafactory):
    """LLaMA-Factory 0.9.5 parses the YAML of every stage x method, with evaluation on (key names)."""
    from llamafactory.hparams import get_train_args

    train = write_pairs(tmp_path / "train.parquet", 8, seed=3)
    for stage in ("pt", "sft"):
        for method in ("full", "lora"):
            d = tmp_path / f"{stage}-{method}"
            legacy.main(["--model_name_or_path", models["llama"], "--stage", stage, "--finetuning_type", method,
                         "--train_file", train, "--validation_file", train, "--dataset_dir", str(d / "data"),
                         "--config_file", str(d / "lf.yaml"), "--output_dir", str(d / "out"), "--export_only"])
            cfg = yaml.safe_load((d / "lf.yaml").read_text(encoding="utf-8"))
            _, dargs, targs, fargs, _ = get_train_args(cfg)
            assert (fargs.stage, fargs.finetuning_type, dargs.template) == (stage, method, "default")
            assert str(getattr(targs.eval_strategy, "value", targs.eval_strategy)) == "steps"
            assert targs.load_best_model_at_end and targs.eval_steps == 5000 and dargs.eval_dataset
            assert targs.bf16 == cfg["bf16"] and fargs.plot_loss == cfg["plot_loss"]


@pytest.mark.llamafactory
def test_llamafactory_cli_trains_the_written_yaml(tmp_path, models):
    """`llamafactory-cli train <yaml>` on the YAML the script writes (its data exported by it)."""
    train = write_pairs(tmp_path / "train.parquet", 16, seed=3)
    yml = tmp_path / "llamafactory_config.yaml"
    run([sys.executable, SCRIPT, "--model_name_or_path", models["llama"], "--stage", "sft", "--train_file", train,
         "--validation_file", "", "--dataset_dir", str(tmp_path / "data"), "--config_file", str(yml),
         "--output_dir", str(tmp_path / "out"), "--cutoff_len", "32", "--preprocessing_num_workers", "1",
         "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--max_steps", "2",
         "--optim", "adamw_torch", "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1",
         "--export_only"])
    cli = os.path.join(os.path.dirname(sys.executable), "llamafactory-cli")
    cmd = [cli] if os.path.exists(cli) else [sys.executable, "-m", "llamafactory.cli"]
    run(cmd + ["train", str(yml)])
    assert (tmp_path / "out" / "model.safetensors").exists()
    logged = read_jsonl(tmp_path / "out" / "trainer_log.jsonl")
    assert [r["current_steps"] for r in logged if "loss" in r][-1] == 2
    assert not (tmp_path / "out" / "losses.jsonl").exists()  # only the script adds the chatlm loss log
