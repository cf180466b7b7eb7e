"""The model: build (:mod:`.build`), LoRA (:mod:`.lora`), load (:mod:`.load`), export
(:mod:`.export`), optimizers and schedules (:mod:`.optim`, :mod:`.adafactor`). No Lightning here."""
