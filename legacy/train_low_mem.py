# accelerate launch --multi_gpu --num_processes 2 legacy/train_low_mem.py train
"""The hand-written accelerate training loop of the original project (``train_low_mem.py``).

    accelerate launch --multi_gpu --num_processes 2 legacy/train_low_mem.py train                      # pretrain (TrainConfig)
    accelerate launch --multi_gpu --num_processes 3 legacy/train_low_mem.py train --use_large_config=True
    accelerate launch --multi_gpu --num_processes 2 legacy/train_low_mem.py train --is_finetune=True   # SFT (TrainConfigSFT)
    accelerate launch --multi_gpu --num_processes 2 legacy/train_low_mem.py train --is_finetune=True --use_small_config=True
    accelerate launch --multi_gpu --num_processes 3 legacy/train_low_mem.py train --is_finetune=True --use_fast_config=True
    accelerate launch --multi_gpu --num_processes 2 legacy/train_low_mem.py train --epochs=10 --learn_rate=0.0002
    accelerate launch --multi_gpu --num_processes 2 legacy/train_low_mem.py train --is_finetune=True --epochs=5 --learn_rate=1e-5
    accelerate launch --multi_gpu --num_processes 2 legacy/train_low_mem.py train --is_keep_training=True
    python legacy/train_low_mem.py test --best_epoch=0 [--use_small_config=True]
    accelerate launch --cpu --num_processes 2 legacy/train_low_mem.py train ...                    # 2 CPU processes (gloo)
    python legacy/train_low_mem.py train [flags] --print_lightning_config   # the equivalent Lightning YAML

Any field of the selected config class (legacy/config.py) or of ``T5ModelConfig`` is a flag:
``--train_file=... --output_dir=... --d_model=128 --dropout_rate=0.0 --mixed_precision=no``.

Flags added by the shim (the original had none of them):
    --adaptive_memory=False        ignore the available RAM (use the config's accumulation)
    --print_lightning_config       print the equivalent ``python -m src fit`` YAML, train nothing
    --interrupt_at_step=N          stop after optimizer step N as Ctrl+C would (state saved)
    test --use_train_file=True     evaluate the train file, as the original did (default: test_file)

The loop keeps the original's math: loss = CE / acc, ``accelerator.backward`` divides by acc
once more (gradients of CE / acc**2, a defect kept for parity), every ``acc`` micro-steps
clip_grad_norm_(1.0), optimizer step (Adafactor, relative step: the learning rate is
ignored), OneCycleLR step, zero_grad; micro-batches left over at an epoch end carry into
the next epoch's first window. What differs from the original, and why, is listed in
``DEVIATIONS`` below (also printed by ``python legacy/train_low_mem.py deviations``).

It reads its data only through ``chatlm.data`` (the shared, memory-mapped pipeline of the
main path), so ``python -m src fit --config configs/legacy/low_mem_*.yaml`` sees the same
batches in the same order and writes the same ``losses.jsonl``.
"""

import os
import sys

# ----------------------------------------------------------------------------- environment
# As the original: set before torch.distributed starts, and show them.
os.environ.setdefault('NCCL_SHM_DISABLE', '0')
os.environ.setdefault('NCCL_TIMEOUT', '1800')
# (on stderr, so that --print_lightning_config leaves nothing but YAML on stdout)
print('NCCL_SHM_DISABLE={}, NCCL_TIMEOUT={}'.format(os.environ['NCCL_SHM_DISABLE'], os.environ['NCCL_TIMEOUT']),
      file=sys.stderr)
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (os.path.join(ROOT, 'src'), ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import dataclasses
import gc
import json
import math
import shutil
import signal
import time
from typing import Any, Optional, Union

import fire
import torch
from psutil import virtual_memory

from legacy.config import (
    PROJECT_ROOT,
    T5ModelConfig,
    TrainConfig,
    TrainConfigPretrainLarge,
    TrainConfigSFT,
    TrainConfigSFTFast,
    TrainConfigSFTSmall,
)

#: Written beside accelerate's files in ``train_state_dir``: where to resume.
PROGRESS_FILE = 'legacy_progress.json'
#: Per process, beside it: the RNG state at the resume point (dropout continues exactly).
RNG_FILE = 'legacy_rng_state_{}.pt'
#: Below this much available RAM the original switched to its low-memory knobs.
LOW_MEMORY_GB = 10.0

DEVIATIONS = """\
Deviations of legacy/train_low_mem.py from the original train_low_mem.py (and why):
 1. Batch order: chatlm.data.sampling.ShardedBatchSampler, a pure function of (seed, epoch);
    N processes at batch b see exactly the rows of 1 process at batch N*b. The original's
    shuffle drew from the global torch RNG after model init, so it changed with the model
    size and with dropout; the main path uses the same sampler, so both engines see the
    same batches. The loaders are not passed to accelerator.prepare (that would shard a
    second time); batches are moved to the device by hand.
 2. Data comes from chatlm.data (memory-mapped Arrow, legacy-exact Seq2SeqCollator). The
    "ultra low memory" mode (re-reading the parquet for every item, O(rows) per item) is
    gone: every mode now reads the memory-mapped file. The low-memory knobs (RAM < 10 GB:
    accumulation 4, no workers, no pin_memory) are kept; --adaptive_memory=False turns them off.
 3. Tokenizer: chatlm.data.tokenizer.load_tokenizer (AutoTokenizer), not the T5Tokenizer ->
    AutoTokenizer -> PreTrainedTokenizerFast fallback chain (T5Tokenizer refuses the
    byte-level BPE tokenizers anyway).
 4. Model: chatlm.model.build.build_model("t5", ...) = plain T5ForConditionalGeneration with the same
    config (same state-dict keys; the original subclass only added my_generate). The
    T5ModelConfig fields and dropout_rate can be overridden by flags (the original had none).
    Fine-tuning loads the checkpoint with chatlm.model.load.load_model (weights_only=True).
 5. Optimizer: Transformers' Adafactor(lr=None, relative_step=True, scale_parameter=True,
    warmup_init=False) via chatlm.model.optim ("adafactor_legacy"): bit-identical to
    torch_optimizer.Adafactor's defaults, no torch_optimizer dependency.
 6. Resume (--is_keep_training=True): the original restarted at epoch 0, step 0 with best
    BLEU-4 reset (it repeated the finished part of the epoch). The shim saves its position
    (epoch, micro-step, optimizer step, best BLEU-4/epoch) in train_state_dir/legacy_progress.json
    with every save_state and continues at the first micro-batch of the accumulation window
    that was open at the save (its gradients are not in the saved state); losses.jsonl drops
    rows past the restored step. A state directory without the file (written by the original)
    resumes as the original did, from epoch 0. The RNG state of the window start is saved too
    (legacy_rng_state_<rank>.pt), so a resumed run is bit-identical, dropout included.
 7. Ctrl+C: the original asked y/n inside the signal handler, possibly mid-backward, and on
    every process. The shim finishes the current accumulation window (saves happen between
    optimizer steps, so the state is consistent), asks on the main process only if stdin is a
    TTY (else it saves without asking), saves train_state_dir and exits. A second Ctrl+C
    stops at once.
 8. Printing: the NCCL line and the `old -> new` override lines go to stderr (stdout stays
    clean for --print_lightning_config). losses.jsonl in output_dir (chatlm.train.losslog format, one row per optimizer step: mean of
    the window's micro-batch CE losses, each a token mean over all processes; lr used by the
    step). The text log goes to output_dir/train_low_mem.log (main process only).
 9. Validation shards each global batch of 2*b*N rows over the N processes
    (ShardedBatchSampler, no shuffle) instead of accelerate's round-robin of whole batches:
    the same first floor(len/(N*2b))*N*2b rows are scored. Generation uses chatlm.infer.generation's
    greedy preset; references and outputs are stripped of surrounding whitespace as in the
    main path. BLEU-4 is chatlm.infer.metrics.bleu4 (legacy-exact).
10. test: evaluates test_file by default; the original evaluated the train file [defect]
    (--use_train_file=True restores that). Its flags also accept config/model overrides.
11. pin_memory only when CUDA is available (it does nothing, with a warning, on CPU).
12. RNG continuity: every micro-batch starts from the RNG state at the end of the previous one
    (as the main path's ExactResume callback), so dropout masks depend on the training steps
    only, not on the seeds that the loader iterators and the evaluation draw in between
    (the original's did). Hence the same masks as the main path, and exact resumes.
13. The train / validation / checkpoint file checks run on every process before anything
    is loaded (the original checked on the main process after building the Accelerator).
14. Differences to the main path (Lightning): micro-batches left over at an epoch end carry into
    the next epoch's first window here; Lightning steps on the partial window instead. Parity
    holds when the batches per epoch are a multiple of the accumulation.
"""


# ============================================================================= config
def _coerce(value: Any, default: Any) -> Any:
    """Give a command-line value the type of the field's default (fire guesses types)."""
    if isinstance(default, bool):
        if isinstance(value, str):
            return value.lower() in ('1', 'true', 'yes', 'y')
        return bool(value)
    if isinstance(default, int) and not isinstance(value, bool):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return int(value) if isinstance(value, (int, str)) else value
    if isinstance(default, float) and isinstance(value, (int, str)) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, str) and not isinstance(value, str):
        return str(value)
    return value


def apply_overrides(train_config: Any, model_config: T5ModelConfig, kwargs: dict, quiet: bool = False) -> None:
    """``--field=value`` of the train config or of T5ModelConfig; unknown names warn and are ignored."""
    train_fields = {f.name for f in dataclasses.fields(train_config)}
    model_fields = {f.name for f in dataclasses.fields(model_config)}
    for key, value in kwargs.items():
        target = train_config if key in train_fields else model_config if key in model_fields else None
        if target is None:
            print('[WARN] unknown parameter: {} (not a field of {} or T5ModelConfig), ignored'.format(
                key, type(train_config).__name__), file=sys.stderr)
            continue
        old = getattr(target, key)
        new = _coerce(value, old)
        setattr(target, key, new)
        if not quiet:
            print('{}: {} -> {}'.format(key, old, new), file=sys.stderr)


def select_train_config(is_finetune: bool = False, use_small_config: bool = False,
                        use_fast_config: bool = False, use_large_config: bool = False):
    """The original order: large -> fast -> small -> finetune -> pretrain."""
    if use_large_config:
        return TrainConfigPretrainLarge()
    if use_fast_config:
        return TrainConfigSFTFast()
    if use_small_config:
        return TrainConfigSFTSmall()
    if is_finetune:
        return TrainConfigSFT()
    return TrainConfig()


def usage(train_config: Any, model_config: T5ModelConfig) -> str:
    """The module docstring and every ``--field=value`` of the selected classes with its default."""
    lines = [__doc__.strip(), '', 'Fields of {} (--field=value):'.format(type(train_config).__name__)]
    lines += ['  --{}={!r}'.format(f.name, getattr(train_config, f.name)) for f in dataclasses.fields(train_config)]
    lines += ['', 'Fields of T5ModelConfig:']
    lines += ['  --{}={!r}'.format(f.name, getattr(model_config, f.name)) for f in dataclasses.fields(model_config)]
    return '\n'.join(lines)


def available_memory_gb() -> float:
    return virtual_memory().available / (1024 ** 3)


def memory_knobs(train_config: Any, adaptive_memory: bool = True) -> dict:
    """Accumulation, loader workers, low-memory mode and pin_memory, as the original chose them."""
    unuse_mem = available_memory_gb()
    gpus = torch.cuda.device_count()
    if adaptive_memory and unuse_mem < LOW_MEMORY_GB:
        return dict(accumulation_steps=4, num_workers=0, low_memory=True, pin_memory=False,
                    available_gb=unuse_mem)
    return dict(accumulation_steps=int(train_config.gradient_accumulation_steps),
                num_workers=min(4, gpus) if gpus else 0, low_memory=False,
                pin_memory=torch.cuda.is_available(), available_gb=unuse_mem)


# ============================================================================= helpers
class Log:
    """The original Logger: stdout and a file (main process only)."""

    def __init__(self, path: Optional[str], enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled
        if enabled and path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def info(self, msg: str, std_out: bool = True, save_to_file: bool = True) -> None:
        if not self.enabled:
            return
        line = '[{}] {}'.format(time.strftime('%Y-%m-%d %H:%M:%S'), msg)
        if std_out:
            print(line, flush=True)
        if save_to_file and self.path:
            with open(self.path, 'a', encoding='utf-8') as f:
                f.write(line + '\n')


def my_average(values: list) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def cleanup_checkpoints(model_file: str, keep_latest_n: int) -> None:
    """Delete ``*.epoch_*_latest.bin`` beyond the newest ``keep_latest_n`` (never best / exit_save)."""
    try:
        model_dir = os.path.dirname(model_file.format('x')) or '.'
        if not os.path.isdir(model_dir):
            return
        candidates = []
        for fn in os.listdir(model_dir):
            full = os.path.join(model_dir, fn)
            if fn.endswith('.bin') and '.epoch_' in fn and fn.endswith('_latest.bin') and 'exit_save' not in fn:
                candidates.append(full)
        candidates.sort(key=lambda p: (os.path.getmtime(p), p), reverse=True)
        for p in candidates[max(0, keep_latest_n):]:
            if p != model_file.format('best') and os.path.exists(p):
                os.remove(p)
    except OSError:
        return  # a failed cleanup never stops training


def free_disk_gb(path: str) -> float:
    try:
        return shutil.disk_usage(path or '.').free / (1024 ** 3)
    except OSError:
        return 0.0


def write_progress(train_state_dir: str, progress: dict) -> None:
    from chatlm.util.files import atomic_write_text

    atomic_write_text(os.path.join(train_state_dir, PROGRESS_FILE), json.dumps(progress, indent=2) + '\n')


def read_progress(train_state_dir: str) -> Optional[dict]:
    path = os.path.join(train_state_dir, PROGRESS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding='utf-8') as f:
        return json.load(f)


def capture_rng() -> dict:
    """torch (and CUDA), numpy and python RNG states, as tensors and numbers (weights_only-loadable)."""
    import random

    import numpy as np

    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        'torch': torch.get_rng_state(),
        'numpy': {'keys': torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)), 'pos': int(np_state[2]),
                  'has_gauss': int(np_state[3]), 'cached_gaussian': float(np_state[4])},
        'python': {'version': int(py_state[0]), 'state': torch.tensor(py_state[1], dtype=torch.int64),
                   'gauss_next': py_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state['torch'].cpu().to(torch.uint8))
    n = state['numpy']
    np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), int(n['pos']), int(n['has_gauss']),
                         float(n['cached_gaussian'])))
    p = state['python']
    random.setstate((int(p['version']), tuple(int(x) for x in p['state'].tolist()), p['gauss_next']))
    cuda = state.get('cuda')
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([c.to(torch.uint8) for c in cuda])


def rng_file(train_state_dir: str, rank: int) -> str:
    return os.path.join(train_state_dir, RNG_FILE.format(rank))


# ============================================================================= Lightning YAML
CONFIG_FILE_NAMES = {
    'TrainConfig': 'low_mem_pretrain.yaml',
    'TrainConfigSFT': 'low_mem_sft.yaml',
    'TrainConfigSFTSmall': 'low_mem_sft_small.yaml',
    'TrainConfigSFTFast': 'low_mem_sft_fast.yaml',
    'TrainConfigPretrainLarge': 'low_mem_pretrain_large.yaml',
    'TrainConfigSFTUltra': 'low_mem_sft_ultra.yaml',
}
ULTRA_COMMAND = 'TrainConfigSFTUltra, which no flag of legacy/train_low_mem.py selects'
PRECISION = {'no': '32-true', 'fp16': '16-mixed', 'bf16': 'bf16-mixed', 'fp8': 'bf16-mixed'}


def _rel(path: str) -> str:
    """Paths under the project root are written relative to it (python -m src runs from there)."""
    ap = os.path.abspath(path)
    root = os.path.abspath(PROJECT_ROOT)
    if ap == root or ap.startswith(root + os.sep):
        rel = os.path.relpath(ap, root)
        return rel + ('/' if path.endswith('/') else '')
    return path


def _rows(path: str) -> Optional[int]:
    """Row count of a parquet file, or None when it cannot be read (no training data here)."""
    try:
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(path).metadata.num_rows)
    except Exception:  # noqa: BLE001 - only an optional refinement of the YAML
        return None


def model_shape(model_config: T5ModelConfig):
    """The main path's :class:`~chatlm.model.config.ModelShape` of a legacy ``T5ModelConfig``."""
    from chatlm.model.config import ModelShape

    mc = model_config
    return ModelShape(d_model=mc.d_model, d_ff=mc.d_ff, num_layers=mc.num_layers,
                      num_decoder_layers=mc.num_decoder_layers, num_heads=mc.num_heads, d_kv=mc.d_kv,
                      dropout=mc.dropout_rate)


def _scalar(value: Any) -> str:
    import yaml

    if isinstance(value, (list, tuple)):
        return '[' + ', '.join(_scalar(v) for v in value) + ']'
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10 ** 6).strip()
    return text[:-4].strip() if text.endswith('\n...') else text.removesuffix('...').strip()


def _section(name: str, items: list, indent: str = '') -> list:
    """``name:`` then ``  key: value   # comment`` lines (items: (key, value, comment)); in the
    ``model`` section the option groups (shape, optim, lora, evaluation) get sections of their own."""
    from chatlm.model.config import FLAT_NAMES, GROUPS

    lines = [indent + name + ':']
    grouped: dict = {}
    for key, value, comment in items:
        if name == 'model' and key in FLAT_NAMES:
            group, field = FLAT_NAMES[key]
            grouped.setdefault(group, []).append((field, value, comment))
            continue
        line = '{}  {}: {}'.format(indent, key, _scalar(value))
        if comment:
            line = line.ljust(34) + ' # ' + comment
        lines.append(line)
    for group in GROUPS:
        if group in grouped:
            lines += _section(group, grouped[group], indent + '  ')
    return lines


def lightning_config(train_config: Any, model_config: T5ModelConfig, is_finetune: bool,
                     accumulation_steps: int, num_processes: int = 1, command: str = '') -> str:
    """The ``python -m src fit`` YAML that trains as this legacy command line does."""
    tc, mc = train_config, model_config
    name = type(tc).__name__
    fname = CONFIG_FILE_NAMES.get(name, 'low_mem.yaml')
    acc = int(accumulation_steps)
    batch, eval_batch = int(tc.batch_size_per_gpu), 2 * int(tc.batch_size_per_gpu)
    n_train, n_valid = _rows(tc.train_file), _rows(tc.validation_file)

    trainer = [
        ('default_root_dir', _rel(tc.output_dir), 'legacy output_dir: losses.jsonl, checkpoints/, hf/'),
        ('max_epochs', int(tc.epochs), None),
        ('accumulate_grad_batches', acc, 'micro-batches per optimizer step'
         + (' (low-memory knobs; config: {})'.format(tc.gradient_accumulation_steps)
            if acc != int(tc.gradient_accumulation_steps) else '')),
        ('gradient_clip_val', 1.0, 'the legacy loop clips at 1.0 (max_grad_norm is not read)'),
        ('gradient_clip_algorithm', 'norm', None),
        ('precision', PRECISION.get(str(tc.mixed_precision), 'bf16-mixed'),
         'mixed_precision: {} (32-true: full fp32, slower, more memory)'.format(tc.mixed_precision)),
        ('num_sanity_val_steps', 0, 'the legacy loop validates only after each epoch'),
        ('check_val_every_n_epoch', 1, None),
    ]
    if n_valid is not None:
        trainer.append(('limit_val_batches', max(0, n_valid // (num_processes * eval_batch)),
                        'floor(len(valid) / (devices * eval_batch_size))'))
    model = [
        ('arch', 't5', None),
        ('d_model', int(mc.d_model), 'T5ModelConfig'),
        ('d_ff', int(mc.d_ff), None),
        ('num_layers', int(mc.num_layers), None),
        ('num_decoder_layers', int(mc.num_decoder_layers), None),
        ('num_heads', int(mc.num_heads), None),
        ('d_kv', int(mc.d_kv), None),
        ('dropout', float(mc.dropout_rate), "T5's dropout_rate"),
        ('optimizer', 'adafactor_legacy', 'relative step: lr and schedule do NOT change the updates'),
        ('lr', float(tc.learn_rate), 'learn_rate (one-cycle peak = div_factor * lr)'),
        ('scheduler', 'onecycle', None),
        ('div_factor', float(tc.div_factor), None),
    ]
    if n_train is not None:
        from chatlm.model.optim import legacy_onecycle_total_steps

        model.append(('scheduler_total_steps', legacy_onecycle_total_steps(n_train, batch, acc, int(tc.epochs)),
                      'epochs * ceil(len(train) / (batch * acc))'))
    model.append(('legacy_accumulation_scaling', True, 'gradients of CE / acc^2, as the legacy loop [defect]'))
    if is_finetune:
        model.append(('pretrained', _rel(tc.finetune_from_ckp_file), 'finetune_from_ckp_file'))
        model.append(('freeze', ['shared', 'encoder'], 'also freezes the tied output head: the decoder trains'))
    model.append(('generation_preset', 'greedy', 'validation BLEU-4 generations'))
    model.append(('max_new_tokens', int(tc.max_seq_len), 'max_seq_len'))
    if n_valid is not None:
        model.append(('bleu_max_samples', max(0, n_valid // (num_processes * eval_batch)) * eval_batch,
                      'every validated sample gets a BLEU-4 score'))
    else:
        model.append(('bleu_max_samples', 1000000000, 'every validated sample gets a BLEU-4 score'))
    if getattr(tc, 'use_torch_compile', False):
        model.append(('compile', True, 'use_torch_compile'))
    if hasattr(tc, 'gradient_checkpointing'):
        model.append(('gradient_checkpointing', bool(tc.gradient_checkpointing), None))
    data = [
        ('train_file', _rel(tc.train_file), None),
        ('val_file', _rel(tc.validation_file), 'validation_file'),
        ('test_file', _rel(tc.test_file), None),
        ('tokenizer', _rel(tc.tokenizer_dir), 'tokenizer_dir'),
        ('format', 'legacy', 'prompt[:max_seq_len-5] + "[EOS]" -> encoder, response -> labels'),
        ('max_seq_len', int(tc.max_seq_len), None),
        ('batch_size', batch, 'batch_size_per_gpu'),
        ('eval_batch_size', eval_batch, 'legacy: twice the train batch'),
        ('seed', int(tc.seed), 'batch order = f(seed, epoch), as the legacy shim'),
    ]
    workers = getattr(tc, 'dataloader_num_workers', None)
    if workers is not None:
        data.append(('num_workers', int(workers), 'dataloader_num_workers'))
    run = [
        ('checkpoint_every_n_steps', max(1, int(tc.save_steps) // acc),
         'save_steps={} micro-steps / acc'.format(tc.save_steps)),
        ('save_top_k', 1, 'the legacy loop keeps one best model'),
    ]
    header = [
        '# python -m src fit --config configs/legacy/{}'.format(fname),
        '# Lightning equivalent of: {}'.format(command.strip() or 'python legacy/train_low_mem.py train'),
        '# (config class {}).'.format(name),
        '# Same model, initial weights (seed), batches and their order, loss scaling, clipping,',
        '# optimizer and schedule, so losses.jsonl (in default_root_dir) matches the legacy one.',
        '# Differences: Lightning steps on a partial accumulation window at an epoch end (the legacy',
        '# loop carries it into the next epoch); keep_latest_n_ckp has no equivalent (checkpoints/',
        '# last.ckpt + the best by val BLEU-4). Several GPUs: the legacy loop ran one process per GPU',
        '# (accelerate launch --num_processes N); pass --trainer.devices N for the same global batch.',
    ]
    if n_train is None:
        header.append("# scheduler_total_steps unset: Lightning's estimate, epochs * ceil(batches / acc), is the")
        header.append('# legacy OneCycleLR length on one device.')
    if n_valid is None:
        header.append('# limit_val_batches unset: the legacy loop scored floor(len(valid) / (devices *')
        header.append('# eval_batch_size)) batches; the last, partial one is scored here too.')
    lines = header + ['seed_everything: {}'.format(int(tc.seed))]
    for section_name, items in (('trainer', trainer), ('model', model), ('data', data), ('run', run)):
        lines += _section(section_name, items)
    return '\n'.join(lines) + '\n'


# ============================================================================= the trainer
class TrainLowMem:
    """``train`` and ``test``: the two commands of the original script."""

    def __init__(self) -> None:
        self.accelerator = None
        self.model = None
        self._interrupted = False
        self.progress_bar = None

    # ------------------------------------------------------------------ Ctrl+C
    def _on_sigint(self, signum, frame) -> None:
        if self._interrupted:  # second Ctrl+C / SIGTERM: stop now
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            raise KeyboardInterrupt
        self._interrupted = True
        print('\nCtrl+C: finishing the current accumulation window, then saving state '
              '(press Ctrl+C again to stop at once)', file=sys.stderr, flush=True)

    def _interrupt_requested(self, accelerator) -> bool:
        flag = torch.tensor([1.0 if self._interrupted else 0.0], device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, reduction='sum')
        return bool(flag.item() > 0)

    def _ask_save(self, accelerator) -> bool:
        """y/n on the main process if stdin is a TTY; without a TTY: save."""
        answer = [True]
        if accelerator.is_main_process and sys.stdin is not None and sys.stdin.isatty():
            print("you pressed `ctrl+c`, do you want to save checkpoint? Yes (y) or No (n)", flush=True)
            try:
                answer = [input().strip().lower() in ('yes', 'y')]
            except EOFError:
                answer = [True]
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(answer, from_process=0)
        return bool(answer[0])

    # ------------------------------------------------------------------ saving
    def save_model(self, suffix: Union[str, int], train_config: Any, accelerator, model, log: Log) -> None:
        """``model_file.format(suffix)`` as a legacy (non-zip) torch state dict, main process only."""
        accelerator.wait_for_everyone()
        state_dict = accelerator.get_state_dict(model)
        if not accelerator.is_main_process:
            return
        save_path = train_config.model_file.format(suffix)
        save_dir = os.path.dirname(save_path)
        if save_dir:
            os.makedirs(save_dir, exist_ok=True)
        cleanup_checkpoints(train_config.model_file, train_config.keep_latest_n_ckp)
        free_gb = free_disk_gb(save_dir or '.')
        if free_gb < 2.0:
            log.info('[WARN] only {:.2f} GB of disk left, model not saved: {}'.format(free_gb, save_path))
            return
        try:
            torch.save(state_dict, save_path, _use_new_zipfile_serialization=False)
        except BaseException:
            if os.path.exists(save_path):
                try:
                    os.remove(save_path)
                except OSError:
                    pass
            raise

    def save_state(self, train_config: Any, accelerator, progress: dict, rng_state: Optional[dict] = None) -> None:
        """accelerate's state + where to resume (main process) + the RNG state there (every process)."""
        accelerator.wait_for_everyone()
        accelerator.save_state(output_dir=train_config.train_state_dir)
        if rng_state is not None:
            torch.save(rng_state, rng_file(train_config.train_state_dir, accelerator.process_index))
        if accelerator.is_main_process:
            write_progress(train_config.train_state_dir, progress)
        accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ train
    def train(self, is_keep_training: bool = False, is_finetune: bool = False, use_small_config: bool = False,
              use_fast_config: bool = False, use_large_config: bool = False, adaptive_memory: bool = True,
              print_lightning_config: bool = False, interrupt_at_step: int = 0, **kwargs) -> None:
        """Train (pretrain, or fine-tune with --is_finetune=True); see the module docstring."""
        train_config = select_train_config(is_finetune, use_small_config, use_fast_config, use_large_config)
        model_config = T5ModelConfig()
        if kwargs.pop('help', False) or kwargs.pop('h', False):
            print(usage(train_config, model_config))
            return None
        apply_overrides(train_config, model_config, kwargs, quiet=bool(print_lightning_config))
        knobs = memory_knobs(train_config, adaptive_memory=bool(adaptive_memory))
        accumulation_steps = knobs['accumulation_steps']

        if print_lightning_config:
            command = ' '.join(['python legacy/train_low_mem.py'] + [
                a for a in sys.argv[1:] if 'print_lightning_config' not in a and 'adaptive_memory' not in a])
            if int(os.environ.get('RANK', '0')) == 0:  # once, also under accelerate launch
                sys.stdout.write(lightning_config(train_config, model_config, bool(is_finetune), accumulation_steps,
                                                  int(os.environ.get('WORLD_SIZE', '1')), command=command))
                sys.stdout.flush()
            return None

        if not os.path.exists(train_config.train_file):
            raise FileNotFoundError('train file not found: {} (pass --train_file=...)'.format(train_config.train_file))
        if not os.path.exists(train_config.validation_file):
            raise FileNotFoundError('validation file not found: {} (pass --validation_file=...)'.format(
                train_config.validation_file))
        if is_finetune and not os.path.exists(train_config.finetune_from_ckp_file):
            raise FileNotFoundError(
                'pretrained model not found: {} (pretrain first: python legacy/train_low_mem.py train, '
                'or pass --finetune_from_ckp_file=...)'.format(train_config.finetune_from_ckp_file))

        from accelerate import Accelerator
        from accelerate.utils import set_seed
        from torch.utils.data import DataLoader

        from chatlm.data.collate import Seq2SeqCollator
        from chatlm.data.sampling import ShardedBatchSampler
        from chatlm.data.sources import load_prompt_response
        from chatlm.train.losslog import LossLogWriter
        from chatlm.model.build import build_model, freeze_modules
        from chatlm.model.load import load_model
        from chatlm.model.optim import build_optimizer, build_scheduler, legacy_onecycle_total_steps
        from chatlm.data.tokenizer import load_tokenizer

        save_steps = int(train_config.save_steps)
        logging_steps = int(train_config.logging_steps)

        set_seed(train_config.seed)
        accelerator = Accelerator(
            mixed_precision=train_config.mixed_precision,
            gradient_accumulation_steps=accumulation_steps,
            project_dir=train_config.train_state_dir,
        )
        log = Log(os.path.join(train_config.output_dir, 'train_low_mem.log'), enabled=accelerator.is_main_process)

        if accelerator.is_main_process:
            log.info('cpu memory available: {:.2f} GB, disk space available: {:.2f} GB'.format(
                knobs['available_gb'], free_disk_gb('.')))
            log.info('config: {}, gradient accumulation steps: {}, low-memory knobs: {} (adaptive_memory={})'.format(
                type(train_config).__name__, accumulation_steps, knobs['low_memory'], adaptive_memory))
            if knobs['low_memory']:
                log.info('low-memory mode: the data is read from a memory-mapped Arrow file (chatlm.data), '
                         'no worker processes, no pin_memory')
            log.info('operation: {}, keep training: {}, loading datasets ...'.format(
                'finetune' if is_finetune else 'train', is_keep_training))
        accelerator.wait_for_everyone()

        # ---------------------------------------------------------------- data (chatlm.data)
        tokenizer = load_tokenizer(train_config.tokenizer_dir)
        train_dataset = load_prompt_response(train_config.train_file)
        valid_dataset = load_prompt_response(train_config.validation_file)
        collate_fn = Seq2SeqCollator(tokenizer, train_config.max_seq_len)

        batch_size = int(train_config.batch_size_per_gpu)
        eval_batch_size = 2 * batch_size
        num_processes = accelerator.num_processes
        train_sampler = ShardedBatchSampler(len(train_dataset), batch_size, seed=train_config.seed, shuffle=True,
                                            num_replicas=num_processes, rank=accelerator.process_index)
        valid_sampler = ShardedBatchSampler(len(valid_dataset), eval_batch_size, seed=train_config.seed,
                                            shuffle=False, num_replicas=num_processes,
                                            rank=accelerator.process_index)
        train_dataloader = DataLoader(train_dataset, batch_sampler=train_sampler, collate_fn=collate_fn,
                                      num_workers=knobs['num_workers'], pin_memory=knobs['pin_memory'])
        valid_dataloader = DataLoader(valid_dataset, batch_sampler=valid_sampler, collate_fn=collate_fn,
                                      num_workers=knobs['num_workers'], pin_memory=knobs['pin_memory'])
        device = accelerator.device
        log.info('using device: {}, processes: {}'.format(device, num_processes))

        # ---------------------------------------------------------------- model
        # The weights are a pure function of the seed, as in the main path (seed_everything,
        # then the same build_model): nothing may draw from the torch RNG in between.
        set_seed(train_config.seed)
        shape = model_shape(model_config)
        ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        if is_finetune:
            log.info('loading the pretrained model: {}'.format(train_config.finetune_from_ckp_file))
            model = load_model(train_config.finetune_from_ckp_file, arch='t5', shape=shape,
                               expected_vocab_size=len(tokenizer), vocab_size=len(tokenizer), **ids)
            trainable, total = freeze_modules(model, ['shared', 'encoder'])
            log.info('SFT: shared embeddings (and the tied output head) and encoder frozen; trainable '
                     'parameters: {:,} / {:,} ({:.2f}%)'.format(trainable, total, 100.0 * trainable / max(1, total)))
        else:
            model = build_model('t5', len(tokenizer), shape, **ids)
        if accelerator.is_main_process:
            os.makedirs(os.path.dirname(os.path.abspath(train_config.model_config_file)), exist_ok=True)
            with open(train_config.model_config_file, 'w', encoding='utf-8') as f:
                json.dump(model.config.to_diff_dict(), f, indent=4, ensure_ascii=False)
        decoder_start_token_id = model.config.decoder_start_token_id

        # ---------------------------------------------------------------- optimizer, schedule
        optimizer = build_optimizer('adafactor_legacy', model.parameters(), lr=train_config.learn_rate)
        steps_per_epoch = len(train_dataset) // (num_processes * batch_size)
        eval_steps = len(valid_dataset) // (num_processes * eval_batch_size)
        total_steps = legacy_onecycle_total_steps(len(train_dataset), batch_size, accumulation_steps,
                                                  int(train_config.epochs))
        lr_scheduler = build_scheduler('onecycle', optimizer, total_steps=total_steps, lr=train_config.learn_rate,
                                       div_factor=train_config.div_factor)
        log.info('train dataset size: {}, steps per epoch: {}; validation dataset size: {}, steps per validation: '
                 '{}; dataloader num_workers: {}; one-cycle length: {} optimizer steps'.format(
                     len(train_dataset), steps_per_epoch, len(valid_dataset), eval_steps, knobs['num_workers'],
                     total_steps))

        model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)

        progress = {'epoch': 0, 'step': 0, 'global_step': 0, 'best_bleu4': 0.0, 'best_epoch': 0}
        resume_rng = None
        if is_keep_training:
            if not os.path.isdir(train_config.train_state_dir):
                raise FileNotFoundError('no training state to resume in {} (train without --is_keep_training '
                                        'first)'.format(train_config.train_state_dir))
            accelerator.load_state(input_dir=train_config.train_state_dir)
            # The original registered the scheduler here (custom_checkpoint_0.pkl); save_state already
            # writes it as scheduler.bin, and the extra .pkl made the next load_state refuse the folder.
            saved = read_progress(train_config.train_state_dir)
            saved_rng = rng_file(train_config.train_state_dir, accelerator.process_index)
            if saved is not None and os.path.isfile(saved_rng):
                resume_rng = torch.load(saved_rng, map_location='cpu', weights_only=True)
            if saved is None:
                log.info('[WARN] {} has no {}: restarting at epoch 0, step 0 as the original did'.format(
                    train_config.train_state_dir, PROGRESS_FILE))
            else:
                progress.update(saved)
                log.info('resuming at epoch {}, micro-step {}, optimizer step {}'.format(
                    progress['epoch'], progress['step'], progress['global_step']))

        self.model = model
        self.accelerator = accelerator

        start_epoch, start_step = int(progress['epoch']), int(progress['step'])
        global_step = int(progress['global_step'])
        best_bleu4, best_epoch = float(progress['best_bleu4']), int(progress['best_epoch'])
        loss_writer = LossLogWriter(train_config.output_dir, resume_from_step=global_step) \
            if accelerator.is_main_process else None
        if accelerator.is_main_process:
            os.makedirs(train_config.output_dir, exist_ok=True)

        # The accumulation window: (CE * label tokens, label tokens) of each micro-batch since the
        # last optimizer step, and where that window started (the resume point).
        window: list = []
        window_start = (start_epoch, start_step)
        # RNG continuity (as the main path's ExactResume): every micro-batch starts from the RNG
        # state at the end of the previous one, so dropout masks depend only on the training
        # steps, not on the seeds that loader iterators and evaluations draw in between; and a
        # resume (which replays the open window) restores the state of the window start.
        rng_state = resume_rng
        window_rng = resume_rng

        def position() -> dict:
            return {'epoch': window_start[0], 'step': window_start[1], 'global_step': global_step,
                    'best_bleu4': best_bleu4, 'best_epoch': best_epoch}

        def stop_here(reason: str) -> None:
            if reason == 'interrupt' and not self._ask_save(accelerator):
                accelerator.print('exit without saving')
            else:
                self.save_state(train_config, accelerator, position(), window_rng)
                accelerator.print('training state saved in {} (resume with --is_keep_training=True)'.format(
                    train_config.train_state_dir))
            if self.progress_bar is not None:
                self.progress_bar.stop()
            accelerator.wait_for_everyone()
            accelerator.end_training()

        bar = None
        if accelerator.is_main_process:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            bar = Progress(TextColumn('[progress.description]{task.description}'), BarColumn(),
                           TextColumn('[progress.percentage]{task.percentage:>3.0f}%'), TimeRemainingColumn(),
                           TimeElapsedColumn(), TextColumn('[bold blue]{task.fields[show_info]}'),
                           refresh_per_second=1, disable=not sys.stdout.isatty())
            epoch_task = bar.add_task(description='epoch: ', show_info='', total=train_config.epochs)
            steps_task = bar.add_task(description='steps: ', show_info='',
                                      total=math.ceil(max(1, steps_per_epoch) / logging_steps))
            bar.start()
            self.progress_bar = bar

        previous_handler = signal.signal(signal.SIGINT, self._on_sigint)
        previous_term = signal.signal(signal.SIGTERM, self._on_sigint)  # a scheduler's stop saves too
        epoch_loss_list: list = []
        try:
            for epoch in range(start_epoch, int(train_config.epochs)):
                if bar is not None:
                    bar.update(epoch_task, completed=epoch, show_info='epoch: {}/{}, avg_loss: {:.6f}, best_epoch: '
                               '{}, best_bleu: {}'.format(epoch, train_config.epochs, my_average(epoch_loss_list),
                                                          best_epoch, best_bleu4))
                    bar.reset(steps_task)
                epoch_loss_list = []
                model.train()
                gc.collect()

                skip = start_step if epoch == start_epoch else 0
                train_sampler.set_epoch(epoch)
                if skip:
                    train_sampler.load_state_dict({'epoch': epoch, 'batches_done': skip})

                for step, batch_data in enumerate(train_dataloader, start=skip):
                    if rng_state is not None:
                        restore_rng(rng_state)
                    elif window_rng is None:  # first micro-batch of a fresh run: its window starts here
                        window_rng = capture_rng()
                    batch_data = to_device(batch_data, device)
                    target_ids = batch_data['labels']
                    target_ids[target_ids == decoder_start_token_id] = -100  # pads are already -100

                    outputs = model(input_ids=batch_data['input_ids'], attention_mask=batch_data['attention_mask'],
                                    labels=target_ids)
                    ce = outputs.loss.mean()
                    loss = ce / accumulation_steps
                    accelerator.backward(loss)  # divides by accumulation_steps once more (CE / acc^2)
                    ntok = (target_ids != -100).sum()
                    window.append(torch.stack([ce.detach().double() * ntok.double(), ntok.double()]))

                    if (step + 1) % accumulation_steps == 0:
                        accelerator.clip_grad_norm_(model.parameters(), 1.0)
                        lr = optimizer.param_groups[0]['lr']
                        optimizer.step()
                        lr_scheduler.step()
                        optimizer.zero_grad()
                        global_step += 1
                        stats = torch.stack(window)
                        if num_processes > 1:
                            stats = accelerator.reduce(stats, reduction='sum')
                        window_loss = float((stats[:, 0] / stats[:, 1].clamp(min=1)).mean())
                        if loss_writer is not None:
                            loss_writer.append(global_step, window_loss, lr)
                    rng_state = capture_rng()
                    if (step + 1) % accumulation_steps == 0:
                        window = []
                        window_start = (epoch, step + 1)
                        window_rng = rng_state

                    if (step + 1) % save_steps == 0 or step == steps_per_epoch:
                        self.save_model('epoch_{}_latest'.format(epoch), train_config, accelerator, model, log)
                        self.save_state(train_config, accelerator, position(), window_rng)

                    if step % logging_steps == 0 or step == steps_per_epoch:
                        loss_cpu = loss.detach().item() * accumulation_steps
                        epoch_loss_list.append(loss_cpu)
                        log.info('training loss: epoch:{}, step:{}, loss:{}, device:{}'.format(
                            epoch, step, loss_cpu, device), std_out=False)
                        if bar is not None:
                            bar.advance(steps_task, advance=1)
                            bar.update(steps_task, show_info='step: {}/{}, loss: {:.6f}'.format(
                                step, steps_per_epoch, loss_cpu))

                    if step % 50 == 0:
                        gc.collect()
                        if torch.cuda.is_available():
                            torch.cuda.empty_cache()
                    if step % 200 == 0 and accelerator.is_main_process:
                        mem = virtual_memory()
                        log.info('memory: {:.2f} GB used of {:.2f} GB ({:.1f}%)'.format(
                            (mem.total - mem.available) / 1024 ** 3, mem.total / 1024 ** 3, mem.percent),
                            std_out=False)

                    if not window:  # between optimizer steps: a consistent point to stop
                        if interrupt_at_step and global_step >= int(interrupt_at_step):
                            stop_here('interrupt_at_step')
                            return None
                        if self._interrupt_requested(accelerator):
                            stop_here('interrupt')
                            return None
                # end for batch steps

                if not window:  # no leftover micro-batches: the next epoch starts a new window
                    window_start = (epoch + 1, 0)
                accelerator.wait_for_everyone()
                model.eval()
                gc.collect()
                cur_bleu4_score = self.evaluate(model, tokenizer, valid_dataloader, accelerator, eval_steps,
                                                train_config.max_seq_len)

                if cur_bleu4_score >= best_bleu4:
                    best_bleu4 = cur_bleu4_score
                    best_epoch = epoch
                    self.save_model('best', train_config, accelerator, model, log)
                    self.save_state(train_config, accelerator, position(), window_rng)

                if bar is not None:
                    bar.advance(epoch_task, advance=1)
                log.info('epoch log: epoch:{}, avg_loss:{}, cur_bleu4:{}, best_bleu4:{}, best_epoch:{}'.format(
                    epoch, my_average(epoch_loss_list), cur_bleu4_score, best_bleu4, best_epoch))
                if self._interrupt_requested(accelerator):
                    stop_here('interrupt')
                    return None
            # end for epochs
        finally:
            signal.signal(signal.SIGINT, previous_handler)
            signal.signal(signal.SIGTERM, previous_term)
            if bar is not None:
                bar.stop()
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return None

    # ------------------------------------------------------------------ evaluate
    def evaluate(self, model, tokenizer, valid_dataloader, accelerator, eval_steps: int, max_seq_len: int,
                 preset: str = 'greedy') -> float:
        """Average BLEU-4 of generated answers over ``eval_steps`` batches of every process."""
        from chatlm.infer.generation import generate_answers
        from chatlm.infer.metrics import bleu4

        unwrapped = accelerator.unwrap_model(model)
        local_sum, local_cnt = 0.0, 0
        with torch.no_grad():
            for step, batch_data in enumerate(valid_dataloader):
                if step >= eval_steps:
                    break
                labels = batch_data['labels']
                outputs_txt = generate_answers(unwrapped, tokenizer, batch_data['input_ids'],
                                               batch_data['attention_mask'], preset=preset,
                                               max_new_tokens=max_seq_len)
                target_txt = tokenizer.batch_decode(labels.masked_fill(labels == -100, tokenizer.pad_token_id),
                                                    skip_special_tokens=True)
                for ref, out in zip(target_txt, outputs_txt):
                    local_sum += float(bleu4(ref.strip(), out))
                    local_cnt += 1
        totals = torch.tensor([local_sum, float(local_cnt)], dtype=torch.float64, device=accelerator.device)
        if accelerator.num_processes > 1:
            totals = accelerator.reduce(totals, reduction='sum')
        return float(totals[0] / totals[1].clamp(min=1.0))

    # ------------------------------------------------------------------ test
    def test(self, best_epoch: Union[int, str] = 0, use_small_config: bool = False, use_train_file: bool = False,
             **kwargs) -> None:
        """BLEU-4 of ``model_file.format(best_epoch)`` with beam search (batch min(batch_size_per_gpu, 2))."""
        from accelerate import Accelerator
        from accelerate.utils import set_seed
        from torch.utils.data import DataLoader

        from chatlm.data.collate import Seq2SeqCollator
        from chatlm.data.sampling import ShardedBatchSampler
        from chatlm.data.sources import load_prompt_response
        from chatlm.model.load import load_model
        from chatlm.data.tokenizer import load_tokenizer

        train_config = TrainConfigSFTSmall() if use_small_config else TrainConfigSFT()
        model_config = T5ModelConfig()
        apply_overrides(train_config, model_config, kwargs)
        data_file = train_config.train_file if use_train_file else train_config.test_file
        if not os.path.exists(data_file):
            raise FileNotFoundError('{} file not found: {} (pass --{}=...)'.format(
                'train' if use_train_file else 'test', data_file, 'train_file' if use_train_file else 'test_file'))
        tokenizer = load_tokenizer(train_config.tokenizer_dir)
        test_dataset = load_prompt_response(data_file)
        batch_size = min(int(train_config.batch_size_per_gpu), 2)

        set_seed(train_config.seed)
        accelerator = Accelerator(mixed_precision=train_config.mixed_precision)
        accelerator.print('test dataset: {} ({} rows), using device: {}'.format(
            data_file, len(test_dataset), accelerator.device))

        model_file = train_config.model_file.format(best_epoch)
        model = load_model(model_file, arch='t5', shape=model_shape(model_config), expected_vocab_size=len(tokenizer),
                           vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=tokenizer.eos_token_id)
        model = accelerator.prepare(model)
        model.eval()
        sampler = ShardedBatchSampler(len(test_dataset), batch_size, seed=train_config.seed, shuffle=False,
                                      num_replicas=accelerator.num_processes, rank=accelerator.process_index)
        loader = DataLoader(test_dataset, batch_sampler=sampler,
                            collate_fn=Seq2SeqCollator(tokenizer, train_config.max_seq_len))
        score = self.evaluate(model, tokenizer, loader, accelerator, eval_steps=len(sampler),
                              max_seq_len=train_config.max_seq_len, preset='beam')
        accelerator.print('test BLEU-4 of {}: {}'.format(model_file, score))
        accelerator.end_training()
        return None

    def deviations(self) -> None:
        """What this shim does differently from the original script, and why."""
        print(DEVIATIONS)


def _accelerate_cpu_processes() -> int:
    """N of ``accelerate launch --cpu --num_processes N`` when accelerate started only this one process.

    accelerate 1.x starts several CPU processes only through mpirun; without it, ``--cpu
    --num_processes 2`` silently runs one. Its command line is the parent's, so read N there.
    """
    if os.environ.get('ACCELERATE_USE_CPU', '').lower() not in ('true', '1') or 'WORLD_SIZE' in os.environ:
        return 1
    try:
        import psutil

        argv = psutil.Process().parent().cmdline()
    except Exception:  # noqa: BLE001 - no parent to read: run as one process
        return 1
    if not any(os.path.basename(a).startswith('accelerate') or a.endswith('accelerate_cli.py') for a in argv[:3]):
        return 1
    script = os.path.abspath(sys.argv[0])
    for i, arg in enumerate(argv):
        if os.path.abspath(arg) == script:
            break  # flags after the script are the script's own
        if arg == '--num_processes' and i + 1 < len(argv):
            return max(1, int(argv[i + 1]))
        if arg.startswith('--num_processes='):
            return max(1, int(arg.split('=', 1)[1]))
    return 1


def main() -> None:
    n = _accelerate_cpu_processes()
    if n > 1:
        # Start the N processes with torchrun (gloo on CPU); each is a normal accelerate process.
        print('accelerate launch --cpu --num_processes {}: starting {} CPU processes with torch.distributed.run'.format(
            n, n), file=sys.stderr, flush=True)
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(n),
               os.path.abspath(sys.argv[0]), *sys.argv[1:]]
        os.execv(sys.executable, cmd)
    fire.Fire(TrainLowMem)


if __name__ == '__main__':
    main()
