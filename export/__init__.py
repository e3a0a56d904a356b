"""kandinsky_trt.export: diffusers checkpoints (torch) -> ONNX graphs + manifest.

May import kandinsky_trt.runtime (the spec, the manifest, the torch wrappers); never the engine.
"""
