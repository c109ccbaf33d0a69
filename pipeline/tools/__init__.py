"""Stand-alone tools (model conversion and the like), each runnable with ``python -m``."""
