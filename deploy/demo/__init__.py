"""flora-demo: a real server and real clients on this machine, with sample data and a report."""
