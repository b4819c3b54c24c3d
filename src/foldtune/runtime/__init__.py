"""What training and inference both run on: device and precision, the CUDA turn, host copies and batched prediction."""
