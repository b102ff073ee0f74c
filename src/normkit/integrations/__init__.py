"""Integrations with training frameworks, each an optional dependency imported only by its own module.

- :mod:`normkit.integrations.lightning`: Lightning callbacks (the doctor at fit start, the monitor, precise BN and
  AdaBN before validation, freezing for fine-tuning); needs ``pip install 'normkit[lightning]'``.

Nothing is imported here, so ``import normkit`` never imports a framework.
"""

__all__: list[str] = []
