"""The engine: θ_for = (1+α)·θ_ref − α·θ_mem over safetensors checkpoints of any size, streamed
out of core under a fixed memory budget. Needs numpy and the C loop only; torch and transformers
are never imported on the CPU path (torch_path and the GPU kernels load torch when asked)."""
