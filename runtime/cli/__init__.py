"""kandinsky_trt.runtime.cli: the ``kandinsky-trt`` command line.

Owns the argument parser and the runtime's own commands (``main``: generate, interpolate), the
checks that need no artifacts (``checks``) and where generated images are written
(``output_paths``). Commands of the other packages (export, engine, benchmarks, serve) register
themselves through the ``kandinsky_trt.commands`` entry points (``pyproject.toml``), so this
package never imports an upper layer.

May import every other runtime package.
"""
