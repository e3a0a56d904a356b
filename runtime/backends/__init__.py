"""kandinsky_trt.runtime.backends: the backend interface at two levels, and its implementations.

``base`` declares the interface (host level ``load(network, profile).run(feeds)``; device level
``bind(network, buffers, profile).enqueue(stream)``; ``loop(spec, profile, cuda_graph)``); ``ort`` and
``ort_cuda`` run ONNX Runtime, ``trt`` and ``trt_network`` TensorRT plans. The ``torch`` backend (the parity
oracle) needs torch and so lives in ``kandinsky_trt.export.torch_backend``, registered through the
``kandinsky_trt.backends`` entry point.

May import ``contract``, ``cuda`` and ``loops``; onnxruntime, tensorrt and cuda-python only inside
the functions that need them.
"""
