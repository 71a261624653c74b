"""Model families: 3D-SAutoMed (``sautomed.models.sautomed``) and shared SAM pieces (``.sam``)."""
