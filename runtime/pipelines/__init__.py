"""kandinsky_trt.runtime.pipelines: the diffusers-shaped pipelines on loaded artifacts.

What is loaded and what runs are two classes:

- :class:`~.loaded.LoadedArtifacts` (``loaded``): one artifacts directory, loaded once and cached —
  the manifest, the backend and its network sessions, the tokenizers, the constants, the scheduler
  tables; it runs nothing;
- :class:`~.components.Components`: holds one ``LoadedArtifacts`` (``components.loaded``) and runs
  the work of a request on it — a stage network (``run``), one chunk of a denoising loop
  (``denoise``), rows split into the profiles' batches (``chunks``), the profile of given shapes.
  It is the public handle (``Components(artifacts)``, ``with Components(...) as c``, the pipelines'
  ``components=``); the pipelines built on one instance share every loaded network. On TensorRT
  its ``resident_chain`` (``resident``) keeps stage outputs on the device from the text encoders
  to the MoVQ output, the prior's embeddings of a combined pipeline (post-processed by the
  ``prior_embeds`` bridge graph) and img2img's and inpainting's start (their bridge graphs) included:
  one download (and host sync) per chunk of images.

A call takes one typed request per stage (``requests``): a caller's arguments, as given, go into a
settings dataclass (``PriorSettings``, ``DecoderSettings`` with the decoder's own ``Text2ImgInputs``
/ ``Img2ImgInputs`` / ``InpaintInputs``, ``InterpolateSettings``), a builder checks them once into a
frozen request (``PriorRequest``, ``DecoderRequest`` — the image embeddings attached last by
``with_embeddings`` —, ``CombinedRequest`` = a prior and a decoder request sharing one generator,
``InterpolateRequest``), and the pipeline's ``run`` runs it. Each diffusers-shaped ``__call__``
(the prior, the decoders, the combined pipelines) builds its request from its own named arguments;
the CLI and the server build the same requests directly. ``inputs`` holds the argument validators
shared by every builder (errors name the public argument), ``once`` the build-once cache.

May import ``contract``, ``processing``, ``backends`` and ``loops``; never ``cli`` or ``serve``,
which are built on it.
"""
