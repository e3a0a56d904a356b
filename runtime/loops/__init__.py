"""kandinsky_trt.runtime.loops: the loop of slots — every batch row at its own step.

``slots`` holds the loop once (:class:`~kandinsky_trt.runtime.loops.slots.SlotLoop`): a profile's
``B`` rows are slots; a request row (:class:`~kandinsky_trt.runtime.loops.slots.LoopRow`: latents,
conditioning rows, its own scheduler table, guidance scale and noise rows) is admitted into a free
slot at any step boundary, every occupied slot advances one step of its own table per network call
(the per-row contract: ``timestep (B2,)``, ``coefficients (B, K)``, ``guidance_scale (B, 1)``), and
finished rows are retired. The pipelines' chunked call is the same loop with every row admitted at
once. Where the buffers live is a storage's business: ``host`` (numpy arrays through
``NetworkSession.run``, every backend) or the device storage (buffers bound once on a
``DeviceBackend``). ``factory.make_loop`` picks it, so backends never import loops.
``template`` keeps the chunk inputs the pipelines build (``LoopInputs``, ``chunk_rows``).

May import ``contract``, ``cuda`` and the backend interface (``backends.base``); never pipelines.
"""
