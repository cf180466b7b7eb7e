"""Using a trained model: generation presets (:mod:`.generation`), BLEU-4 (:mod:`.metrics`) and
batch answers (:mod:`.predict`)."""
