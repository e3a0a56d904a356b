"""Backends behind one interface (``base.py``): ``ort``, ``torch``, ``trt``."""
