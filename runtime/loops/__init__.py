"""kandinsky_trt.runtime.loops: the loop of slots and the two storages it runs on.

``slots`` holds the loop (admit a row into a free slot, step every slot at its own table position,
retire finished rows; the per-row contract); ``host`` is its storage on numpy arrays through
``NetworkSession.run`` (every backend), ``device`` its storage on buffers bound once through the
``DeviceBackend`` interface (ONNX Runtime IO binding with its CUDA graphs, TensorRT with captured
graphs: one strategy for both). ``factory.make_loop`` picks the storage, one loop per (spec,
profile); ``template`` keeps the pipelines' chunk type and its split into rows. On a device storage a row's
conditioning may be device rows (a stage output left on the device) and finished rows may retire
into device rows instead of being downloaded (``SlotLoop.run(into=...)``). ``sized`` keeps one loop
per exported batch of a network and size and steps the smallest holding the occupied slots, moving
rows between them with their state (``SlotLoop.move``; the storages' ``rows``).

May import ``contract``, ``cuda`` and the backend interface (``backends.base``); never pipelines.
"""
