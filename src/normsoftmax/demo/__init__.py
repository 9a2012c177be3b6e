"""The embedded demo: a glyph dataset rendered on the spot (:mod:`.glyphs`), trained on and evaluated by
:func:`run_demo` (:mod:`.command`)."""

from .command import run_demo

__all__ = ["run_demo"]
