"""Throughput on this device, measured side by side: ``python -m jobs.bench [--size 256] [--smoke]``.

No Ray (except the driver section), no download: models are built from the public SD 1.5 configs
with random weights (speed does not depend on the values), plus the shipped toy-world model.
Every comparison is interleaved (A, B, C, A, B, C…) in one process, so the machine's noise hits
all variants alike; every gain is a ratio of the same run. Results go to
``benchmarks/<device>.json`` and a markdown table to stdout; ``benchmarks/README.md`` has the method
and the recorded tables.

Sections, one module each: ``matmul`` (the device's dense rate, always: the larger of a matmul's and a 3×3
convolution's, what MFU is taken against; :mod:`.measure`), ``toy`` and ``train`` (the diffusers recipe,
:mod:`.recipe`, against tinv with each optimisation switched on in turn, on the toy model and the SD 1.5 shape;
:mod:`.training`), ``methods`` (``ti``, ``lora`` and ``pivotal`` at K=1 and K=4) and ``preservation``
(``pivotal`` with each prior preservation) on both, ``generate`` (batched across concepts against
``load_textual_inversion`` + one pipeline call per concept; :mod:`.generate`), ``train-sampling`` (the train
job's samples: a call per finished concept from its copies, against the finished concepts drawn together from
the trainer's live slots; :mod:`.sampling`), ``driver`` (plan, dispatch, account and write results for N
concepts with a no-op trainer on a local Ray instance; :mod:`.driver`), ``writes`` (the trainer actor's step
rate with slow storage; :mod:`.writes`), ``fingerprint`` (:mod:`.fingerprint`) and ``projection`` (the FLOP
model; :mod:`.flops`). The toy world's schedule sections are the lab's: ``python -m lab.bench.schedule``.
"""
