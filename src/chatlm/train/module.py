"""ChatLM: the LightningModule of the main path.

Run it through the CLI: ``python -m src fit --config configs/demo.yaml``.

The module is deliberately thin: the model comes from :mod:`chatlm.model` (which knows
nothing of Lightning), optimizers and schedules from :mod:`chatlm.model.optim`, BLEU-4 from
:mod:`chatlm.infer.metrics` and generation from :mod:`chatlm.infer.generation`. Training, validation
and test share one ``_shared_step``.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning as L
import torch

from chatlm.infer import generation as gen
from chatlm.infer.metrics import bleu4
from chatlm.model.adafactor import lean_optimizer
from chatlm.model.build import Arch, compile_blocks, count_parameters, is_seq2seq
from chatlm.model.config import Evaluation, LoRA, ModelShape, Optimization, as_group, group_dict
from chatlm.model.optim import build_optimizer, build_scheduler
from chatlm.model.setup import make_model


def count_tokens(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(padded tokens, non-pad tokens) that a batch feeds the model, encoder and decoder side."""
    total = batch["input_ids"].numel()
    nonpad = int(batch["attention_mask"].sum())
    labels = batch["labels"]
    if labels.shape != batch["input_ids"].shape:  # seq2seq: the decoder side counts too
        total += labels.numel()
        nonpad += int((labels != -100).sum())
    return total, nonpad


def split_prompts_for_generation(batch: dict[str, torch.Tensor], pad_id: int, seq2seq: bool):
    """Generation inputs and reference label ids, taken from a training-format batch
    (None when a row has no prompt, as in plain-text pretraining).

    Seq2seq: the encoder input is the prompt as is. Causal: the prompt is the part whose
    labels are masked (-100) and attended; it is left-padded so ``generate`` continues it.
    """
    labels = batch["labels"]
    if seq2seq:
        return batch["input_ids"], batch["attention_mask"], labels
    prompt_mask = (labels == -100) & batch["attention_mask"].bool()
    rows = [ids[m] for ids, m in zip(batch["input_ids"], prompt_mask)]
    if any(len(r) == 0 for r in rows):
        return None  # plain-text (pretraining) rows: no prompt to answer, nothing to score
    width = max(1, max(len(r) for r in rows))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=labels.device)
    attention = torch.zeros_like(input_ids)
    for i, r in enumerate(rows):
        if len(r):
            input_ids[i, width - len(r):] = r
            attention[i, width - len(r):] = 1
    return input_ids, attention, labels


class ChatLM(L.LightningModule):
    """A T5 (seq2seq) or Llama-style (causal) chat model, trained from scratch or fine-tuned.

    Args:
        arch: ``t5`` (encoder-decoder, prompt to the encoder) or ``llama`` (decoder-only).
        pretrained: Start from these weights: a Hugging Face model directory, a legacy
            state-dict ``.bin`` or a Lightning ``.ckpt``; None builds a new model of ``shape``.
            Loaded safely (safetensors or ``weights_only=True``).
        trust_remote_code: Allow a Hugging Face directory to run its own code. Off: only
            turn it on for a model you trust.
        vocab_size: Vocabulary size. Linked from ``data.vocab_size`` (the tokenizer), so a
            new tokenizer resizes a new model automatically.
        pad_token_id: Pad id (linked from the tokenizer).
        eos_token_id: End-of-sequence id (linked from the tokenizer).
        shape: The size of a new model (``--model.shape.d_model`` ...; the flat
            ``--model.d_model`` still works).
        optim: Optimizer, learning rate, schedule and loss normalisation (``--model.optim.lr``
            ...; the flat ``--model.lr``, ``--model.optimizer`` still work).
        lora: LoRA adapters (``--model.lora.r 8``; the flat ``--model.lora_r`` still works).
        evaluation: What each validation generates and scores beside the loss.
        gradient_checkpointing: Recompute activations in backward: much less activation
            memory for ~30% more compute.
        freeze: Freeze parameters whose names start with these prefixes (the legacy T5
            SFT freezes ``[shared, encoder]``, which also freezes the tied output head).
        compile: ``torch.compile`` each transformer block (regional compilation: identical
            blocks share one graph; the first step is slow while it compiles). Generation
            runs eager. On a CPU it rarely pays: measured in docs/performance.md.
    """

    def __init__(
        self,
        arch: Arch = "t5",
        pretrained: Optional[str] = None,
        trust_remote_code: bool = False,
        vocab_size: int = 32128,
        pad_token_id: int = 0,
        eos_token_id: int = 1,
        shape: ModelShape = ModelShape(),
        optim: Optimization = Optimization(),
        lora: LoRA = LoRA(),
        evaluation: Evaluation = Evaluation(),
        gradient_checkpointing: bool = False,
        freeze: Optional[list[str]] = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.shape = as_group(ModelShape, shape)
        self.optim = as_group(Optimization, optim)
        self.lora = as_group(LoRA, lora)
        self.evaluation = as_group(Evaluation, evaluation)
        # Plain values only in checkpoints (they load with weights_only=True).
        self.save_hyperparameters({
            "arch": arch, "pretrained": pretrained, "trust_remote_code": trust_remote_code,
            "vocab_size": vocab_size, "pad_token_id": pad_token_id, "eos_token_id": eos_token_id,
            "shape": group_dict(self.shape), "optim": group_dict(self.optim), "lora": group_dict(self.lora),
            "evaluation": group_dict(self.evaluation), "gradient_checkpointing": gradient_checkpointing,
            "freeze": list(freeze) if freeze else None, "compile": compile,
        })
        self.model = make_model(arch, vocab_size, pad_token_id, eos_token_id, self.shape, pretrained=pretrained,
                                lora=self.lora, freeze=freeze, gradient_checkpointing=gradient_checkpointing,
                                trust_remote_code=trust_remote_code)
        self.seq2seq = is_seq2seq(self.model)
        if compile:
            compile_blocks(self.model)
        trainable, total = count_parameters(self.model)
        self.param_counts = {"trainable": trainable, "total": total}
        # Per micro-batch bookkeeping, read by the callbacks (chatlm.train.callbacks).
        self.last_micro: dict[str, float] = {}
        self._window_tokens = 0.0
        self._bleu = torch.zeros(2)  # (sum of scores, count) this validation epoch

    # ------------------------------------------------------------------ steps
    def forward(self, batch: dict[str, torch.Tensor]):
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"])

    def _shared_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        out = self(batch)
        loss = out.loss
        ntok = (batch["labels"] != -100).sum()
        if not self.seq2seq:  # the causal model shifts: the first label never counts
            ntok = (batch["labels"][:, 1:] != -100).sum()
        bs = batch["input_ids"].shape[0]
        if stage == "train":
            total, nonpad = count_tokens(batch)
            self.last_micro = {"loss": float(loss.detach()), "label_tokens": float(ntok),
                               "tokens": total, "nonpad_tokens": nonpad}
            if not math.isfinite(self.last_micro["loss"]):
                raise FloatingPointError(
                    f"non-finite training loss ({self.last_micro['loss']}) at step "
                    f"{self.global_step + 1}: lower --model.lr or check the data")
            self.log("train_loss", loss.detach(), prog_bar=True, batch_size=bs)
            return self._loss_for_backward(loss, ntok)
        self.log(f"{stage}_loss", loss, prog_bar=True, batch_size=bs, sync_dist=True)
        return loss

    def _loss_for_backward(self, loss: torch.Tensor, ntok: torch.Tensor) -> torch.Tensor:
        """The loss whose gradient Lightning accumulates (it divides it by accumulation)."""
        if self.optim.loss_normalization == "window_tokens":
            if self._window_is_one_micro_batch():
                return loss  # the token mean of the only micro-batch: already the window's mean
            # Sum over tokens now; on_before_optimizer_step divides by the window's tokens.
            self._window_tokens += float(ntok)
            return loss * ntok
        if self.optim.legacy_accumulation_scaling:
            return loss / self.trainer.accumulate_grad_batches
        return loss

    def training_step(self, batch, batch_idx):
        return self._shared_step(batch, "train")

    def validation_step(self, batch, batch_idx):
        loss = self._shared_step(batch, "val")
        self._score_bleu(batch)
        return loss

    def test_step(self, batch, batch_idx):
        loss = self._shared_step(batch, "test")
        self._score_bleu(batch)
        return loss

    # ------------------------------------------------------------------ BLEU-4
    def _tokenizer(self):
        dm = getattr(self.trainer, "datamodule", None)
        return getattr(dm, "tokenizer", None)

    def _score_bleu(self, batch) -> None:
        tok = self._tokenizer()
        room = self.evaluation.bleu_max_samples - int(self._bleu[1])
        if tok is None or room <= 0:
            return
        split = split_prompts_for_generation(batch, self.hparams.pad_token_id, self.seq2seq)
        if split is None:
            return
        input_ids, attention, labels = split
        input_ids, attention, labels = input_ids[:room], attention[:room], labels[:room]
        outputs = gen.generate_answers(self.model, tok, input_ids, attention,
                                       preset=self.evaluation.generation_preset,
                                       max_new_tokens=self.evaluation.max_new_tokens)
        refs = tok.batch_decode(labels.masked_fill(labels == -100, tok.pad_token_id),
                                skip_special_tokens=True)
        for ref, out in zip(refs, outputs):
            self._bleu += torch.tensor([bleu4(ref.strip(), out), 1.0])

    def on_validation_epoch_start(self) -> None:
        self._bleu = torch.zeros(2)

    on_test_epoch_start = on_validation_epoch_start

    def _log_bleu(self, stage: str) -> None:
        if self.evaluation.bleu_max_samples <= 0 or self._tokenizer() is None:
            return
        totals = self.trainer.strategy.reduce(self._bleu.to(self.device), reduce_op="sum")
        score = totals[0] / totals[1].clamp(min=1)
        self.log(f"{stage}_bleu4", score, prog_bar=True, sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        self._log_bleu("val")

    def on_test_epoch_end(self) -> None:
        self._log_bleu("test")

    # ------------------------------------------------------------------ optimization
    def _window_is_one_micro_batch(self) -> bool:
        """One micro-batch per optimizer step on one device: its token-mean loss is the window's."""
        trainer = self._trainer
        return trainer is not None and trainer.accumulate_grad_batches == 1 and trainer.world_size == 1

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.optim.loss_normalization != "window_tokens" or self._window_is_one_micro_batch():
            return
        # Gradients hold sum(CE) / accumulation (averaged over devices); rescale them to
        # mean(CE over every label token of the window on every device).
        tokens = torch.tensor(self._window_tokens, device=self.device)
        world = self.trainer.world_size
        if world > 1:
            tokens = self.trainer.strategy.reduce(tokens, reduce_op="sum")
        scale = self.trainer.accumulate_grad_batches * world / tokens.clamp(min=1.0)
        for p in self.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
        self._window_tokens = 0.0

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None) -> None:
        """Norm clipping everywhere; under FSDP through the sharded module's own global norm
        (Lightning's FSDP precision plugin refuses norm clipping)."""
        from lightning.pytorch.strategies import FSDPStrategy

        if gradient_clip_val and isinstance(self.trainer.strategy, FSDPStrategy) \
                and gradient_clip_algorithm in (None, "norm"):
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val,
                            gradient_clip_algorithm=gradient_clip_algorithm)

    def configure_optimizers(self):
        hp = self.optim
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = build_optimizer(hp.optimizer, params, lr=hp.lr,
                                    weight_decay=hp.weight_decay, betas=tuple(hp.betas))
        optimizer = lean_optimizer(optimizer)  # Adafactor: same updates, less memory traffic
        total = hp.scheduler_total_steps or int(self.trainer.estimated_stepping_batches)
        scheduler = build_scheduler(hp.scheduler, optimizer, total_steps=max(1, total),
                                    warmup_steps=hp.warmup_steps, lr=hp.lr,
                                    div_factor=hp.div_factor)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint made for another vocabulary / size is refused in one line (chatlm.checkpoint.preflight)."""
        from chatlm.checkpoint.preflight import check_checkpoint_fits

        trainer = self._trainer
        check_checkpoint_fits(self, checkpoint, getattr(trainer, "ckpt_path", None) if trainer else None)

    # ------------------------------------------------------------------ export
    def hf_model(self):
        """The underlying Hugging Face model (unwrapped from a whole-model torch.compile)."""
        return getattr(self.model, "_orig_mod", self.model)
