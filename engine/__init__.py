"""ONNX graphs → TensorRT plans (``kandinsky_trt.engine``).

``builder`` (:class:`~kandinsky_trt.engine.builder.BuildConfig`,
:func:`~kandinsky_trt.engine.builder.build_engines`) validates arguments and keeps the manifest's
``engine`` entries; ``polygraphy_builder`` builds a plan on Polygraphy's loaders; ``plan`` holds the
types both share; ``commands`` the ``build`` CLI command; ``errors`` the exceptions. Nothing is
imported here, so ``import kandinsky_trt.engine`` never loads Polygraphy or TensorRT.
"""
