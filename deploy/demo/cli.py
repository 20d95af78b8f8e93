import argparse


def main() -> None:
    argparse.ArgumentParser(description="not yet implemented").parse_args()
