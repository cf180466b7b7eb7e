"""Every shipped YAML parses, and every one that runs on CPU trains a few steps."""

import glob
import os

import pytest

from helpers import TINY_SHAPE, CPU, REPO, read_jsonl, run_cli

CONFIGS = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))
GPU_ONLY = {"configs/fsdp.yaml", "configs/deepspeed.yaml"}  # checked on a GPU machine (docs/distributed.md)


def _section(config, name):
    import yaml

    with open(os.path.join(REPO, config), encoding="utf-8") as f:
        return (yaml.safe_load(f) or {}).get(name) or {}


def _model_section(config):
    return _section(config, "model")


NEEDS_PRETRAINED = {c: _model_section(c).get("arch", "t5") for c in CONFIGS if _model_section(c).get("pretrained")}


def test_configs_exist():
    names = {os.path.basename(c) for c in CONFIGS}
    for required in ("demo.yaml", "pretrain_t5.yaml", "sft_t5.yaml", "pretrain_causal.yaml",
                     "sft_causal_lora.yaml", "lowmem.yaml", "fsdp.yaml", "deepspeed.yaml"):
        assert required in names


@pytest.mark.parametrize("config", CONFIGS)
def test_config_starts_with_its_command_and_parses(config):
    first = open(os.path.join(REPO, config), encoding="utf-8").readline()
    assert first.startswith("# ") and "python" in first and os.path.basename(config) in first, first
    if config in NEEDS_PRETRAINED:
        return  # parsed in the run test below, with a pretrained model to point at
    out = run_cli("fit", "--config", config, "--print_config").stdout
    assert "model:" in out and "data:" in out and "trainer:" in out


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Tiny HF exports (bundled tokenizer) for the configs that fine-tune one."""
    from chatlm.data.sample import sample_tokenizer_dir
    from chatlm.model.build import build_model
    from chatlm.model.export import save_hf
    from chatlm.data.tokenizer import load_tokenizer

    tok = load_tokenizer(sample_tokenizer_dir())
    out = {}
    for arch in ("t5", "llama"):
        d = str(tmp_path_factory.mktemp(arch) / "hf")
        model = build_model(arch, len(tok), shape=TINY_SHAPE, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        save_hf(model, tok, d)
        out[arch] = d
    return out


@pytest.mark.slow
@pytest.mark.parametrize("config", [c for c in CONFIGS if c not in GPU_ONLY])
def test_config_trains_a_few_steps(config, tmp_path, pretrained):
    from chatlm.data.sample import sample_file, sample_tokenizer_dir

    # The config's own model, optimizer and trainer settings, on the bundled data (legacy
    # configs name the original project's files) and a tiny model where it fine-tunes one.
    train, val = sample_file("train"), sample_file("val")
    data = _section(config, "data")
    if data.get("format") == "text":  # plain-text pretraining: the sample pairs as documents
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = pq.read_table(train).to_pylist()[:400]
        column = data.get("text_column", "text")
        train = val = str(tmp_path / "text.parquet")
        pq.write_table(pa.table({column: [r["prompt"] + "\n" + r["response"] for r in rows]}), train)
    extra = ["--data.train_file", train, "--data.val_file", val, "--data.test_file", val,
             "--data.tokenizer", sample_tokenizer_dir()]
    if config in NEEDS_PRETRAINED:
        extra += ["--model.pretrained", pretrained[NEEDS_PRETRAINED[config]]]
    run = tmp_path / "run"
    run_cli("fit", "--config", config, *CPU, *extra,
            "--trainer.default_root_dir", str(run), "--trainer.max_steps", "2",
            "--trainer.max_epochs", "1", "--trainer.accumulate_grad_batches", "1",
            "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
            "--data.batch_size", "2", "--data.max_seq_len", "32", "--data.num_workers", "0",
            "--model.bleu_max_samples", "2", "--model.max_new_tokens", "4",
            "--run.export_hf", "false")
    rows = read_jsonl(run / "losses.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["loss"] == r["loss"] and r["loss"] > 0 for r in rows)
