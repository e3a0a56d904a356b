"""ONNX graphs → TensorRT plans (``kandinsky_trt.engine``).

``builder`` (:class:`~kandinsky_trt.engine.builder.BuildConfig`,
:func:`~kandinsky_trt.engine.builder.build_engines`) validates arguments and keeps the manifest's
``engine`` entries; ``trt_builder`` holds the TensorRT calls; ``errors`` the exceptions. Nothing
is imported here, so ``import kandinsky_trt.engine`` never loads TensorRT.
"""
