"""kandinsky_trt.runtime.pipelines: the diffusers-shaped pipelines on loaded artifacts.

Owns :class:`~kandinsky_trt.runtime.pipelines.components.Components` (one artifacts directory,
every network loaded once), the argument validators shared by every entry point (``inputs``), the
prior, decoder (text2img, img2img, inpaint) and combined pipelines, and a build-once cache.

May import ``contract``, ``processing``, ``backends`` and ``loops``; never ``cli`` or ``serve``,
which are built on it.
"""
