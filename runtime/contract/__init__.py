"""kandinsky_trt.runtime.contract: what an artifacts directory promises, stated once.

Owns the component spec (every network's tensors and the denoising loops that wire them), the
dtype table, ``manifest.json`` (its dataclasses, JSON Schema, range rules and file integrity), the
scheduler coefficient tables and the project's exception roots. Every other layer, the C++ host
included (``runtime/cpp``), reads the contract from here.

The contract is per row (manifest schema 4): every per-step value has one entry per batch row, so
the rows of one network call may each be at their own step of their own scheduler table with their
own guidance. The loop networks (``prior``, ``unet``, ``unet_inpaint``) take ``timestep`` ``(B2,)``:
rows ``j`` and ``j + B`` are one request's uncond / cond pair (with classifier-free guidance; without
it ``B2 = B``). The step graphs take ``coefficients`` ``(B, K)`` (row ``b``: the coefficient-table row
that latents row ``b`` is at, ``K = len(spec.COEFFICIENT_COLUMNS)``), ``guidance_scale`` ``(B, 1)`` and
``noise`` ``(B, *latent)``; ``schedulers.apply_step`` is their numpy reference, row by row. The
bridge graphs (``spec.BRIDGE_NETWORKS``: ``prior_embeds``, ``img2img_start``, ``inpaint_start``) are
the elementwise maths between two stages, per row as well; a manifest may lack them (artifacts
exported before them), and then the host does that maths.

May import the standard library and numpy only (``spec`` and ``manifest`` not even numpy): nothing
else of the runtime, so any layer can depend on it.
"""
