"""Discovery rules: plain functions ``(qualified_name, module) -> list[Tap] | None``, grouped by library."""
