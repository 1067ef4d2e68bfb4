"""Ray actors: plain classes over ``pipeline`` code. The driver wraps them with ``ray.remote`` and the
resources in config (``pipeline.ray_runtime``); tests can use them without Ray."""
