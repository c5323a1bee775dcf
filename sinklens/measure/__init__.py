"""Measuring sinks on a dense model: the census engines (eager patterns, fused-kernel LSE), massive
activations, sink-specialized heads and sinks against context length. Imports only ``core``."""
