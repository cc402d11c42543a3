"""pluggy hook specifications: how calibrators become selectable by name.

Built-in calibrators (``calibrators.plugin``) and third-party packages (entry-point group
``sq_plugin``) implement the same hook, so there is one path for every calibrator.
"""

from __future__ import annotations

import pluggy

PROJECT = "sq_plugin"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class CalibratorSpec:
    @hookspec
    def sq_register_calibrators(self) -> dict[str, type]:
        """Return ``{name: calibrator_class}``.

        Each class follows ModelOpt's calibrator API (``collect``, ``reset``, ``compute_amax``) and
        accepts ``num_bits``, ``axis`` and ``unsigned`` as its first constructor arguments.
        """
