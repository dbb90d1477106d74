"""tinv: bulk Textual Inversion. Importing it starts nothing; see ``tinv.train`` for the core."""

__version__ = "0.1.0"
