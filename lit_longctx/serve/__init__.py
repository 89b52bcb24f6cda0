"""``lit-longctx serve``: completions, embeddings and tokens over HTTP for any method's checkpoint.

:mod:`.engine` runs requests on the model through its method's decoding session, :mod:`.schemas` validates bodies,
:mod:`.app` is the FastAPI application (limits, streaming, cancellation), :mod:`.server` the command.
"""

from lit_longctx.serve.server import serve

__all__ = ["serve"]
