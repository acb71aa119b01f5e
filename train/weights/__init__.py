"""Model weights in and out: safetensors and official ``.pth`` files, ZeRO
checkpoint consolidation (`mae export`), and loading whatever a user points at."""
