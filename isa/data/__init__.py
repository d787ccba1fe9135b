"""Data: image decoding, benchmark readers and the synthetic world."""
