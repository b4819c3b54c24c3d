"""Reading, checking, splitting and batching the texts and their targets."""
