"""The networks: the family registry (family.py), what the families share (layers, request, checkpoint, session,
generate, tiny) and one package per family (awaker/, moe_llava/)."""
