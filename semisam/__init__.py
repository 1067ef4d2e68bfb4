"""The application: the ``semisam`` command and the composition of the library (``pipeline``) with its Ray
actors (``workers``). The only package that imports both."""
