"""Console entry point joining the ``pose``, ``lut_service`` and ``search`` command lines."""
