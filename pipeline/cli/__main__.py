"""`python -m pipeline.cli`: the same as the `tune` entry point."""

from pipeline.cli import app

if __name__ == "__main__":
    app()
