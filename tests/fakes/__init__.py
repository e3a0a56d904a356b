"""Stand-ins for TensorRT and the CUDA runtime, shared by every test that needs them.

* :mod:`fakes.tensorrt`: the one stand-in ``tensorrt`` module, builder side (networks, parser,
  configs, plans: the engine-build tests) and runtime side (engines, execution contexts: the
  backend and loop tests), with :func:`fakes.tensorrt.install`;
* :mod:`fakes.cuda`: simulated device memory, streams, device buffers and a CUDA layer whose
  stream capture records operations and whose graph launch replays them;
* :mod:`fakes.plan_artifacts`: artifacts directories whose plans the stand-in runtime deserializes.

They check our logic against our reading of the documented TensorRT 10.x/11.x and CUDA runtime
APIs, not TensorRT or CUDA themselves. Imported as ``fakes.<module>`` (tests/ is on sys.path).
"""
