"""Grammar-constrained decoding: a grammar compiled per schema (`GrammarCompiler`), a matcher per
request (`GrammarMatcher`) whose token mask the sampling pipeline applies as one more logits step
and which the scheduler advances with every accepted token."""

from astrai_serve.constrained.grammar import (
    INSTALL_HINT,
    Grammar,
    GrammarCompiler,
    GrammarError,
    GrammarMatcher,
    GrammarUnavailable,
)

__all__ = ["INSTALL_HINT", "Grammar", "GrammarCompiler", "GrammarError", "GrammarMatcher",
           "GrammarUnavailable"]
