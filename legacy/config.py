# python legacy/train_low_mem.py train [--is_finetune=True] [--use_small_config=True] ...
"""The config classes of the original project, with their original defaults.

Read by ``legacy/train_low_mem.py`` (the hand-written accelerate loop). Paths are relative
to the project root (the directory above ``legacy/``), as in the original ``config.py``;
every field can be overridden on the command line as ``--field=value``.

``T5ModelConfig`` also carries ``dropout_rate`` (0.1, T5's own default, so unchanged
behaviour): the original never set it, parity tests set it to 0.
"""

from dataclasses import dataclass
from os.path import abspath, dirname

# The repository root (the original used the directory of config.py, its project root).
PROJECT_ROOT: str = dirname(dirname(abspath(__file__))).replace("\\", "/")


# ===================================================================================
# Pretraining (train_low_mem.py train)
@dataclass
class TrainConfig:
    epochs: int = 6
    batch_size_per_gpu: int = 32

    learn_rate: float = 0.00015                     # max lr = div_factor * learn_rate
    div_factor: int = 50

    mixed_precision: str = "bf16"                   # 'no', 'fp16', 'bf16' or 'fp8'

    # effective batch = batch_size_per_gpu * processes * gradient_accumulation_steps
    gradient_accumulation_steps: int = 2

    warmup_steps: int = 1024                        # not read by train_low_mem.py

    tokenizer_dir: str = PROJECT_ROOT + '/model_save/my_tokenizer_sp/'
    model_file: str = PROJECT_ROOT + '/model_save/chat_small_t5.{}.bin'
    model_config_file: str = PROJECT_ROOT + '/model_save/model_config.json'
    train_file: str = PROJECT_ROOT + '/data/my_train_dataset_6m.parquet'
    validation_file: str = PROJECT_ROOT + '/data/my_valid_dataset.parquet'
    test_file: str = PROJECT_ROOT + '/data/my_test_dataset.parquet'

    # only read when train(is_finetune=True)
    finetune_from_ckp_file: str = PROJECT_ROOT + '/model_save/chat_small_t5.best.bin'

    # accelerate state (model, optimizer, scheduler, RNG): resume with --is_keep_training=True
    train_state_dir: str = PROJECT_ROOT + '/model_save/train_latest_state'
    output_dir: str = PROJECT_ROOT + '/model_save/pretrain'

    logging_steps: int = 100
    save_steps: int = 500                           # micro-steps between checkpoints

    keep_latest_n_ckp: int = 8

    seed: int = 23333
    dataloader_buffer_size: int = 10000
    max_seq_len: int = 192


# ===================================================================================
# SFT (train --is_finetune=True)
@dataclass
class TrainConfigSFT:
    epochs: int = 20
    batch_size_per_gpu: int = 20

    learn_rate: float = 5e-5
    div_factor: int = 25

    mixed_precision: str = "bf16"

    gradient_accumulation_steps: int = 6

    warmup_steps: int = 200

    max_grad_norm: float = 1.0                      # not read by train_low_mem.py (it clips with 1.0)

    tokenizer_dir: str = PROJECT_ROOT + '/model_save/my_tokenizer_sp/'
    model_file: str = PROJECT_ROOT + '/model_save/sft/chat_small_t5.{}.bin'
    model_config_file: str = PROJECT_ROOT + '/model_save/sft/model_config.json'
    train_file: str = PROJECT_ROOT + '/data/sft_train_dataset_10k.parquet'
    validation_file: str = PROJECT_ROOT + '/data/sft_valid_dataset_1k.parquet'
    test_file: str = PROJECT_ROOT + '/data/sft_test_dataset.parquet'

    finetune_from_ckp_file: str = PROJECT_ROOT + '/model_save/chat_small_t5.best.bin'

    train_state_dir: str = PROJECT_ROOT + '/model_save/sft/train_latest_state_sft'
    output_dir: str = PROJECT_ROOT + '/model_save/sft'

    logging_steps: int = 20
    save_steps: int = 83

    keep_latest_n_ckp: int = 5

    seed: int = 23333
    dataloader_buffer_size: int = 50000
    max_seq_len: int = 256


# ===================================================================================
# Small-data SFT for 16 GB of RAM (train --is_finetune=True --use_small_config=True)
@dataclass
class TrainConfigSFTSmall:
    epochs: int = 3
    batch_size_per_gpu: int = 1

    learn_rate: float = 5e-5
    div_factor: int = 25

    mixed_precision: str = "bf16"

    # effective batch = 1 * 2 (GPUs) * 8 = 16
    gradient_accumulation_steps: int = 8

    warmup_steps: int = 100

    max_grad_norm: float = 1.0

    tokenizer_dir: str = PROJECT_ROOT + '/model_save/my_tokenizer_sp/'
    model_file: str = PROJECT_ROOT + '/model_save/sft_small/chat_small_t5.{}.bin'
    model_config_file: str = PROJECT_ROOT + '/model_save/sft_small/model_config.json'

    train_file: str = PROJECT_ROOT + '/data/sft_train_small_train.parquet'
    validation_file: str = PROJECT_ROOT + '/data/sft_train_small_valid.parquet'
    test_file: str = PROJECT_ROOT + '/data/sft_test_dataset.parquet'

    finetune_from_ckp_file: str = PROJECT_ROOT + '/model_save/chat_small_t5.best.bin'

    train_state_dir: str = PROJECT_ROOT + '/model_save/sft_small/train_latest_state_sft_small'
    output_dir: str = PROJECT_ROOT + '/model_save/sft_small'

    logging_steps: int = 50
    save_steps: int = 312

    keep_latest_n_ckp: int = 3

    seed: int = 23333
    dataloader_buffer_size: int = 10000
    max_seq_len: int = 512


# ===================================================================================
# SFT that fills the GPUs (train --is_finetune=True --use_fast_config=True)
@dataclass
class TrainConfigSFTFast:
    epochs: int = 5
    batch_size_per_gpu: int = 24

    learn_rate: float = 5e-5
    div_factor: int = 25

    mixed_precision: str = "bf16"

    gradient_accumulation_steps: int = 2

    warmup_steps: int = 300

    max_grad_norm: float = 1.0

    tokenizer_dir: str = PROJECT_ROOT + '/model_save/my_tokenizer_sp/'
    model_file: str = PROJECT_ROOT + '/model_save/sft_fast/chat_small_t5.{}.bin'
    model_config_file: str = PROJECT_ROOT + '/model_save/sft_fast/model_config.json'

    train_file: str = PROJECT_ROOT + '/data/sft_train_small_train.parquet'
    validation_file: str = PROJECT_ROOT + '/data/sft_train_small_valid.parquet'
    test_file: str = PROJECT_ROOT + '/data/sft_test_dataset.parquet'

    finetune_from_ckp_file: str = PROJECT_ROOT + '/model_save/chat_small_t5.best.bin'

    train_state_dir: str = PROJECT_ROOT + '/model_save/sft_fast/train_latest_state_sft_fast'
    output_dir: str = PROJECT_ROOT + '/model_save/sft_fast'

    logging_steps: int = 100
    save_steps: int = 521

    keep_latest_n_ckp: int = 3

    seed: int = 23333
    dataloader_buffer_size: int = 50000
    max_seq_len: int = 512


# ===================================================================================
# SFT for 3 x 20 GB GPUs and 56 CPU cores. No flag of train_low_mem.py selects it
# (configs/legacy/low_mem_sft_ultra.yaml is its Lightning equivalent).
@dataclass
class TrainConfigSFTUltra:
    epochs: int = 8
    batch_size_per_gpu: int = 24

    learn_rate: float = 5e-5
    div_factor: int = 25

    mixed_precision: str = "bf16"

    gradient_accumulation_steps: int = 2

    warmup_steps: int = 100

    max_grad_norm: float = 1.0

    tokenizer_dir: str = PROJECT_ROOT + '/model_save/my_tokenizer_sp/'
    model_file: str = PROJECT_ROOT + '/model_save/sft_ultra/chat_small_t5.{}.bin'
    model_config_file: str = PROJECT_ROOT + '/model_save/sft_ultra/model_config.json'

    train_file: str = PROJECT_ROOT + '/data/sft_train_small_train.parquet'
    validation_file: str = PROJECT_ROOT + '/data/sft_train_small_valid.parquet'
    test_file: str = PROJECT_ROOT + '/data/sft_test_dataset.parquet'

    finetune_from_ckp_file: str = PROJECT_ROOT + '/model_save/chat_small_t5.best.bin'

    train_state_dir: str = PROJECT_ROOT + '/model_save/sft_ultra/train_latest_state_sft_ultra'
    output_dir: str = PROJECT_ROOT + '/model_save/sft_ultra'

    logging_steps: int = 10
    save_steps: int = 52

    keep_latest_n_ckp: int = 3

    seed: int = 23333
    dataloader_buffer_size: int = 50000
    max_seq_len: int = 512

    dataloader_num_workers: int = 32
    dataloader_pin_memory: bool = True

    use_torch_compile: bool = True
    compile_mode: str = "default"                   # dynamic shapes: generate() changes lengths

    gradient_checkpointing: bool = False
    gradient_clip_algo: str = "norm"


# ===================================================================================
# Pretraining on a large data set, 3 x 20 GB GPUs + 12 GB RAM (train --use_large_config=True)
@dataclass
class TrainConfigPretrainLarge:
    epochs: int = 6
    batch_size_per_gpu: int = 32

    learn_rate: float = 0.00015
    div_factor: int = 50

    mixed_precision: str = "bf16"

    # effective batch = 32 * 3 (GPUs) * 2 = 192
    gradient_accumulation_steps: int = 2

    warmup_steps: int = 1024

    max_grad_norm: float = 1.0

    tokenizer_dir: str = PROJECT_ROOT + '/model_save/my_tokenizer_sp/'
    model_file: str = PROJECT_ROOT + '/model_save/pretrain_large/chat_small_t5.{}.bin'
    model_config_file: str = PROJECT_ROOT + '/model_save/pretrain_large/model_config.json'

    train_file: str = PROJECT_ROOT + '/data/my_train_dataset_6m.parquet'
    validation_file: str = PROJECT_ROOT + '/data/my_valid_dataset.parquet'
    test_file: str = PROJECT_ROOT + '/data/my_test_dataset.parquet'

    finetune_from_ckp_file: str = PROJECT_ROOT + '/model_save/chat_small_t5.best.bin'

    train_state_dir: str = PROJECT_ROOT + '/model_save/pretrain_large/train_latest_state'
    output_dir: str = PROJECT_ROOT + '/model_save/pretrain_large'

    logging_steps: int = 100
    save_steps: int = 5000

    keep_latest_n_ckp: int = 5

    seed: int = 23333
    dataloader_buffer_size: int = 5000
    max_seq_len: int = 192


# ===================================================================================
# The model (always these defaults in the original; the shim lets --field=value override)
@dataclass
class T5ModelConfig:
    d_ff: int = 3072                        # feed-forward width

    d_model: int = 768                      # hidden width
    num_heads: int = 12                     # d_model // num_heads == d_kv
    d_kv: int = 64

    num_decoder_layers: int = 10
    num_layers: int = 10                    # encoder layers

    dropout_rate: float = 0.1               # T5's default (the original never set it)
