"""What training and inference both run on: device and precision, the CUDA launch lock, host copies and batched prediction."""
