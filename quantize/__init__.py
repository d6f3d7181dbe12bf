"""GPTQ pipeline: model sources, layouts, calibration, the algorithm, checkpoint writer, CLI."""
