"""Models: the sparse arch of torchrec tables under a dense head.

- ``dlrm``: ``MetaDLRM``, the model every algorithm trains (tables, default rows for rare
  ids, the head, the optional id generator); ``build_model`` from a config.
- ``layers``: what heads are made of (``MetaLinear``, MLPs, interactions, cross layers);
  ``heads/``: one module per ``model.arch``.
- ``managed``: managed-collision id tables (``features.sparse[].ids: managed``);
  ``generator``: a network that makes the first row of a new id from its attributes.

``layers`` and ``heads/`` are units of a lower layer than the rest: built from plain
arguments and torch alone, so that the config can build a head to check the names
``meta.adapt_dense`` gives.

May import: gmeta.version, gmeta.logs, gmeta.storage, gmeta.metrics, gmeta.layout,
gmeta.types, gmeta.tracking, gmeta.models.layers, gmeta.models.heads, gmeta.config,
gmeta.io.
"""
