"""Searches: the prefix cache and fast fake quant they run on, the scores, the paper recipe
(``stablequant``), the default recipe (``layerwise``), mixed precision, the auto_quantize bridge,
and the ModelOpt configs they emit (``qconfig``)."""
