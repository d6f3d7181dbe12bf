"""Int4 checkpoint format, quantized linear layer and its backends, loader, kernel benchmark."""
