"""Token-by-token decoding baseline: a decoder-only transformer that writes its action plan as tokens."""
