"""kandinsky_trt.runtime.scheduling: step-level scheduling of requests over the loops' slots (issue 20).

One :class:`~.scheduler.Scheduler` owns the work. A request is queued, then passes the stages
``encode`` (text encoders, and the MoVQ encoder for an init image) → ``prior`` (loop) → ``decoder``
(loop) → ``decode`` (MoVQ). The loop stages run as slots: at every step boundary finished rows are
retired and waiting rows admitted into free slots, whatever their step counts, schedulers, guidance
or tasks; the one-shot stages run as batched calls. What a stage does on the hardware is an
:class:`~.executor.Executor`'s business, the time an injected :class:`~.clock.Clock`'s, so the same
scheduler code serves requests (a runtime executor, the wall clock) and predicts them (a cost-model
executor, a simulated clock: ``kandinsky_trt.benchmarks.sched_sim``).

Modules: ``work`` (the request, its stages, the errors), ``clock``, ``executor`` (the protocol),
``admission`` (step-level and request-level admission policies), ``metrics``, ``scheduler``.

Standard library only, and ``contract`` (the exception root); no numpy, no networks, no Triton.
"""
