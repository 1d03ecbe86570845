"""Discovery rules: each maps ``(qualified_name, module)`` to the taps of a residual block, or ``None``.

``native`` (spp's own models), ``vision`` (torchvision, timm), ``transformers`` (HuggingFace layers, read from
their forward's source), ``traced`` (the torch.fx fallback). The ordered list
of rules that ``find_taps`` tries by default is ``spp.discovery.DEFAULT_RULES``.
"""
