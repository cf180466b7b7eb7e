"""Training on the main path: the CLI (:mod:`.cli`), the LightningModule (:mod:`.module`), the
run-directory callbacks (:mod:`.callbacks`, :mod:`.losslog`), exact resume (:mod:`.resume`),
guards (:mod:`.guards`), multi-process settings (:mod:`.distributed`) and the memory planner
(:mod:`.plan`)."""
