"""ComfyUI node classes of the pack (thin: translate inputs and outputs, validate)."""
