"""The benchmark harness (``python -m src bench``): every engine -- the main path and the
legacy shims in ``legacy/`` -- measured the same way, from outside its code.

It lives beside ``legacy/``, outside the installed package: no ``fit`` imports it.

* :mod:`bench.run` -- cases, the fork server that runs them, analysis, report (``bench.json``)
* :mod:`bench.probe` -- StepProbe (times any engine), matmul peak, model FLOPs
* :mod:`bench.lockstep` -- two engines taking turns, one optimizer step each
* :mod:`bench.gpu` -- the plain-loop GPU benchmark
"""
