"""Reports render results: JSON (machine) + markdown (person) + PNG plots, each written atomically.

Nothing here runs a search: a search returns a result object, and ``compare`` composes both.
"""

from .common import REAPPLY, SYSTEM_NAMES, ci_text, markdown_table, short_layer
from .compare import compare_markdown, write_compare_outputs
from .mixed import mixed_compare_markdown, mixed_markdown, write_mixed_outputs
from .quantize import quantize_markdown, write_quantize_outputs

__all__ = ["REAPPLY", "SYSTEM_NAMES", "ci_text", "compare_markdown", "markdown_table", "mixed_compare_markdown",
           "mixed_markdown", "quantize_markdown", "short_layer", "write_compare_outputs", "write_mixed_outputs",
           "write_quantize_outputs"]
