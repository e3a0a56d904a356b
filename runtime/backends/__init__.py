"""kandinsky_trt.runtime.backends: the backend interface at two levels, and its implementations.

``base`` declares the interface (host level ``load(network, profile).run(feeds)``; device level
``allocate``, ``bind(network, buffers, profile).enqueue(stream)``, ``write_rows``, ``runner``,
``read``, ``free``; ``DeviceRows``, rows of a device buffer that ``write_rows`` takes as a source);
``resident`` binds stage networks once on a device backend and leaves their outputs on the device
(``ResidentStages``); ``ort`` and ``ort_cuda`` run ONNX Runtime (``ort`` on ``cuda`` is the device
backend ``OrtCudaBackend``: one session per network for host runs and bound loops), ``trt`` and
``trt_network`` TensorRT plans (one engine per network). The ``torch`` backend (the parity oracle)
needs torch and so lives in ``kandinsky_trt.export.torch_backend``, registered through the
``kandinsky_trt.backends`` entry point. Loops are built by the loops layer, never here.

May import ``contract`` and ``cuda`` (never ``loops``); onnxruntime, tensorrt and cuda-python only
inside the functions that need them.
"""
