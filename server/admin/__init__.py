"""``flora-admin``: what an operator runs beside a flora-server: provisioning, console, reports."""
