"""kandinsky_trt.runtime.processing: host-side pre- and post-processing, without torch.

Owns image processing (``images``: resize, crop, normalise, masks, the uint8 output) and text
tokenization (``tokenization``: the two 77-token tokenizers from their saved files), each
reproducing the diffusers / transformers step it replaces.

May import ``contract``, numpy, PIL and ``tokenizers``; nothing else of the runtime.
"""
