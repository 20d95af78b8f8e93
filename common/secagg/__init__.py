"""Secure aggregation (issue 30): the server learns only the sum of the clients' uint64 vectors.

- ``fixedpoint``: floats to and from integers mod 2^64, with the run's announced scale;
- ``plan``: per aggregation method, what each client uploads in each masked pass and how the
  server turns the unmasked sums into the round's result (the two-pass range finder).
"""
